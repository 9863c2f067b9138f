"""Winograd minimal filtering for 3x3 stride-1 convolutions (Lavin & Gray, 2016).

A 3x3 convolution computes each m x m block of outputs from an (m + 2) x (m + 2) tile of
its input. Winograd's F(m x m, 3 x 3) does it with (m + 2)^2 products instead of 9 m^2:
each tile and the kernel are moved into the transform domain by fixed matrices
(`V = B^T d B`, `U = G g G^T`), multiplied point by point (over channels, one matrix
product per transform point) and moved back (`Y = A^T M A`). F(2x2) needs 16/36 of the
multiply-adds of the direct convolution, F(4x4) 36/144. The transforms are additions and
multiplications by small constants, memory-bound passes that cost less than the saved
products once both channel counts are a few dozen. On XLA:CPU, whose direct convolution
does every multiply-add, the widest layers of the model zoo (the FCN-ResNet head, ResNet's
dilated layer4, VGG16's 512-channel blocks) then run markedly faster, forward and in
training; `python -m benchmarks.conv_benchmark --table=winograd` times each layer shape
both ways, and `docs/performance.md` holds the results. Only XLA:CPU runs the transformed
form (`platform.on_cpu`): other platforms convolve directly and take XLA's own gradients,
as does `plain_ops` (`convolutions.Conv` then never calls this module).

Dilated convolutions tile each of the dilation's residue classes: with dilation d the
outputs `m d k + d i + r` (i < m) of one residue r read the inputs `m d k + d j + r`
(j < m + 2), so the input, padded to whole blocks of m d, is viewed as
[blocks, m, d] along each axis and the tile taps are plain slices of that view.

Numerics: the transforms are exact in real arithmetic; in float32 F(2x2)'s rounding is
that of the direct convolution (coefficients 0, +-1, +-1/2), F(4x4)'s about 10x larger
(relative error ~2e-6 per layer). Differentiated (`jax.grad`), a convolution wide enough
and on a map large enough to pay in training (`pays`) runs F(2x2) forward and backward,
any other the direct convolution; the forward pass alone (inference) uses F(4x4) where
it tiles the output without much waste. Only float32 is transformed: bfloat16 would lose
too much.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fcn_unet_jax.ops import kernel_gradient, nhwc, platform, xla_cpu

Array = jax.Array

# Transform matrices (B^T, G, A^T) of F(m x m, 3 x 3), interpolation points 0, +-1
# (F2) and 0, +-1, +-2 (F4), plus the point at infinity.
_MATRICES = {
    2: (
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64),
    ),
    4: (
        np.array(
            [
                [4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1],
            ],
            np.float64,
        ),
        np.array(
            [
                [1 / 4, 0, 0],
                [-1 / 6, -1 / 6, -1 / 6],
                [-1 / 6, 1 / 6, -1 / 6],
                [1 / 24, 1 / 12, 1 / 6],
                [1 / 24, -1 / 12, 1 / 6],
                [0, 0, 1],
            ],
            np.float64,
        ),
        np.array(
            [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
            np.float64,
        ),
    ),
}
TILE_SIZES = tuple(_MATRICES)
# Winograd pays once the harmonic channel count C_in C_out / (C_in + C_out) reaches these:
# the transforms cost in proportion to the channels, the saved products to their product.
# Inference (F(4x4)) pays from a few dozen; training (F(2x2) forward and backward) saves
# less per layer while each transformed convolution adds to the train step's compile
# time, so only the widest layers are transformed there. Measured per layer shape with
# `python -m benchmarks.conv_benchmark --table=winograd` (its last column says where
# `pays` transforms); results in `docs/performance.md`.
MIN_HARMONIC_CHANNELS = {'inference': 48, 'training': 192}
# ... and once the input map has this many positions (height x width). Inference: small
# maps leave too few tiles to amortise the transforms (the `map size` rows of
# `python -m benchmarks.conv_benchmark --table=winograd`). Training is faster transformed
# even on small maps, layer by layer, but there the transform-domain temporaries cost
# memory at the worst moment: in a U-Net those maps are the bottom of the U, whose
# backward pass runs while every skip activation and its gradient are alive, the step's
# peak. Transforming them raised the U-Nets' peak memory (U-Net-VGG16's above PyTorch's)
# for train steps no faster (`python -m benchmarks.model_benchmark`); results in
# `docs/performance.md`.
MIN_MAP_POSITIONS = {'inference': 24 * 24, 'training': 40 * 40}
# Transformed inputs larger than this are formed a slice of input channels at a time, so
# that a wide layer's transform-domain temporaries never all live at once, beside a
# step's activations (the FCN head's 2048 channels in F(2x2) at 40 x 40, batch 4, are
# 16 points x 1,600 tiles x 2,048 channels x 4 bytes, about 210 MB).
_MAX_TRANSFORMED_BYTES = 64 * 2**20
# The inference pass takes F(4x4) unless its tiles cover this much more padded area
# than F(2x2)'s (ResNet layer4's dilation 4 on a 40 x 40 map: 1.44 -> F(2x2)).
_MAX_F4_TILE_WASTE = 1.15


def pays(
    in_channels: int, out_channels: int, map_size: tuple[int, int], mode: str = 'inference'
) -> bool:
    """Whether a 3x3 conv of this shape runs better as Winograd's (see the thresholds).

    Args:
      in_channels, out_channels: the convolution's channel counts.
      map_size: (height, width) of its input.
      mode: 'inference' (the forward pass alone) or 'training' (forward and backward).

    Raises:
      ValueError: for any other mode.
    """
    if mode not in MIN_HARMONIC_CHANNELS:
        raise ValueError(f'mode must be one of {sorted(MIN_HARMONIC_CHANNELS)}, got {mode!r}.')
    harmonic = MIN_HARMONIC_CHANNELS[mode]
    wide = in_channels * out_channels >= harmonic * (in_channels + out_channels)
    return wide and map_size[0] * map_size[1] >= MIN_MAP_POSITIONS[mode]


class _Geometry(NamedTuple):
    """Tiling of one convolution: input size, low padding, dilation, output size and
    tiles per residue class, per axis (height, width), and the output tile side m."""

    size: tuple[int, int]
    pad_lo: tuple[int, int]
    dilation: tuple[int, int]
    out: tuple[int, int]
    tiles: tuple[int, int]
    m: int

    @property
    def alpha(self) -> int:
        return self.m + 2


def _geometry(x_shape, dilation, padding, m: int) -> _Geometry:
    size = tuple(x_shape[1:3])
    out = tuple(n + lo + hi - 2 * d for n, (lo, hi), d in zip(size, padding, dilation, strict=True))
    tiles = tuple(-(-o // (m * d)) for o, d in zip(out, dilation, strict=True))
    return _Geometry(size, tuple(lo for lo, _ in padding), tuple(dilation), out, tiles, m)


def _combine(terms: list[Array], coeffs) -> Array:
    """sum_i coeffs[i] * terms[i], skipping zeros and multiplying only by non-units."""
    total = None
    for coeff, term in zip(coeffs, terms, strict=True):
        if coeff == 0:
            continue
        value = term if coeff == 1 else -term if coeff == -1 else term * np.float32(coeff)
        total = value if total is None else total + value
    return jnp.zeros_like(terms[0]) if total is None else total


def _mix(matrix: np.ndarray, taps: list[Array], axis: int) -> Array:
    """`matrix @ taps` along a new axis at `axis`: row a is sum_j matrix[a, j] taps[j].

    Stacking the rows (not broadcasting the matrix) keeps the zeros out of the arithmetic,
    and XLA still emits one fused loop for the stack, so each transform costs a few
    kernels to compile rather than one per transform point.
    """
    return jnp.stack([_combine(taps, row) for row in matrix], axis)


def _pad_axis(x: Array, axis: int, lo: int, hi: int) -> Array:
    config = [(0, 0, 0)] * x.ndim
    config[axis] = (lo, hi, 0)
    return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


def _overlap_add(taps: Array, tile_axis: int, tap_axis: int, m: int) -> Array:
    """Per-tile taps [.., K, .., alpha, ..] -> the blocks they cover [.., K + 1, .., m, ..].

    Tap j of tile k lands on block k + j // m at offset j % m, so block k sums taps
    0..m-1 of tile k and taps m..alpha-1 of tile k - 1.
    """
    alpha = taps.shape[tap_axis]
    own = _pad_axis(jax.lax.slice_in_dim(taps, 0, m, axis=tap_axis), tile_axis, 0, 1)
    spill = jax.lax.slice_in_dim(taps, m, alpha, axis=tap_axis)
    spill = _pad_axis(_pad_axis(spill, tap_axis, 0, 2 * m - alpha), tile_axis, 1, 0)
    return own + spill


def _blocked(x: Array, geometry: _Geometry, blocks: tuple[int, int]) -> Array:
    """[N, H, W, C] -> [N, Bh, m, dh, Bw, m, dw, C], zero-padded (or cropped) to the blocks."""
    m, (dh, dw) = geometry.m, geometry.dilation
    n, h, w, c = x.shape
    lo_h, lo_w = geometry.pad_lo
    hi_h, hi_w = blocks[0] * m * dh - h - lo_h, blocks[1] * m * dw - w - lo_w
    x = _pad_axis(_pad_axis(x, 1, lo_h, hi_h), 2, lo_w, hi_w)
    return x.reshape(n, blocks[0], m, dh, blocks[1], m, dw, c)


def input_transform(x: Array, geometry: _Geometry) -> Array:
    """`B^T d B` of every input tile: [alpha^2, tiles, C] (point (a, b) at a alpha + b)."""
    bt = _MATRICES[geometry.m][0]
    m, alpha, (kh, kw) = geometry.m, geometry.alpha, geometry.tiles
    xb = _blocked(x, geometry, (kh + 1, kw + 1))  # [N, Bh, m, dh, Bw, m, dw, C]
    # Tap j of tile k sits at block k + j // m, offset j % m: a slice of the blocked view.
    rows = [xb[:, j // m : j // m + kh, j % m] for j in range(alpha)]  # [N, kh, dh, Bw, m, dw, C]
    v = _mix(bt, rows, 0)  # [a, N, kh, dh, Bw, m, dw, C]
    cols = [v[:, :, :, :, k // m : k // m + kw, k % m] for k in range(alpha)]
    v = _mix(bt, cols, 1)  # [a, b, N, kh, dh, kw, dw, C]
    return v.reshape(alpha * alpha, -1, x.shape[-1])


def input_transform_transpose(dv: Array, geometry: _Geometry, x_shape) -> Array:
    """The adjoint of `input_transform`: the input gradient from the transformed tiles'."""
    bt = _MATRICES[geometry.m][0]
    m, alpha, (kh, kw), (dh, dw) = geometry.m, geometry.alpha, geometry.tiles, geometry.dilation
    n, h, w, c = x_shape
    dv = dv.reshape(alpha, alpha, n, kh, dh, kw, dw, c)
    cols = _mix(bt.T, [dv[:, b] for b in range(alpha)], 5)  # [a, N, kh, dh, kw, k, dw, C]
    cols = _overlap_add(cols, 4, 5, m)  # [a, N, kh, dh, Bw, m, dw, C]
    rows = _mix(bt.T, [cols[a] for a in range(alpha)], 2)  # [N, kh, j, dh, Bw, m, dw, C]
    dx = _overlap_add(rows, 1, 2, m)  # [N, Bh, m, dh, Bw, m, dw, C]
    dx = dx.reshape(n, (kh + 1) * m * dh, (kw + 1) * m * dw, c)
    lo_h, lo_w = geometry.pad_lo
    return dx[:, lo_h : lo_h + h, lo_w : lo_w + w]


