"""FCN's 100-pixel padding without convolving its constant middle (`stem_with_constant_margin`).

FCN-VGG16 pads conv1_1's input by 100 zeros on every side (so that fc6's 7x7 VALID conv sees
enough context at any input size). For a 128 px crop the first block then convolves a
326 x 326 map of which only the middle 130 x 130 depends on the image: away from the image
and from the canvas border, every position of every later map of blocks 1 to 3 sees only
zeros and the same biases, so it holds one value per channel (ReLU(bias) after conv1_1,
then what the next convolution makes of that constant, ...). Only two bands are not
constant: the one the image reaches (growing by one position per 3x3 conv) and the one the
canvas border's zero padding reaches (growing inwards the same way). Between them lies a
margin of identical columns (and rows), 47 wide after pool1, 21 after pool2, 7 after pool3
for FCN's pad of 100, and gone after pool4.

The trimmed stem convolves a canvas with most of that margin left out: conv1_1 pads by less
than 100 (8 instead of 100 on the left), and after each pooling the margin is cut or
widened to what the next block needs, by deleting columns or repeating one of its constant
columns. The maps that leave the stem (each block's pooled output, at the geometry the
plain stem gives) get their full margin back the same way. Cutting and repeating constant
columns is exact for any parameters, so the function, and with it its gradient, equals the
plain stem's; only the float rounding of sums differs (a constant column's gradient is
summed once over its repeats rather than position by position). The cut is even at every
level so that the 2x2 pooling grid, and its ceil-mode odd last column, stay where they were.

For FCN-8s at 1/16 width on 128 px crops, blocks 1 to 3 shrink from 326/163/82 to
142/83/58 positions a side, and the train step takes less than half as long
(`benchmarks/profile_train_step.py`, results in `docs/performance.md`). Like every
rewrite of this package it runs on CPU only (`platform.on_cpu`), and not at all under
`plain_ops`; a program lowered for a GPU or TPU convolves the full canvas.

The geometry (`plan_axis`) follows each axis through the stem with interval arithmetic:
which positions the image reaches, which the border reaches, and the constant gap between
them, with the ceil-mode pool's lone last column counted as border (conservatively).
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fcn_unet_jax.ops import platform
from fcn_unet_jax.ops.switch import uses_plain_ops

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Extent:
    """One axis of a map of the plain stem: its length, the positions the image reaches
    ([data_start, data_end]), the last position the left border reaches (-1: none) and the
    first one the right border reaches (length: none)."""

    length: int
    data_start: int
    data_end: int
    left_border_end: int
    right_border_start: int

    @property
    def left_gap(self) -> int:
        return self.data_start - self.left_border_end - 1

    @property
    def right_gap(self) -> int:
        return self.right_border_start - self.data_end - 1


def _padded_conv(size: int, pad: int) -> _Extent:
    # conv1_1: 3x3 VALID over the input padded by `pad`; output i reads padded [i, i + 2].
    # Its own padding is the zeros being trimmed, so no border band starts here.
    length = size + 2 * pad - 2
    return _Extent(length, max(pad - 2, 0), min(pad + size - 1, length - 1), -1, length)


def _conv3x3(e: _Extent) -> _Extent:
    # A 3x3 conv padded by 1: each band grows by one position; the zero padding at -1 and
    # at `length` starts (or widens) the border bands.
    return _Extent(
        e.length,
        max(e.data_start - 1, 0),
        min(e.data_end + 1, e.length - 1),
        e.left_border_end + 1,
        e.right_border_start - 1,
    )


def _pool2x2_ceil(e: _Extent) -> _Extent:
    length = math.ceil(e.length / 2)
    right = e.right_border_start // 2
    if e.length % 2:  # The lone last column's window holds padding: count it as border.
        right = min(right, length - 1)
    left = e.left_border_end // 2 if e.left_border_end >= 0 else -1
    return _Extent(length, e.data_start // 2, e.data_end // 2, left, right)


def _even_at_most(value: int) -> int:
    return max(0, value - value % 2)


@dataclasses.dataclass(frozen=True)
class AxisPlan:
    """How one axis of the stem is trimmed.

    Attributes:
      cut: per block b, the (left, right) positions left out of block b's input relative to
        the plain stem; cut[0] reduces conv1_1's padding. Even, so the pooling grid stays.
      extents: per block b, the plain stem's extent of block b's pooled output.
    """

    cut: tuple[tuple[int, int], ...]
    extents: tuple[_Extent, ...]

    @property
    def trims(self) -> bool:
        return any(any(c) for c in self.cut)


def plan_axis(size: int, pad: int, convs_per_block: Sequence[int]) -> AxisPlan:
    """An exact trim of one axis of a `size`-long input (see the module docstring).

    Each cut is the largest that the bands, as computed here, allow; they are conservative
    by up to one pooled position, so a cut may fall up to 2 positions short of the largest.

    Args:
      size: the input's length on this axis.
      pad: conv1_1's padding (100 in FCN).
      convs_per_block: 3x3 convs of each block, each block ending in a 2x2 ceil-mode pool.
    """
    extents = []
    extent = None
    for b, n_convs in enumerate(convs_per_block):
        for i in range(n_convs):
            extent = _padded_conv(size, pad) if (b, i) == (0, 0) else _conv3x3(extent)
        extent = _pool2x2_ceil(extent)
        extents.append(extent)
    cut = []
    for b, out in enumerate(extents):
        # Cutting c (even) positions from block b's input cuts c / 2 from its pooled output,
        # whose constant gap must keep at least one column to be widened again.
        left = _even_at_most(2 * (out.left_gap - 1))
        right = _even_at_most(2 * (out.right_gap - 1))
        if b == 0:
            left, right = min(left, _even_at_most(pad)), min(right, _even_at_most(pad))
        else:
            # The cut is made in block b's input, whose own gap must keep a column too.
            before = extents[b - 1]
            left = min(left, _even_at_most(before.left_gap - 1))
            right = min(right, _even_at_most(before.right_gap - 1))
        cut.append((left, right))
    return AxisPlan(tuple(cut), tuple(extents))


def _resize_margin(x: Array, axis: int, extent: _Extent, now: tuple[int, int], to: tuple[int, int]):
    """Changes the positions cut from `x`'s margins along `axis` from `now` to `to`.

    `x` is a map of extent `extent` (plain stem) with now[0] / now[1] positions cut from its
    left / right constant gaps; a cut shrinks by repeating the gap's first (last) column,
    grows by deleting gap columns.
    """
    for side in (1, 0):  # Right first: the left side's changes move right positions.
        change = now[side] - to[side]
        if change == 0:
            continue
        length = x.shape[axis]
        if side == 0:
            keep = extent.left_border_end + 1  # The gap's first column, in x's positions.
        else:
            keep = length - (extent.length - extent.right_border_start) - 1  # Its last.
        before = jax.lax.slice_in_dim(x, 0, keep, axis=axis)
        column = jax.lax.slice_in_dim(x, keep, keep + 1, axis=axis)
        if change > 0:  # Repeat the constant column `change` more times.
            shape = list(x.shape)
            shape[axis] = change + 1
            middle = jnp.broadcast_to(column, shape)
            after = jax.lax.slice_in_dim(x, keep + 1, length, axis=axis)
        else:  # Delete -change constant columns next to the kept one.
            middle = column
            if side == 0:
                after = jax.lax.slice_in_dim(x, keep + 1 - change, length, axis=axis)
            else:
                before = jax.lax.slice_in_dim(x, 0, keep + change, axis=axis)
                after = jax.lax.slice_in_dim(x, keep + 1, length, axis=axis)
        x = jnp.concatenate([before, middle, after], axis=axis)
    return x


def stem_with_constant_margin(
    block: Callable[[int, Array, Any, tuple[tuple[int, int], tuple[int, int]]], Array],
    images: Array,
    params: Any,
    pad: int,
    convs_per_block: Sequence[int],
) -> list[Array]:
    """Runs a padded VGG-style stem, on CPU without the constant middle of its padding.

    Args:
      block: `block(b, x, params, padding)` runs block b (its 3x3 convs and the 2x2
        ceil-mode pool) on NHWC `x`; `padding` is the first conv's ((top, bottom), (left,
        right)) padding for b = 0 and unused otherwise. A pure function of its arrays.
      images: the stem's NHWC input.
      params: the parameters `block` reads (differentiable).
      pad: the first conv's padding in the plain stem (on every side).
      convs_per_block: 3x3 convs of each block.

    Returns:
      Each block's pooled output, as the plain stem computes them.
    """

    def plain(images, params):
        outputs, x = [], images
        for b in range(len(convs_per_block)):
            x = block(b, x, params, ((pad, pad), (pad, pad)))
            outputs.append(x)
        return outputs

    plans = [plan_axis(n, pad, convs_per_block) for n in images.shape[1:3]]
    if uses_plain_ops() or not any(plan.trims for plan in plans):
        return plain(images, params)

    def trimmed(images, params):
        outputs, x = [], images
        first = tuple((pad - plan.cut[0][0], pad - plan.cut[0][1]) for plan in plans)
        for b in range(len(convs_per_block)):
            x = block(b, x, params, first)
            full = x
            for axis, plan in zip((1, 2), plans, strict=True):
                # Block b's input had cut[b]; its pooled output has half that cut.
                now = (plan.cut[b][0] // 2, plan.cut[b][1] // 2)
                extent = plan.extents[b]
                full = _resize_margin(full, axis, extent, now, (0, 0))
                if b + 1 < len(convs_per_block):
                    x = _resize_margin(x, axis, extent, now, plan.cut[b + 1])
            outputs.append(full)
        return outputs

    return platform.on_cpu(trimmed, plain, images, params)
