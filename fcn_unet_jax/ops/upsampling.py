"""Upsampling layers computed without their upsampled tensors, with flax's parameters.

The decoders upsample all the time: the FCN's fixed bilinear upsamplers (transposed convs
with kernel 2f and stride f), the U-Net's 2x2 stride-2 up-convolutions, and the encoder
U-Nets' nearest x2 upsampling followed by concatenation with a skip and a 3x3 conv. XLA
lowers a transposed conv as a convolution over the zero-dilated input, nearly all of whose
multiply-adds are with inserted zeros, and whose kernel gradient is among the slowest
operations on XLA:CPU. Here each is the same function computed at the input's resolution:
sub-pixel convolutions followed by `depth_to_space`, a matrix product for a block
up-convolution, and a 2x2 convolution of phase taps for the 3x3 conv of an upsampled
input.

As in `convolutions.py`, every rewrite runs on XLA:CPU only (`platform.py`); a program for
a GPU or TPU, and `plain_ops`, hold `lax.conv_transpose` and the convolution of the
concatenation, differentiated by JAX.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcn_unet_jax.ops import platform
from fcn_unet_jax.ops.convolutions import Conv, conv2d, conv_taps
from fcn_unet_jax.ops.nhwc import DIMENSION_NUMBERS, lax_conv
from fcn_unet_jax.ops.switch import uses_plain_ops

Array = jax.Array


def upsample_nearest2x(x: Array) -> Array:
    """Nearest-neighbour x2 upsampling (PyTorch `F.interpolate(scale_factor=2)`)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def depth_to_space(x: Array, factor: int) -> Array:
    """[N, H, W, f * f * C] -> [N, H f, W f, C]: channel block (a, b) goes to offset (a, b)."""
    n, h, w, channels = x.shape
    c = channels // (factor * factor)
    x = x.reshape(n, h, w, factor, factor, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h * factor, w * factor, c)


def upsample_transposed(x: Array, kernel: Array, factor: int) -> Array:
    """PyTorch/Caffe transposed conv with kernel 2f, stride f, no padding, computed sub-pixel.

    Equal to `lax.conv_transpose(x, kernel, (f, f), 'VALID', transpose_kernel=True)` with
    `kernel` of shape (2f, 2f, out, in): output pixel (q f + a, r f + b) receives input
    (q - i, r - j) through tap (a + i f, b + j f), for i, j in {0, 1}. So every output phase
    (a, b) is a 2x2 convolution of the input padded by one pixel, and all f * f phases are
    one 2x2 convolution with f * f * out channels followed by `depth_to_space`. XLA would
    otherwise convolve a 2f x 2f kernel over the f-times dilated input: f * f times the
    multiply-adds, nearly all with inserted zeros (and a far slower backward pass). On
    other platforms than CPU, and with `plain_ops`, it is that `lax.conv_transpose`.

    Args:
      x: NHWC input.
      kernel: (2f, 2f, out, in) kernel.
      factor: the stride f.

    Returns:
      [N, (H + 1) f, (W + 1) f, out].
    """
    k = kernel.shape[0]
    if k != 2 * factor:
        raise ValueError(
            f'upsample_transposed needs a {2 * factor}x{2 * factor} kernel, got {k}x{k}.'
        )
    plain = functools.partial(_transposed_by_xla, factor=factor)
    if uses_plain_ops():
        return plain(x, kernel)
    tuned = functools.partial(_upsample_subpixel, factor=factor)
    return platform.cpu_rewrite(tuned, plain)(x, kernel)


def _transposed_by_xla(x: Array, kernel: Array, factor: int) -> Array:
    f = factor
    return jax.lax.conv_transpose(
        x, kernel, (f, f), 'VALID', dimension_numbers=DIMENSION_NUMBERS, transpose_kernel=True
    )


