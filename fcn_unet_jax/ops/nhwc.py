"""XLA's convolution in flax's layout: NHWC images, HWIO kernels.

The plain op every rewrite in this package is measured against and falls back to. It lives
in a module of its own, below the others, so that `convolutions` (which dispatches to
`space_to_depth` and `winograd`) and the modules it dispatches to share it without an
import cycle.
"""

import jax

Array = jax.Array
DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def lax_conv(x, kernel, strides, padding, dilation=(1, 1), precision=None) -> Array:
    """`lax.conv_general_dilated` in `DIMENSION_NUMBERS` layout (`dilation`: the kernel's)."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        strides,
        padding,
        rhs_dilation=dilation,
        dimension_numbers=DIMENSION_NUMBERS,
        precision=precision,
    )
