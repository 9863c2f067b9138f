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
as matrix products, Winograd's 3x3 convolution (`winograd.py`), thin 3x3 convolutions over
2x2 pixel blocks (`space_to_depth.py`), the phase-wise input gradient of strided convs, the
tap-wise input gradient of VALID convs with small outputs (FCN's fc6), and the kernel
gradient of stride-1 convs over the padded input (`kernel_gradient.py`); the upsampling
layers are in `upsampling.py`. A program lowered for a GPU or TPU holds `nn.Conv`'s
convolution instead, forward and backward, differentiated by JAX. With `plain_ops`
(`switch.py`) every layer here is the plain flax layer on every platform. Measured
speed-ups are in `docs/performance.md`.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcn_unet_jax.ops import kernel_gradient, platform, space_to_depth, winograd, xla_cpu
from fcn_unet_jax.ops.nhwc import DIMENSION_NUMBERS, lax_conv
from fcn_unet_jax.ops.switch import uses_plain_ops

Array = jax.Array


def _is_zero_padding(padding: Any) -> bool:
    """Whether a conv `padding` adds nothing around a 1x1 kernel ('SAME' pads 0 there)."""
    if isinstance(padding, str):
        return padding in ('SAME', 'VALID')
    if isinstance(padding, int):
        return padding == 0
    pairs = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    return all(lo == 0 and hi == 0 for lo, hi in pairs)


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
                    dimension_numbers=DIMENSION_NUMBERS,
                    precision=precision,
                )
            )
        rows.append(jnp.stack(phases, axis=3))  # [N, rows, cols, phase b, C]
    dx = jnp.stack(rows, axis=2)  # [N, rows, phase a, cols, phase b, C]
    dx = dx.reshape(n, phase_size[0] * strides[0], phase_size[1] * strides[1], in_channels)
    return dx[:, : input_shape[0], : input_shape[1]]


# A VALID stride-1 convolution's input gradient is one matrix product and a sum of shifted
# slices (`input_grad_by_taps`) once its output has at most this share of the input's
# positions: XLA convolves the full kernel over the output gradient zero-padded to the
# input's size, work in proportion to the input's positions rather than the output's
# (`python -m benchmarks.conv_benchmark --table=valid_input_gradient --batch_size=8`: FCN's
# fc6, a 7x7 VALID conv, at width 1/16 on 128 px crops 47.7 -> 1.8 ms, at width 1/4 on
# 320 px crops 283 -> 126 ms). Convolutions whose output is nearly the input's size keep
# XLA's gradient, which never forms the kh x kw times larger product (a classic U-Net 3x3
# conv is 2.7x slower tap by tap).
MAX_OUTPUT_SHARE_BY_TAPS = 0.5


def input_grad_by_taps(dy, kernel, input_shape, precision=None):
    """The input gradient of a VALID, stride-1, undilated convolution, tap by tap.

    Input pixel (i + t, j + u) receives dy[i, j] @ kernel[t, u]^T through tap (t, u): one
    matrix product of `dy` with every tap at once ([N, H', W', out] @ [out, kh kw in]),
    then each tap's slice added at its offset. The product does the forward pass's
    multiply-adds once.

    Args:
      dy: NHWC gradient of the convolution's output.
      kernel: (kh, kw, in, out) kernel.
      input_shape: the convolution input's (height, width).
      precision: matmul precision.

    Returns:
      The input gradient, [N, height, width, in].
    """
    kh, kw = kernel.shape[:2]
    _, out_h, out_w, _ = dy.shape
    per_tap = jnp.einsum('nhwo,tuio->nhwtui', dy, kernel.astype(dy.dtype), precision=precision)

    def shifted_sum(values, axis, size):
        """The sum over tap t (axis 3) of values[:, :, :, t] shifted by t along `axis`,
        padded to `size`."""
        zero, total = jnp.zeros((), values.dtype), None
        for t in range(values.shape[3]):
            config = [(0, 0, 0)] * (values.ndim - 1)
            config[axis] = (t, size - values.shape[axis] - t, 0)
            placed = jax.lax.pad(values[:, :, :, t], zero, config)
            total = placed if total is None else total + placed
        # Computed once: fused into its consumer (the next sum, a max pooling's gradient),
        # the sum of shifted slices would be recomputed for every element it reads.
        return xla_cpu.materialize_in_cpu_rule(total)

    # Rows, then columns: kh + kw shifted slices per element rather than kh x kw.
    by_rows = shifted_sum(per_tap, 1, input_shape[0])  # [N, H, W', kw, in]
    return shifted_sum(by_rows, 2, input_shape[1])