def kernel_transform(kernel: Array, m: int) -> Array:
    """`G g G^T` of a (3, 3, C, O) kernel: [alpha^2, C, O]."""
    g = _MATRICES[m][1]
    u = _mix(g, [kernel[i] for i in range(3)], 0)  # [a, 3, C, O]
    u = _mix(g, [u[:, j] for j in range(3)], 1)  # [a, b, C, O]
    return u.reshape(-1, *kernel.shape[2:])


def kernel_transform_transpose(du: Array, m: int) -> Array:
    """The adjoint of `kernel_transform`: the (3, 3, C, O) kernel gradient."""
    g = _MATRICES[m][1]
    alpha = m + 2
    du = du.reshape(alpha, alpha, *du.shape[1:])
    t = _mix(g.T, [du[:, b] for b in range(alpha)], 1)  # [a, 3, C, O]
    return _mix(g.T, [t[a] for a in range(alpha)], 0)  # [3, 3, C, O]


def output_transform(products: Array, geometry: _Geometry) -> Array:
    """`A^T M A` of every tile, interleaved back into [N, H_out, W_out, O]."""
    at = _MATRICES[geometry.m][2]
    m, alpha, (kh, kw), (dh, dw) = geometry.m, geometry.alpha, geometry.tiles, geometry.dilation
    o = products.shape[-1]
    products = products.reshape(alpha, alpha, -1, kh, dh, kw, dw, o)
    y = _mix(at, [products[a] for a in range(alpha)], 0)  # [i, b, N, kh, dh, kw, dw, O]
    y = _mix(at, [y[:, b] for b in range(alpha)], 5)  # [i, N, kh, dh, kw, k, dw, O]
    y = y.transpose(1, 2, 0, 3, 4, 5, 6, 7)  # [N, kh, i, dh, kw, k, dw, O]
    y = y.reshape(y.shape[0], kh * m * dh, kw * m * dw, o)
    return y[:, : geometry.out[0], : geometry.out[1]]