def _upsample_subpixel(x: Array, kernel: Array, factor: int) -> Array:
    f = factor
    _, _, out_c, in_c = kernel.shape
    # Tap t = i f + a; the 2x2 conv's window position u = 1 - i reads input q - i.
    taps = kernel.reshape(2, f, 2, f, out_c, in_c)[::-1, :, ::-1]  # [u, a, v, b, out, in]
    taps = taps.transpose(0, 2, 5, 1, 3, 4).reshape(2, 2, in_c, f * f * out_c)
    y = lax_conv(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), taps, (1, 1), 'VALID')
    return depth_to_space(y, f)


def _upsampled_phase_taps(kernel: Array) -> Array:
    """(3, 3, C, O) -> (2, 2, C, 4 O): the taps of `conv3x3_of_upsampled`'s 2x2 convolution.

    Along one axis, upsampled pixel i is low-resolution pixel i // 2, so through taps
    (k0, k1, k2) output 2s - 1 reads pixels (s - 1, s - 1, s) and output 2s reads
    (s - 1, s, s). Over the window [s - 1, s], phase 0 (output 2s - 1) thus has the taps
    (k0 + k1, k2) and phase 1 (output 2s) (k0, k1 + k2). Output channel block (a, b) holds
    phase a along the height and b along the width.
    """

    def phases(k, axis):
        k0, k1, k2 = (jnp.take(k, i, axis=axis) for i in range(3))
        return jnp.stack([k0 + k1, k2], axis=axis), jnp.stack([k0, k1 + k2], axis=axis)

    blocks = [list(phases(rows, 1)) for rows in phases(kernel, 0)]  # [a][b]: (2, 2, C, O)
    taps = jnp.stack([jnp.stack(row, axis=3) for row in blocks], axis=3)  # (2, 2, C, a, b, O)
    _, _, in_c, out_c = kernel.shape
    return taps.reshape(2, 2, in_c, 4 * out_c)


def conv3x3_of_upsampled(x: Array, kernel: Array, precision=None) -> Array:
    """A 3x3 convolution, one pixel of zero padding, of `x` upsampled x2 (nearest), at x's size.

    Each output pixel of the convolution over the upsampled input reads a 2x2 window of
    `x` with sums of kernel taps (`_upsampled_phase_taps`), so the four output phases are
    one 2x2 convolution of `x` (padded by one pixel) with four times the output channels,
    interleaved by `depth_to_space`: 16 instead of 36 multiply-adds per input channel,
    output channel and pixel of `x`, and no upsampled tensor. Equal to
    `conv(upsample_nearest2x(x), kernel, padding=1)` up to float rounding.

    Args:
      x: NHWC input, [N, H, W, C].
      kernel: (3, 3, C, O) kernel.
      precision: conv precision.

    Returns:
      [N, 2 H, 2 W, O].
    """
    h, w = x.shape[1:3]
    taps = _upsampled_phase_taps(kernel).astype(x.dtype)
    y = conv2d(x, taps, (1, 1), ((1, 1), (1, 1)), (1, 1), precision)
    # Block (a, b) at window s is output (2 s - 1 + a): drop the first and last row/column.
    return depth_to_space(y, 2)[:, 1 : 2 * h + 1, 1 : 2 * w + 1]


