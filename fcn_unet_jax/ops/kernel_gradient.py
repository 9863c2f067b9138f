"""The kernel gradient of a padded stride-1 convolution, taken over the padded input.

XLA's CPU backend (Eigen) computes a convolution's kernel gradient as a convolution whose
window is the output map; with the padding inside that convolution it runs far slower
than the same gradient of a VALID convolution over an input padded beforehand, for 3x3,
dilated and 2x2 kernels alike. Strided convolutions are the exception (there the padded
form is slower) and keep XLA's own gradient. The padded copy is a transient of the
backward pass. Both forms here run on XLA:CPU only: they are called from the CPU branches
of the convolutions' backward rules (`convolutions.conv2d`, `winograd.conv3x3`), and other
platforms, like `plain_ops`, get XLA's own gradient of the convolution.
`python -m benchmarks.conv_benchmark --table=kernel_gradient` times the three forms of
this module; results in `docs/performance.md`.

That convolution treats the images as its input channels, so XLA first copies one of its
operands into images-minor order, a transpose that walks the whole tensor across cache
lines. Formed the usual way, the operand copied is the input; with the roles swapped
(`kernel_grad_over_output_gradient`), it is the output gradient, which is the cheaper
copy where a convolution narrows its channels (`transposes_output_gradient`).
"""

import jax
import jax.numpy as jnp

Array = jax.Array

# The swapped form is taken on CPU for convolutions that at least halve their channels
# to at most this many outputs, on maps of at least MIN_PIXELS_SWAPPED pixels per image.
# With few output channels the transposed copy is a large share of the gradient's time
# (each input element takes part in kh kw out multiply-adds); with many, the convolution
# dominates and Eigen runs the swapped one slower; on very small maps neither copy costs
# much and the swapped convolution is the slower. Where XLA fuses the input's producer
# into the copy (the classic U-Net's concatenation with a cropped skip), the two forms are
# about level. Measured per layer shape with
# `python -m benchmarks.conv_benchmark --table=kernel_gradient` (its last column says
# which form is taken); results in `docs/performance.md`.
MAX_OUTPUT_CHANNELS_SWAPPED = 128
MIN_PIXELS_SWAPPED = 20 * 20


def transposes_output_gradient(kernel_shape, output_shape) -> bool:
    """Whether `kernel_grad` takes the swapped form on CPU for this HWIO kernel shape and
    NHWC output shape."""
    in_channels, out_channels = kernel_shape[2:]
    return (
        out_channels <= MAX_OUTPUT_CHANNELS_SWAPPED
        and in_channels >= 2 * out_channels
        and output_shape[1] * output_shape[2] >= MIN_PIXELS_SWAPPED
    )


def kernel_grad_over_input(x: Array, kernel: Array, dy: Array, padding, dilation, precision=None):
    """XLA's kernel gradient of the VALID convolution of the padded input."""
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


def kernel_grad_over_output_gradient(
    x: Array, kernel: Array, dy: Array, padding, dilation, precision=None
):
    """The same gradient as one convolution of `dy` whose window is the padded input.

    With `xp` the padded input, dk[i, j, c, o] = sum over n, h, w of
    dy[n, h, w, o] xp[n, h + d i, w + d j, c]. Read as a convolution with the output
    channels as its batch, the images as its input channels and `xp` as a window the size
    of the padded map, it runs over `dy` padded by d (k - 1) on each side with stride d,
    and its k x k outputs are the taps in reverse order.
    """
    kh, kw = kernel.shape[:2]
    dh, dw = dilation
    padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    dy_padded = jnp.pad(dy, ((0, 0), (dh * (kh - 1),) * 2, (dw * (kw - 1),) * 2, (0, 0)))
    reversed_taps = jax.lax.conv_general_dilated(
        dy_padded,
        padded,
        dilation,
        'VALID',
        # dy_padded [N, H, W, O] as batch O, features N; padded [N, H, W, C] as a window
        # with N inputs and C outputs: the result is [O, kh, kw, C].
        dimension_numbers=('CHWN', 'IHWO', 'NHWC'),
        precision=precision,
    )
    return reversed_taps[:, ::-1, ::-1].transpose(1, 2, 3, 0).astype(kernel.dtype)


def kernel_grad(x: Array, kernel: Array, dy: Array, padding, dilation, precision=None) -> Array:
    """The gradient, with respect to `kernel`, of a stride-1 NHWC / HWIO convolution, on CPU.

    Over the padded input; for convolutions that narrow their channels
    (`transposes_output_gradient`), in the swapped form that copies `dy` rather than `x`
    into images-minor order. Call it from the CPU branch of a custom VJP's backward rule
    (`platform.on_cpu`): both forms were measured on XLA:CPU only.

    Args:
      x: NHWC input of the convolution.
      kernel: its (kh, kw, in, out) kernel (only its shape and dtype matter).
      dy: NHWC gradient of its output.
      padding: ((lo, hi), (lo, hi)), every value >= 0.
      dilation: kernel dilation (dh, dw).
      precision: conv precision.
    """
    if transposes_output_gradient(kernel.shape, dy.shape):
        return kernel_grad_over_output_gradient(x, kernel, dy, padding, dilation, precision)
    return kernel_grad_over_input(x, kernel, dy, padding, dilation, precision)
