"""The kernel gradient of a padded stride-1 convolution, taken over the padded input.

XLA's CPU backend (Eigen) computes a convolution's kernel gradient as a convolution whose
window is the output map; with the padding inside that convolution it runs far slower
than the same gradient of a VALID convolution over an input padded beforehand. Measured
on 2 cores, batch 4 (3x3 kernels unless noted), padding inside -> padded beforehand:

* 64->64 at 80 x 80: 56 -> 26 ms; 384->64 at 80 x 80: 223 -> 125 ms;
* 768->128 at 40 x 40: 148 -> 98 ms; 3072->256 at 20 x 20: 219 -> 180 ms;
* dilation 2, 256->256 at 40 x 40: 84 -> 66 ms;
* 2x2, one pixel of padding, 2048->1024 at 10 x 10: 6.6 s -> 103 ms.

Strided convolutions are the exception (3x3 stride 2, 128 channels at 160 x 160:
130 -> 213 ms; the 7x7 stem 50 -> 60 ms) and keep XLA's own gradient. The padded copy is
a transient of the backward pass.
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def kernel_grad(x: Array, kernel: Array, dy: Array, padding, dilation, precision=None) -> Array:
    """The gradient, with respect to `kernel`, of a stride-1 NHWC / HWIO convolution.

    Args:
      x: NHWC input of the convolution.
      kernel: its (kh, kw, in, out) kernel (only its shape and dtype matter).
      dy: NHWC gradient of its output.
      padding: ((lo, hi), (lo, hi)), every value >= 0.
      dilation: kernel dilation (dh, dw).
      precision: conv precision.
    """
    padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))

    def conv(kernel_):
        return jax.lax.conv_general_dilated(
            padded,
            kernel_,
            (1, 1),
            'VALID',
            rhs_dilation=dilation,
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            precision=precision,
        )

    return jax.vjp(conv, kernel)[1](dy)[0]
