"""Max pooling whose gradient needs no index tensors.

`nn.max_pool` lowers to XLA's `reduce_window`, whose gradient (`select_and_scatter`) the
CPU backend computes through int32 index tensors of the (padded) input's size, several
of them live at once: at the first pooling of a VGG16 U-Net they are among the largest
tensors of the train step, and they put its peak memory above PyTorch's (PyTorch keeps
one int64 index per output; `benchmarks/model_benchmark.py` measures both, results in
`docs/performance.md`). Here the gradient is recomputed from what the network keeps
anyway, the pooling's input and output: window position by window position, in row-major
order, the input is compared with the window's maximum and the output gradient is placed
where the first maximum sits. That is elementwise work XLA fuses, with nothing stored.
It runs on XLA:CPU only (`platform.on_cpu`); other platforms, and `plain_ops`, run
`nn.max_pool`, gradient and all.

The function is `nn.max_pool`'s, gradient included: each window's gradient goes to its
first maximum in row-major order, as `select_and_scatter` (and PyTorch) choose on ties,
such as windows of zeros after a ReLU. Non-overlapping windows give identical gradients;
overlapping ones (the ResNet stem's 3x3, stride 2) add their contributions up in another
order, which can differ in the last bit.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcn_unet_jax.ops import platform
from fcn_unet_jax.ops.switch import uses_plain_ops

Array = jax.Array
Pair = tuple[int, int]


def _pad(x: Array, padding: tuple[Pair, Pair]) -> Array:
    return jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)


def _max_pool_of_padded(x: Array, window: Pair, strides: Pair, padding) -> Array:
    return jax.lax.reduce_window(
        _pad(x, padding), -jnp.inf, jax.lax.max, (1, *window, 1), (1, *strides, 1), 'VALID'
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: Array, window: Pair, strides: Pair, padding: tuple[Pair, Pair]) -> Array:
    return platform.on_cpu(
        functools.partial(_max_pool_of_padded, window=window, strides=strides, padding=padding),
        functools.partial(nn.max_pool, window_shape=window, strides=strides, padding=padding),
        x,
    )


def _max_pool_fwd(x, window, strides, padding):
    y = _max_pool(x, window, strides, padding)
    return y, (x, y)


def _max_pool_bwd(window, strides, padding, residuals, dy):
    by_flax = functools.partial(nn.max_pool, window_shape=window, strides=strides, padding=padding)
    lean = functools.partial(_lean_gradient, window=window, strides=strides, padding=padding)
    return platform.on_cpu(lean, lambda x, y, dy: platform.vjp_of(by_flax)(x, dy), *residuals, dy)


def _lean_gradient(x, y, dy, window, strides, padding):
    x_pad = _pad(x, padding)
    _, height, width, _ = x_pad.shape
    _, out_h, out_w, _ = y.shape
    (sh, sw), zero = strides, jnp.zeros((), dy.dtype)
    dx_pad = jnp.zeros(x_pad.shape, dy.dtype)
    taken = jnp.zeros(y.shape, bool)
    for i in range(window[0]):
        for j in range(window[1]):
            # The inputs at window position (i, j) of every window: a strided slice.
            at_position = x_pad[
                :, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw
            ]
            first = (at_position == y) & ~taken
            taken = taken | first
            # Back to the input grid: rows i, i + sh, ... (interior padding sh - 1).
            dx_pad = dx_pad + jax.lax.pad(
                jnp.where(first, dy, zero),
                zero,
                (
                    (0, 0, 0),
                    (i, height - i - sh * (out_h - 1) - 1, sh - 1),
                    (j, width - j - sw * (out_w - 1) - 1, sw - 1),
                    (0, 0, 0),
                ),
            )
    (top, _), (left, _) = padding
    return (dx_pad[:, top : top + x.shape[1], left : left + x.shape[2]],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(
    x: Array, window: Pair, strides: Pair, padding: tuple[Pair, Pair] = ((0, 0), (0, 0))
) -> Array:
    """`nn.max_pool(x, window, strides, padding)` of an NHWC batch, with a lean gradient.

    Args:
      x: [N, H, W, C].
      window: (kh, kw).
      strides: (sh, sw).
      padding: ((top, bottom), (left, right)), padded with -inf.

    Returns:
      The pooled batch.
    """
    window, strides, padding = tuple(window), tuple(strides), tuple(map(tuple, padding))
    if uses_plain_ops():
        return nn.max_pool(x, window, strides, padding)
    return _max_pool(x, window, strides, padding)


def max_pool_2x2(x: Array, ceil_mode: bool = False) -> Array:
    """2x2 stride-2 max pooling, as VGG and the U-Net pool.

    Args:
      x: [N, H, W, C].
      ceil_mode: Caffe's ceil mode: an odd trailing row/column is pooled on its own (output
        side ceil(n / 2)); otherwise it is dropped (floor(n / 2), flax's 'VALID').

    Returns:
      The pooled batch.
    """
    h, w = x.shape[1:3]
    padding = ((0, h % 2), (0, w % 2)) if ceil_mode else ((0, 0), (0, 0))
    return max_pool(x, (2, 2), (2, 2), padding)
