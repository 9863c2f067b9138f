"""Convolutions computed the way XLA runs them fastest, with `nn.Conv`'s parameters.

XLA's CPU backend is slow on some convolution shapes that a network uses all the time
(`python -m benchmarks.profile_train_step` shows where a train step's time goes): 1x1
convolutions and their backward pass, and the input gradients of strided convolutions and
transposed convolutions, both of which it lowers as convolutions over a zero-dilated
input. The layers here compute the same functions as matrix products or smaller
convolutions where that is exact, keep `nn.Conv` / `nn.ConvTranspose`'s parameter names,
shapes, initialisers and dtype handling (so checkpoints and imported weights are
unaffected), and fall back to flax for every configuration they do not cover.

Every rewrite here was measured on XLA:CPU and runs there only (`platform.py`): 1x1 convs
as matrix products, Winograd's 3x3 convolution (`winograd.py`), the phase-wise input
gradient of strided convs, the kernel gradient of stride-1 convs over the padded input
(`kernel_gradient.py`), block transposed convs as a product and `depth_to_space`, the
sub-pixel bilinear upsampler and `UpsampledConcatConv`. A program lowered for a GPU or TPU
holds the plain op instead, forward and backward: `nn.Conv`'s convolution,
`lax.conv_transpose`, the convolution of the concatenation, each differentiated by JAX.
With `plain_ops` (`switch.py`) every layer here is the plain flax layer or XLA op on every
platform. Measured speed-ups are in `docs/performance.md`.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcn_unet_jax.ops import kernel_gradient, platform, winograd
from fcn_unet_jax.ops.switch import uses_plain_ops

Array = jax.Array
_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


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
        x, kernel, (f, f), 'VALID', dimension_numbers=_DIMENSION_NUMBERS, transpose_kernel=True
    )


def _upsample_subpixel(x: Array, kernel: Array, factor: int) -> Array:
    f = factor
    _, _, out_c, in_c = kernel.shape
    # Tap t = i f + a; the 2x2 conv's window position u = 1 - i reads input q - i.
    taps = kernel.reshape(2, f, 2, f, out_c, in_c)[::-1, :, ::-1]  # [u, a, v, b, out, in]
    taps = taps.transpose(0, 2, 5, 1, 3, 4).reshape(2, 2, in_c, f * f * out_c)
    y = jax.lax.conv_general_dilated(
        jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))),
        taps,
        (1, 1),
        'VALID',
        dimension_numbers=_DIMENSION_NUMBERS,
    )
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


def _is_zero_padding(padding: Any) -> bool:
    """Whether a conv `padding` adds nothing around a 1x1 kernel ('SAME' pads 0 there)."""
    if isinstance(padding, str):
        return padding in ('SAME', 'VALID')
    if isinstance(padding, int):
        return padding == 0
    pairs = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    return all(lo == 0 and hi == 0 for lo, hi in pairs)


def _lax_conv(x, kernel, strides, padding, dilation, precision):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        strides,
        padding,
        rhs_dilation=dilation,
        dimension_numbers=_DIMENSION_NUMBERS,
        precision=precision,
    )


def input_grad_by_phases(dy, kernel, input_shape, strides, padding, dilation, precision=None):
    """The input gradient of a strided convolution, one small convolution per output phase.

    Input pixel i = s m + a (phase a) receives dy[o] through tap t exactly when
    s o + d t - lo = i, so only the taps with (a + lo - d t) divisible by s reach phase a,
    from dy[m + (a + lo - d t) / s]. Each phase is thus a stride-1 convolution of `dy`
    with its own taps (for a 3x3 stride-2 conv: 1, 2, 2 and 4 taps), and together they do
    the forward pass's multiply-adds once. XLA's own gradient convolves the full kernel
    over the s-times zero-dilated `dy` instead: s * s times the work, which on CPU makes
    the input gradients of a ResNet's stride-2 3x3 convs several times slower than their
    forward passes. The phases are then interleaved.

    Args:
      dy: NHWC gradient of the convolution's output.
      kernel: (kh, kw, in, out) kernel.
      input_shape: the convolution input's (height, width).
      strides, padding, dilation: the convolution's (padding: ((lo, hi), (lo, hi)), >= 0).
      precision: conv precision.

    Returns:
      The input gradient, [N, height, width, in].
    """
    n, out_h, out_w, _ = dy.shape
    in_channels = kernel.shape[2]
    # Every phase is computed over the rows (columns) of phase 0, the one with the most.
    phase_size = [-(-size // stride) for size, stride in zip(input_shape, strides, strict=True)]

    def phase_taps(dim, phase):
        """The taps reaching `phase` along `dim` (descending, so offsets ascend), the offset
        of the first into dy and the dilation between consecutive ones."""
        s, d, lo = strides[dim], dilation[dim], padding[dim][0]
        taps = [t for t in range(kernel.shape[dim]) if (phase + lo - d * t) % s == 0][::-1]
        first_offset = (phase + lo - d * taps[0]) // s if taps else 0
        return taps, first_offset, d // math.gcd(s, d)

    rows = []
    for a in range(strides[0]):
        taps_h, offset_h, dilation_h = phase_taps(0, a)
        phases = []
        for b in range(strides[1]):
            taps_w, offset_w, dilation_w = phase_taps(1, b)
            if not taps_h or not taps_w:  # A kernel smaller than the stride skips this phase.
                phases.append(jnp.zeros((n, *phase_size, in_channels), dy.dtype))
                continue
            taps = kernel[jnp.asarray(taps_h)][:, jnp.asarray(taps_w)].transpose(0, 1, 3, 2)
            # dy shifted by the first tap's offset: zeros outside it, negative pads crop.
            need_h = phase_size[0] + (len(taps_h) - 1) * dilation_h
            need_w = phase_size[1] + (len(taps_w) - 1) * dilation_w
            window = jax.lax.pad(
                dy,
                jnp.zeros((), dy.dtype),
                (
                    (0, 0, 0),
                    (-offset_h, need_h - out_h + offset_h, 0),
                    (-offset_w, need_w - out_w + offset_w, 0),
                    (0, 0, 0),
                ),
            )
            phases.append(
                jax.lax.conv_general_dilated(
                    window,
                    taps.astype(dy.dtype),
                    (1, 1),
                    'VALID',
                    rhs_dilation=(dilation_h, dilation_w),
                    dimension_numbers=_DIMENSION_NUMBERS,
                    precision=precision,
                )
            )
        rows.append(jnp.stack(phases, axis=3))  # [N, rows, cols, phase b, C]
    dx = jnp.stack(rows, axis=2)  # [N, rows, phase a, cols, phase b, C]
    dx = dx.reshape(n, phase_size[0] * strides[0], phase_size[1] * strides[1], in_channels)
    return dx[:, : input_shape[0], : input_shape[1]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv2d(x, kernel, strides, padding, dilation, precision=None):
    """`lax.conv_general_dilated` (NHWC, HWIO) whose gradients on CPU are rewritten.

    On CPU, a strided convolution's input gradient is computed phase by phase
    (`input_grad_by_phases`, a quarter of the work of XLA's for stride 2), and a stride-1
    convolution's kernel gradient is taken over the padded input
    (`kernel_gradient.kernel_grad`: the same convolution without padding). Strided kernel
    gradients and stride-1 input gradients are XLA's own; on other platforms both
    gradients are (`platform.on_cpu`). (With XLA's convolutions on Eigen, as `xla_options`
    sets, one matrix product per kernel tap does not pay even for thin kernels over large
    maps, such as a U-Net's class head: XLA's kernel gradient is faster there.)

    Args:
      x: NHWC input.
      kernel: (kh, kw, in, out) kernel.
      strides: (sh, sw).
      padding: explicit ((lo, hi), (lo, hi)) padding, every value >= 0.
      dilation: kernel dilation (dh, dw).
      precision: conv / matmul precision.
    """
    return _lax_conv(x, kernel, strides, padding, dilation, precision)


def _conv2d_fwd(x, kernel, strides, padding, dilation, precision):
    return _lax_conv(x, kernel, strides, padding, dilation, precision), (x, kernel)


def _conv2d_bwd(strides, padding, dilation, precision, residuals, dy):
    def conv(x_, kernel_):
        return _lax_conv(x_, kernel_, strides, padding, dilation, precision)

    def rewritten_on_cpu(x, kernel, dy):
        if strides == (1, 1):
            dx = jax.vjp(lambda x_: conv(x_, kernel), x)[1](dy)[0]
            dkernel = kernel_gradient.kernel_grad(x, kernel, dy, padding, dilation, precision)
        else:
            dx = input_grad_by_phases(
                dy, kernel, x.shape[1:3], strides, padding, dilation, precision
            ).astype(x.dtype)
            dkernel = jax.vjp(lambda k: conv(x, k), kernel)[1](dy)[0]
        return dx, dkernel

    return platform.on_cpu(rewritten_on_cpu, platform.vjp_of(conv), *residuals, dy)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


# From this many pixels per image (height x width) on, a 1x1 conv's kernel gradient is a
# matrix product per image, summed: XLA:CPU runs a batched product with the pixels
# contracted in place, where the single product over all pixels first transposes one
# operand into pixels-minor order. On smaller maps the per-image products are too small
# to pay for themselves, and the single product wins. The threshold was set from
# single-layer timings of ResNet's 1x1 convs and whole train steps of the ResNet models
# (`python -m benchmarks.model_benchmark --models=unet_resnet50,fcn_resnet50`); results in
# `docs/performance.md`.
MIN_PIXELS_PER_IMAGE_BATCHED = 40 * 40


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def pointwise_conv(x: Array, kernel: Array, strides=(1, 1), precision=None) -> Array:
    """A 1x1 convolution, zero padding, NHWC / HWIO: on CPU a matrix product over channels.

    On CPU the convolution is `x[:, ::sh, ::sw] @ kernel[0, 0]`, [N, H, W, in] @ [in, out],
    which XLA:CPU runs (above all its backward pass) several times faster than the 1x1
    convolution; other platforms convolve (`platform.on_cpu`), forward and backward.

    On CPU its kernel gradient is a product over all N H W pixels, for which XLA's CPU backend
    lays one operand out pixels-minor: it transposes that operand, usually inside the
    fusion that produces it (the BatchNorm backward pass), which then writes a whole
    activation in a cache-unfriendly order. Formed as `(dy^T x)^T` (JAX's own transpose
    rule), the output gradient `dy` is the one transposed; formed as `x^T dy`, the input
    `x` is. The gradient here picks the form that transposes the operand with fewer
    channels: `x` for expanding convs (a bottleneck's conv3 and projection, 4x smaller).
    On large maps it is a product per image instead (`MIN_PIXELS_PER_IMAGE_BATCHED`).

    Args:
      x: NHWC input.
      kernel: (1, 1, in, out) kernel.
      strides: (sh, sw).
      precision: matmul / conv precision.
    """
    return _pointwise_conv_fwd(x, kernel, strides, precision)[0]


def _taken_pixels(x: Array, strides) -> Array:
    """The pixels a strided 1x1 convolution reads: rows and columns 0, s, 2s, ..."""
    return x if strides == (1, 1) else x[:, :: strides[0], :: strides[1]]


def _pointwise_conv_fwd(x, kernel, strides, precision):
    # The matrix product's operands are formed on every platform; where the convolution
    # runs instead, they are unused and XLA drops them.
    taken, matrix = _taken_pixels(x, strides), kernel[0, 0]

    def product(taken, matrix, x, kernel):
        return jax.lax.dot_general(taken, matrix, (((3,), (0,)), ((), ())), precision=precision)

    def convolution(taken, matrix, x, kernel):
        return _lax_conv(x, kernel, strides, ((0, 0), (0, 0)), (1, 1), precision)

    y = platform.on_cpu(product, convolution, taken, matrix, x, kernel)
    return y, (taken, matrix, x, kernel)


def _pointwise_conv_bwd(strides, precision, residuals, dy):
    def by_xla(taken, matrix, x, kernel, dy):
        conv = functools.partial(
            _lax_conv,
            strides=strides,
            padding=((0, 0), (0, 0)),
            dilation=(1, 1),
            precision=precision,
        )
        return jax.vjp(conv, x, kernel)[1](dy)

    def by_products(taken, matrix, x, kernel, dy):
        dtaken, dmatrix = _channel_product_grads(taken, matrix, dy, precision)
        dx = jax.vjp(lambda x_: _taken_pixels(x_, strides), x)[1](dtaken)[0]
        dkernel = jax.vjp(lambda k: k[0, 0], kernel)[1](dmatrix)[0]
        return dx, dkernel

    return platform.on_cpu(by_products, by_xla, *residuals, dy)


def _channel_product_grads(x, kernel, dy, precision):
    """The gradients of `x @ kernel` over channels, [N, H, W, in] @ [in, out] (see above)."""
    dx = jax.lax.dot_general(dy, kernel, (((3,), (1,)), ((), ())), precision=precision)
    pixels = ((0, 1, 2), (0, 1, 2))
    if x.shape[1] * x.shape[2] >= MIN_PIXELS_PER_IMAGE_BATCHED:
        n = x.shape[0]
        per_image = jax.lax.dot_general(
            x.reshape(n, -1, x.shape[3]),
            dy.reshape(n, -1, dy.shape[3]),
            (((1,), (1,)), ((0,), (0,))),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        dkernel = per_image.sum(0)
    elif kernel.shape[1] > kernel.shape[0]:
        dkernel = jax.lax.dot_general(x, dy, (pixels, ((), ())), precision=precision)
    else:
        dkernel = jax.lax.dot_general(dy, x, (pixels, ((), ())), precision=precision).T
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


pointwise_conv.defvjp(_pointwise_conv_fwd, _pointwise_conv_bwd)


def _pair(value: Any, default: int = 1) -> tuple[int, int]:
    if value is None:
        value = default
    return (value, value) if isinstance(value, int) else tuple(value)


def _explicit_padding(padding: Any, spatial_shape, kernel_size, strides, dilation) -> tuple | None:
    """`nn.Conv`'s padding as ((lo, hi), (lo, hi)), or None for kinds flax resolves itself."""
    if padding in ('SAME', 'VALID'):
        window = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation, strict=True)]
        pairs = jax.lax.padtype_to_pads(spatial_shape, window, strides, padding)
        return tuple(tuple(pair) for pair in pairs)
    if isinstance(padding, str):  # 'CIRCULAR', 'REFLECT', 'CAUSAL'.
        return None
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    pairs = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pairs) != 2 or any(v < 0 for pair in pairs for v in pair):
        return None
    return pairs


