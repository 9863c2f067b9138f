"""Thin 3x3 convolutions over large maps as convolutions of 2x2 pixel blocks.

XLA:CPU convolves slowly when both channel counts are small: a 3x3 convolution is a
matrix product with an inner dimension of 9 x in channels and `out` columns, and with 3 to
8 channels (the first layers of a narrow VGG16 over the FCN's 100-pixel padding, or of a
narrow U-Net) it runs at a few GFLOP/s, memory- and overhead-bound, while the same map
and multiply-adds with wider channels run several times faster.

Rearranged into 2x2 blocks of pixels (space-to-depth: [N, H, W, C] -> [N, H/2, W/2, 4C]),
a stride-1 3x3 convolution with one pixel of zero padding is a stride-1 3x3 convolution
over the blocks, with 4x the input and output channels and one pixel (block) of padding:
output pixel (2I + a, 2J + b) reads input pixels 2I + a - 1 .. 2I + a + 1, which lie in
blocks I - 1 .. I + 1, so the block kernel holds original tap (t, u) at block tap (B, C),
input phase (p, q) and output phase (a, b) exactly where 2 (B - 1) + p - a = t - 1 and
2 (C - 1) + q - b = u - 1, and zero elsewhere. It does 4x the multiply-adds of the
original (each output phase reads only 2 x 2 of the 3 x 3 block taps; the rest of the
block kernel is zero), in matrices 16x larger, which XLA:CPU runs fast enough to win
where the channels are thin and the map is large (`pays`; measured by
`python -m benchmarks.conv_benchmark --table=space_to_depth`, results in
`docs/performance.md`). More padding than one pixel is padded onto the input, less is
cropped from the output, and an odd height or width gets one more zero row or column,
cropped from the output too. The block kernel is a linear function of the kernel, so
gradients flow to the original kernel through it.

`convolutions.Conv` takes this form on CPU only (`platform.cpu_rewrite`), forward and
backward; a program lowered for a GPU or TPU holds the direct convolution.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fcn_unet_jax.ops import nhwc

Array = jax.Array

# A 3x3 convolution runs on 2x2 blocks while in channels x out channels is at most this
# (3 -> 4, 4 -> 4, 4 -> 8, 3 -> 8): beyond it the direct convolution's matrices are wide
# enough that the 4x multiply-adds no longer pay (8 -> 8 is slower on blocks).
MAX_CHANNEL_PRODUCT = 32
# ... and from this many input positions (height x width) on: on small maps the
# rearrangements cost more than the thin convolution they replace.
MIN_MAP_POSITIONS = 64 * 64


def pays(in_channels: int, out_channels: int, map_size: tuple[int, int]) -> bool:
    """Whether a 3x3 stride-1 conv of this shape runs faster on 2x2 blocks (see above)."""
    thin = in_channels * out_channels <= MAX_CHANNEL_PRODUCT
    return thin and map_size[0] * map_size[1] >= MIN_MAP_POSITIONS


def _tap_selection() -> np.ndarray:
    """S[B, p, a, t] = 1 where block tap B, input phase p and output phase a take tap t."""
    selection = np.zeros((3, 2, 2, 3), np.float32)
    for block_tap in range(3):
        for in_phase in range(2):
            for out_phase in range(2):
                tap = 2 * (block_tap - 1) + in_phase - out_phase + 1
                if 0 <= tap < 3:
                    selection[block_tap, in_phase, out_phase, tap] = 1.0
    return selection


_SELECTION = _tap_selection()


def block_kernel(kernel: Array) -> Array:
    """The [3, 3, 4 in, 4 out] kernel over 2x2 blocks of a [3, 3, in, out] kernel.

    Block channels are ordered (row phase, column phase, channel), as `to_blocks` lays
    them out.
    """
    _, _, c_in, c_out = kernel.shape
    selection = jnp.asarray(_SELECTION, kernel.dtype)
    blocks = jnp.einsum('Bpat,Cqbu,tuio->BCpqiabo', selection, selection, kernel)
    return blocks.reshape(3, 3, 4 * c_in, 4 * c_out)


def to_blocks(x: Array) -> Array:
    """[N, 2H, 2W, C] -> [N, H, W, 4C], channels ordered (row phase, column phase, C)."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // 2, w // 2, 4 * c)


def from_blocks(x: Array) -> Array:
    """The inverse of `to_blocks`: [N, H, W, 4C] -> [N, 2H, 2W, C]."""
    n, h, w, c4 = x.shape
    c = c4 // 4
    x = x.reshape(n, h, w, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, 2 * h, 2 * w, c)


def conv3x3(x: Array, kernel: Array, padding, precision=None) -> Array:
    """A stride-1, undilated 3x3 convolution (NHWC, HWIO) computed over 2x2 pixel blocks.

    Args:
      x: NHWC input.
      kernel: (3, 3, in, out) kernel.
      padding: explicit ((lo, hi), (lo, hi)) zero padding, every value >= 0.
      precision: conv precision.

    Returns:
      What `lax.conv_general_dilated(x, kernel, (1, 1), padding)` returns, [N, H', W', out].
    """
    # As a convolution with one pixel of padding on every side: more padding is padded
    # onto the input, less is cropped from the output (a side without padding is the
    # one-pixel-padded output minus its outermost row or column).
    (top, bottom), (left, right) = padding
    x = jnp.pad(
        x,
        (
            (0, 0),
            (max(top - 1, 0), max(bottom - 1, 0)),
            (max(left - 1, 0), max(right - 1, 0)),
            (0, 0),
        ),
    )
    height, width = x.shape[1:3]
    # An odd size gets one more zero row (column): the zero its padding would read anyway.
    x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
    y = nhwc.lax_conv(
        to_blocks(x),
        block_kernel(kernel).astype(x.dtype),
        (1, 1),
        ((1, 1), (1, 1)),
        precision=precision,
    )
    crop_top, crop_left = max(1 - top, 0), max(1 - left, 0)
    crop_bottom, crop_right = max(1 - bottom, 0), max(1 - right, 0)
    return from_blocks(y)[:, crop_top : height - crop_bottom, crop_left : width - crop_right]