def output_transform_transpose(dy: Array, geometry: _Geometry) -> Array:
    """The adjoint of `output_transform`: [alpha^2, tiles, O] (tiles do not overlap)."""
    at = _MATRICES[geometry.m][2]
    m, alpha, (kh, kw), (dh, dw) = geometry.m, geometry.alpha, geometry.tiles, geometry.dilation
    n, ho, wo, o = dy.shape
    dyb = _pad_axis(_pad_axis(dy, 1, 0, kh * m * dh - ho), 2, 0, kw * m * dw - wo)
    dyb = dyb.reshape(n, kh, m, dh, kw, m, dw, o)
    dm = _mix(at.T, [dyb[:, :, i] for i in range(m)], 0)  # [a, N, kh, dh, kw, k, dw, O]
    dm = _mix(at.T, [dm[:, :, :, :, :, k] for k in range(m)], 1)  # [a, b, N, kh, dh, kw, dw, O]
    return dm.reshape(alpha * alpha, -1, o)


def _batched(lhs: Array, rhs: Array, lhs_contract: int, rhs_contract: int, precision) -> Array:
    """One matrix product per transform point (the leading axis)."""
    dims = (((lhs_contract,), (rhs_contract,)), ((0,), (0,)))
    return jax.lax.dot_general(lhs, rhs, dims, precision=precision)