def input_grad_by_taps_pays(x_shape, dy_shape, padding, dilation) -> bool:
    """Whether `conv2d`'s stride-1 input gradient is `input_grad_by_taps` on CPU."""
    valid = all(v == 0 for pair in padding for v in pair) and dilation == (1, 1)
    positions = x_shape[1] * x_shape[2]
    return valid and dy_shape[1] * dy_shape[2] <= MAX_OUTPUT_SHARE_BY_TAPS * positions


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv2d(x, kernel, strides, padding, dilation, precision=None):
    """`lax.conv_general_dilated` (NHWC, HWIO) whose gradients on CPU are rewritten.

    On CPU, a strided convolution's input gradient is computed phase by phase
    (`input_grad_by_phases`, a quarter of the work of XLA's for stride 2), a VALID
    stride-1 convolution's with a much smaller output than input tap by tap
    (`input_grad_by_taps`), and a stride-1 convolution's kernel gradient is taken over the
    padded input (`kernel_gradient.kernel_grad`: the same convolution without padding).
    Strided kernel gradients and the other stride-1 input gradients are XLA's own; on
    other platforms both gradients are (`platform.on_cpu`). (With XLA's convolutions on
    Eigen, as `xla_options` sets, one matrix product per kernel tap does not pay even for
    thin kernels over large maps, such as a U-Net's class head: XLA's kernel gradient is
    faster there.)

    Args:
      x: NHWC input.
      kernel: (kh, kw, in, out) kernel.
      strides: (sh, sw).
      padding: explicit ((lo, hi), (lo, hi)) padding, every value >= 0.
      dilation: kernel dilation (dh, dw).
      precision: conv / matmul precision.
    """
    return lax_conv(x, kernel, strides, padding, dilation, precision)


def _conv2d_fwd(x, kernel, strides, padding, dilation, precision):
    return lax_conv(x, kernel, strides, padding, dilation, precision), (x, kernel)


def _conv2d_bwd(strides, padding, dilation, precision, residuals, dy):
    def conv(x_, kernel_):
        return lax_conv(x_, kernel_, strides, padding, dilation, precision)

    def rewritten_on_cpu(x, kernel, dy):
        if strides == (1, 1) and input_grad_by_taps_pays(x.shape, dy.shape, padding, dilation):
            dx = input_grad_by_taps(dy, kernel, x.shape[1:3], precision).astype(x.dtype)
            dkernel = kernel_gradient.kernel_grad(x, kernel, dy, padding, dilation, precision)
        elif strides == (1, 1):
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
        return lax_conv(x, kernel, strides, ((0, 0), (0, 0)), (1, 1), precision)

    y = platform.on_cpu(product, convolution, taken, matrix, x, kernel)
    return y, (taken, matrix, x, kernel)


def _pointwise_conv_bwd(strides, precision, residuals, dy):
    def by_xla(taken, matrix, x, kernel, dy):
        conv = functools.partial(
            lax_conv,
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


def conv_taps(x, kernel, strides, padding, dilation, precision) -> Array:
    """A convolution with a kernel larger than 1x1: Winograd's or on 2x2 pixel blocks on
    CPU where that pays."""
    plain_3x3 = kernel.shape[:2] == (3, 3) and strides == (1, 1) and x.dtype == jnp.float32
    if (
        plain_3x3
        and dilation == (1, 1)
        and space_to_depth.pays(kernel.shape[2], kernel.shape[3], x.shape[1:3])
    ):

        def direct(x, kernel):
            return conv2d(x, kernel, strides, padding, dilation, precision)

        def on_blocks(x, kernel):
            return space_to_depth.conv3x3(x, kernel, padding, precision)

        return platform.cpu_rewrite(on_blocks, direct)(x, kernel)
    winograd_fits = plain_3x3 and winograd.pays(kernel.shape[2], kernel.shape[3], x.shape[1:3])
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
      Winograd's minimal filtering (`winograd.conv3x3`, about half the multiply-adds),
      and thin ones over large maps (`space_to_depth.pays`) as a convolution of 2x2
      pixel blocks with 4x the channels (`space_to_depth.conv3x3`).
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
            y = conv_taps(
                inputs, kernel, strides, padding, _pair(self.kernel_dilation), self.precision
            )
        return y if bias is None else y + bias