def _conv_taps(x, kernel, strides, padding, dilation, precision) -> Array:
    """A convolution with a kernel larger than 1x1: Winograd's on CPU where it pays."""
    winograd_fits = (
        kernel.shape[:2] == (3, 3)
        and strides == (1, 1)
        and x.dtype == jnp.float32
        and winograd.pays(kernel.shape[2], kernel.shape[3], x.shape[1:3])
    )
    if not winograd_fits:
        return conv2d(x, kernel, strides, padding, dilation, precision)
    # Transformed on CPU only; `winograd.conv3x3` convolves directly elsewhere.
    return winograd.conv3x3(x, kernel, dilation, padding, precision)


class Conv(nn.Conv):
    """`nn.Conv` with fast CPU paths: 1x1 convs as matmuls, faster gradients for the rest.

    With `plain_ops` it is `nn.Conv`.

    * A 1x1 conv with zero padding is exactly `x[:, ::s, ::s] @ kernel[0, 0] + bias`, a
      matrix product over channels (`pointwise_conv`); XLA runs it (above all its backward
      pass) several times faster than the equivalent 1x1 convolution on CPU.
    * On CPU, float32 3x3 stride-1 convs with enough channels (`winograd.pays`) run as
      Winograd's minimal filtering (`winograd.conv3x3`, about half the multiply-adds).
    * Other kernels go through `conv2d` (phase-wise input gradients of strided convs on
      CPU).
    * Everything else (circular / reflect / causal padding, groups, input dilation,
      masks) is `nn.Conv`.
    """

    def _plan(self, inputs: Array) -> tuple[str, tuple | None]:
        """('pointwise' | 'taps' | 'flax', explicit padding)."""
        kernel_size = _pair(self.kernel_size)
        plain = (
            inputs.ndim == 4
            and self.feature_group_count == 1
            and self.mask is None
            and _pair(self.input_dilation) == (1, 1)
        )
        if not plain:
            return 'flax', None
        if kernel_size == (1, 1) and _is_zero_padding(self.padding):
            return 'pointwise', None
        padding = _explicit_padding(
            self.padding,
            inputs.shape[1:3],
            kernel_size,
            _pair(self.strides),
            _pair(self.kernel_dilation),
        )
        return ('taps', padding) if padding is not None else ('flax', None)

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        plan, padding = self._plan(inputs)
        if plan == 'flax' or uses_plain_ops():
            return super().__call__(inputs)
        kernel_size = _pair(self.kernel_size)
        in_features = inputs.shape[-1]
        kernel = self.param(
            'kernel', self.kernel_init, (*kernel_size, in_features, self.features), self.param_dtype
        )
        bias = (
            self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        strides = _pair(self.strides)
        if plan == 'pointwise':
            y = pointwise_conv(inputs, kernel, strides, self.precision)
        else:
            y = _conv_taps(
                inputs, kernel, strides, padding, _pair(self.kernel_dilation), self.precision
            )
        return y if bias is None else y + bias


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
            return _lax_conv(merged, kernel, (1, 1), ((1, 1), (1, 1)), (1, 1), precision)

        def split(inputs, kernel, *skip):
            y = conv3x3_of_upsampled(inputs, kernel[:, :, :up_channels], precision)
            if skip:
                y = y + _conv_taps(
                    skip[0], kernel[:, :, up_channels:], (1, 1), ((1, 1), (1, 1)), (1, 1), precision
                )
            return y

        args = (inputs, kernel) if skip is None else (inputs, kernel, skip)
        if uses_plain_ops():
            y = conv_of_concatenation(*args)
        else:
            y = platform.cpu_rewrite(split, conv_of_concatenation)(*args)
        return y if bias is None else y + bias