def _channel_slices(x_shape, geometry: _Geometry) -> list[slice]:
    """Input-channel slices whose transformed inputs stay under `_MAX_TRANSFORMED_BYTES`."""
    n, channels = x_shape[0], x_shape[-1]
    tiles = n * math.prod(geometry.tiles) * math.prod(geometry.dilation)
    bytes_per_channel = geometry.alpha**2 * tiles * 4
    parts = -(-bytes_per_channel * channels // _MAX_TRANSFORMED_BYTES)
    size = -(-channels // parts)
    return [slice(start, min(start + size, channels)) for start in range(0, channels, size)]


def _winograd(x, kernel, geometry: _Geometry, precision) -> Array:
    u = kernel_transform(kernel, geometry.m)
    products = None
    for part in _channel_slices(x.shape, geometry):
        v = input_transform(x[..., part], geometry)
        product = _batched(v, u[:, part], 2, 1, precision)
        products = product if products is None else products + product
    return output_transform(products, geometry)


def minimal_filtering(x: Array, kernel: Array, dilation, padding, tile_size: int, precision=None):
    """The forward pass of `conv3x3` with F(tile_size x tile_size, 3 x 3) (2 or 4)."""
    if tile_size not in TILE_SIZES:
        raise ValueError(f'Winograd tile size must be one of {TILE_SIZES}, got {tile_size}.')
    return _winograd(x, kernel, _geometry(x.shape, dilation, padding, tile_size), precision)


def inference_tile_size(x_shape, dilation, padding) -> int:
    """F(4x4) unless its tiles cover much more padded area than F(2x2)'s."""
    area = {}
    for m in TILE_SIZES:
        geometry = _geometry(x_shape, dilation, padding, m)
        area[m] = np.prod([t * m * d for t, d in zip(geometry.tiles, dilation, strict=True)])
    return 4 if area[4] <= _MAX_F4_TILE_WASTE * area[2] else 2


def _direct(x, kernel, dilation, padding, precision) -> Array:
    return nhwc.lax_conv(x, kernel, (1, 1), padding, dilation, precision)


def _trains_by_winograd(x, kernel) -> bool:
    return pays(kernel.shape[2], kernel.shape[3], x.shape[1:3], 'training')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv3x3(x: Array, kernel: Array, dilation, padding, precision=None) -> Array:
    """A stride-1 3x3 convolution (NHWC, HWIO), by Winograd's minimal filtering on CPU.

    Other platforms (`platform.on_cpu`) convolve directly, with XLA's own gradients.

    Equal to `lax.conv_general_dilated(x, kernel, (1, 1), padding, rhs_dilation=dilation)`
    up to float32 rounding. The forward pass alone runs F(4x4) (or F(2x2), see
    `inference_tile_size`). Differentiated, it runs F(2x2) forward and backward where
    that pays in training (`pays(..., 'training')`): the kernel gradient is one product
    per transform point of the transformed input and the transformed output gradient,
    the input gradient the adjoint transforms of that gradient times the transformed
    kernel; elsewhere it differentiates the direct convolution (on CPU with its kernel
    gradient over the padded input, `kernel_gradient.kernel_grad`).

    Args:
      x: NHWC float32 input.
      kernel: (3, 3, C, O) float32 kernel.
      dilation: (dh, dw).
      padding: ((lo, hi), (lo, hi)), every value >= 0.
      precision: matmul precision.
    """
    tile_size = inference_tile_size(x.shape, dilation, padding)

    def transformed(x, kernel):
        return minimal_filtering(x, kernel, dilation, padding, tile_size, precision)

    return platform.on_cpu(
        transformed, functools.partial(_direct, **_static(dilation, padding, precision)), x, kernel
    )


def _static(dilation, padding, precision) -> dict:
    return {'dilation': dilation, 'padding': padding, 'precision': precision}


def _conv3x3_fwd(x, kernel, dilation, padding, precision):
    direct = functools.partial(_direct, **_static(dilation, padding, precision))
    if not _trains_by_winograd(x, kernel):
        return direct(x, kernel), (x, kernel)

    def transformed(x, kernel):
        return minimal_filtering(x, kernel, dilation, padding, 2, precision)

    return platform.on_cpu(transformed, direct, x, kernel), (x, kernel)


def _kernel_grad_product(v: Array, dm: Array, precision) -> Array:
    """Per transform point, v^T dm over the tiles: [alpha^2, C, O].

    The operand with fewer channels is transposed (inside the fusion that produces it)
    so that each product contracts its left operand's minor axis, the form YNNPACK runs;
    contracting the tile axes of both, XLA:CPU falls back to a much slower generic batched
    product.
    """
    if dm.shape[-1] > v.shape[-1]:
        return _batched(jnp.swapaxes(v, 1, 2), dm, 2, 1, precision)
    return jnp.swapaxes(_batched(jnp.swapaxes(dm, 1, 2), v, 2, 1, precision), 1, 2)


def _conv3x3_bwd(dilation, padding, precision, residuals, dy):
    x, kernel = residuals
    static = _static(dilation, padding, precision)

    def direct_vjp_on_cpu(x, kernel, dy):
        dx = jax.vjp(lambda x_: _direct(x_, kernel, **static), x)[1](dy)[0]
        return dx, kernel_gradient.kernel_grad(x, kernel, dy, padding, dilation, precision)

    on_cpu = (
        functools.partial(_transformed_vjp, **static)
        if _trains_by_winograd(x, kernel)
        else direct_vjp_on_cpu
    )
    by_xla = platform.vjp_of(functools.partial(_direct, **static))
    return platform.on_cpu(on_cpu, by_xla, x, kernel, dy)


def _transformed_vjp(x, kernel, dy, *, dilation, padding, precision):
    """The input and kernel gradients of `minimal_filtering` in F(2x2)."""
    geometry = _geometry(x.shape, dilation, padding, 2)
    # The transformed input (4x the input's size) and kernel (16/9 the kernel's) are
    # recomputed rather than saved, and kept apart from the forward pass's, which XLA:CPU
    # would otherwise keep alive from forward to backward, beside every activation. (A
    # backward rule must not ask the `plain_ops` switch: see `xla_cpu`.)
    x = xla_cpu.keep_recomputation_on_cpu(x)
    kernel = xla_cpu.keep_recomputation_on_cpu(kernel)
    u = kernel_transform(kernel, geometry.m)
    dm = output_transform_transpose(dy, geometry)
    du, dx = [], []
    for part in _channel_slices(x.shape, geometry):
        x_part = x[..., part]
        du.append(_kernel_grad_product(input_transform(x_part, geometry), dm, precision))
        dv = _batched(dm, u[:, part], 2, 2, precision)
        dx.append(input_transform_transpose(dv, geometry, x_part.shape))
    dx = jnp.concatenate(dx, axis=-1).astype(x.dtype)
    dkernel = kernel_transform_transpose(jnp.concatenate(du, axis=1), geometry.m)
    return dx, dkernel.astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