class ConvTranspose(nn.ConvTranspose):
    """`nn.ConvTranspose` whose non-overlapping up-convolutions run as one matrix product.

    With kernel size equal to the stride (the U-Net's 2x2 stride-2 up-convolution) every
    input pixel writes its own f x f output block: `x @ kernel` over channels followed by
    `depth_to_space` is exactly what `nn.ConvTranspose` computes (its `transpose_kernel=False`
    convention places tap (f - 1 - a, f - 1 - b) at offset (a, b)). XLA's own lowering
    convolves over the zero-dilated input, whose kernel gradient is among the slowest
    operations on CPU. Parameters and other configurations are `nn.ConvTranspose`'s; with
    `plain_ops` it is `nn.ConvTranspose`.
    """

    def _block_stride(self, inputs: Array) -> int | None:
        """The stride f when this is a plain f x f, stride-f transposed conv, else None."""
        size = self.kernel_size
        size = (size,) * 2 if isinstance(size, int) else tuple(size)
        strides = tuple(self.strides) if self.strides is not None else (1, 1)
        plain = (
            inputs.ndim == 4
            and size[0] == size[1]
            and strides == size
            and self.padding in ('SAME', 'VALID')  # Both give (H f, W f) when kernel == stride.
            and self.kernel_dilation in (None, 1, (1, 1))
            and not self.transpose_kernel
            and self.mask is None
            and self.preferred_element_type is None
        )
        return size[0] if plain else None

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        f = self._block_stride(inputs)
        if f is None or uses_plain_ops():
            return super().__call__(inputs)
        in_features = inputs.shape[-1]
        kernel = self.param(
            'kernel', self.kernel_init, (f, f, in_features, self.features), self.param_dtype
        )
        bias = (
            self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        precision = self.precision

        def product(inputs, kernel):
            taps = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(in_features, -1)
            y = jax.lax.dot_general(inputs, taps, (((3,), (0,)), ((), ())), precision=precision)
            return depth_to_space(y, f)

        def by_xla(inputs, kernel):  # `nn.ConvTranspose`'s call.
            return jax.lax.conv_transpose(
                inputs, kernel, (f, f), self.padding, rhs_dilation=(1, 1), precision=precision
            )

        y = platform.cpu_rewrite(product, by_xla)(inputs, kernel)
        return y if bias is None else y + bias


class UpsampledConcatConv(Conv):
    """3x3 conv (one pixel of padding) of `concat([upsample_nearest2x(x), skip])`, computed
    without the upsampled or concatenated tensors.

    The kernel is `nn.Conv`'s, (3, 3, C_x + C_skip, features), its input channels in the
    concatenation's order, so parameters and checkpoints are those of a `Conv` applied to
    the concatenation. The convolution is split along the input channels: the upsampled
    part by `conv3x3_of_upsampled` at x's resolution, the skip (if any) by `Conv`'s own
    path; their sum is the convolution of the concatenation. That saves the upsampled and
    concatenated tensors and more than half of the upsampled part's multiply-adds on CPU
    (`python -m benchmarks.conv_benchmark --table=decoder` times it against the conv of the
    concatenation). On other platforms, and with `plain_ops`, it is that conv of the
    concatenation (`platform.cpu_rewrite`).

    Only `features`, `use_bias`, the initialisers, dtypes and `precision` are used: the
    kernel size, strides and padding are fixed by what the layer computes.
    """

    @nn.compact
    def __call__(self, inputs: Array, skip: Array | None = None) -> Array:  # type: ignore[override]
        if skip is not None and skip.shape[1:3] != (2 * inputs.shape[1], 2 * inputs.shape[2]):
            raise ValueError(
                f'skip must have twice the height and width of the upsampled input '
                f'{inputs.shape[1:3]}, got {skip.shape[1:3]}.'
            )
        up_channels = inputs.shape[-1]
        in_features = up_channels + (0 if skip is None else skip.shape[-1])
        kernel = self.param(
            'kernel', self.kernel_init, (3, 3, in_features, self.features), self.param_dtype
        )
        bias = (
            self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, skip, kernel, bias = self.promote_dtype(
            inputs, skip, kernel, bias, dtype=self.dtype
        )
        precision = self.precision

        def conv_of_concatenation(inputs, kernel, *skip):
            merged = jnp.concatenate([upsample_nearest2x(inputs), *skip], axis=-1)
            return lax_conv(merged, kernel, (1, 1), ((1, 1), (1, 1)), (1, 1), precision)

        def split(inputs, kernel, *skip):
            y = conv3x3_of_upsampled(inputs, kernel[:, :, :up_channels], precision)
            if skip:
                y = y + conv_taps(
                    skip[0], kernel[:, :, up_channels:], (1, 1), ((1, 1), (1, 1)), (1, 1), precision
                )
            return y

        args = (inputs, kernel) if skip is None else (inputs, kernel, skip)
        if uses_plain_ops():
            y = conv_of_concatenation(*args)
        else:
            y = platform.cpu_rewrite(split, conv_of_concatenation)(*args)
        return y if bias is None else y + bias
