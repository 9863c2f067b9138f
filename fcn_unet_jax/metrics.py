"""Confusion matrix and the FCN paper's metric set (section 5), plus Dice and boundary metrics.

`confusion_matrix` is jit-safe: inside a jitted eval step over a sharded global batch its
sum already covers every device and process. Accumulate the per-batch matrices on the host
in int64 (`np.add`) so whole-split counts cannot overflow; `scores` turns the total into
the metrics.

With n_ij the number of pixels of class i predicted as j, t_i = sum_j n_ij and
p_j = sum_i n_ij:
  pixel accuracy      sum_i n_ii / sum_i t_i
  mean accuracy       mean_i n_ii / t_i
  mean IoU            mean_i n_ii / (t_i + p_i - n_ii)
  frequency-weighted  (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + p_i - n_ii)
  Dice                2 n_ii / (t_i + p_i)
A class absent from both ground truth and prediction has an undefined (NaN) per-class
value and is left out of the means, as the FCN reference `score.py` does with `nanmean`;
a class absent from the ground truth but predicted has IoU and Dice 0 and no accuracy.

Boundary metrics (`segmentation_counts` gathers every count in one jit-safe call,
`scores_from_counts` turns the dataset's sums into all metrics):

* Boundary IoU (Cheng, Girshick, Dollár, Berg, Kirillov, CVPR 2021), per class c with
  G = {label == c} and P = {prediction == c}:
  |(G_d ∩ G) ∩ (P_d ∩ P)| / |(G_d ∩ G) ∪ (P_d ∩ P)|, where X_d ∩ X is the inner band of
  X: its pixels within Chebyshev distance d of a pixel outside X. As in the authors'
  `mask_to_boundary` (an erosion by a 3x3 square, d times, of the mask padded with zeros),
  pixels outside the image count as outside X, so a mask cut by the border has a band
  along it, and d = max(1, round(0.02 * image diagonal)), per image. Intersections and
  unions are summed over the whole split per class before the ratio (as mean IoU sums the
  confusion matrix); classes whose union is empty are left out of the mean.
* Trimap accuracy and mean IoU (Kohli, Ladický, Torr, IJCV 2009; the "trimap" of DeepLab):
  the pixel accuracy and the mean IoU of the pixels within Chebyshev distance w of a pixel
  of another ground-truth label, for each w in `TRIMAP_WIDTHS`; a band of w pixels on each
  side of every ground-truth boundary.

Ignore label and eval padding: pixels with the ignore label (or outside `mask`) are never
counted. For the bands, an ignored pixel is a pixel of another label (VOC's 255 marks the
object outlines, so the trimap follows them as DeepLab's does) and predictions on it still
shape P; the eval padding (mask False) is treated like the outside of the image, so a
padded image scores as the image alone. The bands are erosions and window maxima/minima:
everything runs inside the jitted eval step. On CPU the Boundary IoU bands come from the
window extremes of the label and prediction maps (a pixel is in its class's band iff its
square holds another value), one map per image; elsewhere from box sums (cumulative sums)
of each class's mask, C times the work, which is the form measured there. Both give the
same counts.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fcn_unet_jax.ops.platform import on_cpu

# Cheng et al.'s default: d = 2% of the image diagonal.
BOUNDARY_DILATION_RATIO = 0.02
# Band half-widths (pixels) of the trimap metrics: 1 px to the scale of small objects.
TRIMAP_WIDTHS = (1, 2, 4, 8, 16)
# Keys of `segmentation_counts`; the host sums each over the split (int64).
COUNT_KEYS = ('confusion', 'boundary_intersection', 'boundary_union', 'trimap_confusion')


def confusion_matrix(
    labels: jax.Array,
    preds: jax.Array,
    num_classes: int,
    ignore_label: int = 255,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Confusion matrix of one batch; rows are ground truth, columns predictions.

    Args:
      labels: integer ground truth, any shape.
      preds: integer predictions, same shape as `labels`.
      num_classes: number of classes C.
      ignore_label: label value left out (as are labels outside [0, C)).
      mask: optional bool array, same shape; False pixels (eval padding) are left out.

    Returns:
      [C, C] int32 counts.
    """
    labels = labels.astype(jnp.int32)
    preds = preds.astype(jnp.int32)
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    valid &= (preds >= 0) & (preds < num_classes)
    if mask is not None:
        valid &= mask.astype(bool)
    index = jnp.where(valid, labels * num_classes + preds, 0)
    counts = jnp.bincount(
        index.ravel(), weights=valid.ravel().astype(jnp.int32), length=num_classes**2
    )
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def scores(confusion: np.ndarray) -> dict[str, float | list[float]]:
    """The FCN metric set and Dice from a (summed) confusion matrix.

    Args:
      confusion: [C, C] counts, rows ground truth, columns predictions.

    Returns:
      Dict with floats `pixel_accuracy`, `mean_accuracy`, `mean_iou`,
      `frequency_weighted_iou`, `dice` (mean over classes) and lists of C floats
      `per_class_iou`, `per_class_accuracy`, `per_class_dice` (NaN where undefined). Every
      value is NaN when the matrix is empty (every pixel ignored).
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    diag = np.diag(confusion)
    gt_total = confusion.sum(axis=1)
    pred_total = confusion.sum(axis=0)
    union = gt_total + pred_total - diag
    total = confusion.sum()
    with np.errstate(divide='ignore', invalid='ignore'):
        per_class_accuracy = diag / gt_total
        per_class_iou = diag / union
        per_class_dice = 2 * diag / (gt_total + pred_total)
        pixel_accuracy = diag.sum() / total
        present = gt_total > 0
        fw_iou = (gt_total[present] * per_class_iou[present]).sum() / total

    def nanmean(values: np.ndarray) -> float:
        finite = values[~np.isnan(values)]
        return float(finite.mean()) if finite.size else float('nan')

    return {
        'pixel_accuracy': float(pixel_accuracy),
        'mean_accuracy': nanmean(per_class_accuracy),
        'mean_iou': nanmean(per_class_iou),
        'frequency_weighted_iou': float(fw_iou),
        'dice': nanmean(per_class_dice),
        'per_class_iou': [float(v) for v in per_class_iou],
        'per_class_accuracy': [float(v) for v in per_class_accuracy],
        'per_class_dice': [float(v) for v in per_class_dice],
    }


def boundary_dilation(height: int, width: int, ratio: float = BOUNDARY_DILATION_RATIO) -> int:
    """Band width d of Boundary IoU for an image: max(1, round(ratio * diagonal)) pixels."""
    return max(1, int(round(ratio * float(np.hypot(height, width)))))


def _as_batch(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return x[None] if x.ndim == 2 else x


def _box_sum(x: jax.Array, radius: jax.Array) -> jax.Array:
    """Sums x [B, H, W, C] over the (2r+1)^2 square around each pixel; 0 outside the image.

    `radius` [B] may differ per image (a traced value): prefix sums and a gather at
    `i - r` and `i + r + 1` along each axis cost the same for any r, where a max pool would
    need a static window.
    """
    for axis in (1, 2):
        n = x.shape[axis]
        zero = jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis))
        prefix = jnp.concatenate([zero, jnp.cumsum(x, axis=axis)], axis=axis)
        index = jnp.arange(n)[None, :]
        r = radius[:, None]
        shape = [x.shape[0], 1, 1, 1]
        shape[axis] = n
        high = jnp.clip(index + r + 1, 0, n).reshape(shape)
        low = jnp.clip(index - r, 0, n).reshape(shape)
        x = jnp.take_along_axis(prefix, high, axis=axis) - jnp.take_along_axis(
            prefix, low, axis=axis
        )
    return x


def _inner_band(inside: jax.Array, radius: jax.Array) -> jax.Array:
    """X_d ∩ X of bool masks [B, H, W, C]: pixels of X within distance d of a pixel outside.

    A pixel stays in the erosion of X iff its whole (2d+1)^2 square is in X; the square of a
    pixel within d of the border leaves the image and is not, so the border bounds X.
    """
    side = 2 * radius + 1
    count = _box_sum(inside.astype(jnp.int32), radius)
    return inside & (count < (side * side)[:, None, None, None])


def _image_dilation(valid_area: jax.Array, ratio: float) -> jax.Array:
    """Per-image d from the height and width of each image's real pixels [B, H, W]."""
    height = valid_area.any(axis=2).sum(axis=1).astype(jnp.float32)
    width = valid_area.any(axis=1).sum(axis=1).astype(jnp.float32)
    diagonal = jnp.sqrt(height**2 + width**2)
    return jnp.maximum(1, jnp.round(ratio * diagonal)).astype(jnp.int32)


def boundary_iou_counts(
    labels: jax.Array,
    preds: jax.Array,
    num_classes: int,
    ignore_label: int = 255,
    mask: jax.Array | None = None,
    dilation_ratio: float = BOUNDARY_DILATION_RATIO,
) -> tuple[jax.Array, jax.Array]:
    """Per-class Boundary IoU intersections and unions of a batch (see the module docstring).

    Two exact forms of the same counts: on CPU `_boundary_counts_by_windows`, elsewhere
    `_boundary_counts_by_box_sums` (the faster form is only measured on CPU; see
    `ops/platform.py`).

    Args:
      labels: integer ground truth [B, H, W] (or one image [H, W]).
      preds: integer predictions, same shape.
      num_classes: number of classes C.
      ignore_label: label value that is not counted.
      mask: optional bool [B, H, W]; False pixels (eval padding) are outside the image.
      dilation_ratio: d as a fraction of each image's diagonal (of its mask's extent).

    Returns:
      (intersection, union): int32 [C] pixel counts, summed over the batch.
    """
    labels, preds = _as_batch(labels).astype(jnp.int32), _as_batch(preds).astype(jnp.int32)
    area = jnp.ones(labels.shape, bool) if mask is None else _as_batch(mask).astype(bool)
    # d of an image is at most that of the whole array; + 1 for float rounding at a .5.
    max_radius = boundary_dilation(*labels.shape[1:], dilation_ratio) + 1
    counted = area & (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    return on_cpu(
        lambda *args: _boundary_counts_by_windows(*args, num_classes, max_radius),
        lambda *args: _boundary_counts_by_box_sums(*args, num_classes),
        labels,
        preds,
        area,
        counted,
        _image_dilation(area, dilation_ratio),
    )


def _boundary_counts_by_box_sums(
    labels: jax.Array,
    preds: jax.Array,
    area: jax.Array,
    counted: jax.Array,
    radius: jax.Array,
    num_classes: int,
) -> tuple[jax.Array, jax.Array]:
    """`boundary_iou_counts` from each class mask's erosion, counted by box sums.

    `area`: the images' real pixels; `counted`: those with a label in [0, C) that is not
    the ignore label; `radius`: each image's d.
    """
    classes = jnp.arange(num_classes)
    truth = _inner_band((labels[..., None] == classes) & area[..., None], radius)
    predicted = _inner_band((preds[..., None] == classes) & area[..., None], radius)
    counted = counted[..., None]
    intersection = (truth & predicted & counted).sum(axis=(0, 1, 2), dtype=jnp.int32)
    union = ((truth | predicted) & counted).sum(axis=(0, 1, 2), dtype=jnp.int32)
    return intersection, union


def _in_inner_band(values: jax.Array, radius: jax.Array, max_radius: int) -> jax.Array:
    """Bool [B, H, W]: pixels whose square of radius d (their image's) holds another value or
    leaves the array; `values` [B, H, W] int32, with -1 outside the image's area.

    A pixel of class c is in the inner band of its class mask X iff its square is not
    inside X: it reaches a pixel of another value (another label, the ignore label or -1
    outside the area, where the square's max and min differ) or the array's edge. One label
    map per image instead of one mask per class; the squares grow a pixel at a time to the
    largest d, each image keeping the answer at its own d.
    """
    height, width = values.shape[1:]
    r = radius[:, None, None]
    high = low = values
    impure = jnp.zeros(values.shape, bool)
    for k in range(1, max_radius + 1):
        high = _window_extreme(high, 1, maximum=True)
        low = _window_extreme(low, 1, maximum=False)
        impure = jnp.where(r == k, high != low, impure)
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    return impure | (rows < r) | (rows >= height - r) | (cols < r) | (cols >= width - r)


def _boundary_counts_by_windows(
    labels: jax.Array,
    preds: jax.Array,
    area: jax.Array,
    counted: jax.Array,
    radius: jax.Array,
    num_classes: int,
    max_radius: int,
) -> tuple[jax.Array, jax.Array]:
    """`boundary_iou_counts` from the window extremes of the label and prediction maps.

    A pixel lies in one class mask of each map (its label's, its prediction's), so the
    band of that mask at the pixel is all there is to count: intersection_c counts pixels
    labelled and predicted c in both bands, union_c the labelled-c pixels in the truth band
    plus the predicted-c ones in the prediction band, less the intersection.
    """
    truth = counted & _in_inner_band(jnp.where(area, labels, -1), radius, max_radius)
    predicted = (
        counted
        & (preds >= 0)
        & (preds < num_classes)
        & _in_inner_band(jnp.where(area, preds, -1), radius, max_radius)
    )

    def per_class(where: jax.Array, classes: jax.Array) -> jax.Array:
        index = jnp.where(where, classes, num_classes).ravel()  # C: not counted.
        return jnp.bincount(index, length=num_classes + 1)[:num_classes].astype(jnp.int32)

    intersection = per_class(truth & predicted & (labels == preds), labels)
    union = per_class(truth, labels) + per_class(predicted, preds) - intersection
    return intersection, union


def _window_extreme(x: jax.Array, half_width: int, maximum: bool) -> jax.Array:
    """Max (or min) of x [B, H, W] over the (2w+1)^2 square around each pixel, in the image."""
    op = jax.lax.max if maximum else jax.lax.min
    info = jnp.iinfo(x.dtype)
    init = info.min if maximum else info.max  # The padding value: never the extreme.
    size = 2 * half_width + 1
    for window in ((1, size, 1), (1, 1, size)):  # A square is two 1-D windows.
        padding = [((s - 1) // 2, (s - 1) // 2) for s in window]
        x = jax.lax.reduce_window(x, jnp.array(init, x.dtype), op, window, (1, 1, 1), padding)
    return x


def trimap_bands(
    labels: jax.Array, widths: Sequence[int] = TRIMAP_WIDTHS, mask: jax.Array | None = None
) -> jax.Array:
    """Bool [len(widths), B, H, W]: pixels within distance w of a pixel of another label.

    Args:
      labels: integer ground truth [B, H, W] (or [H, W]); the ignore label is a label here.
      widths: band half-widths w in pixels.
      mask: optional bool [B, H, W]; False pixels (eval padding) are outside the image.
    """
    labels = _as_batch(labels).astype(jnp.int32)
    area = jnp.ones(labels.shape, bool) if mask is None else _as_batch(mask).astype(bool)
    info = jnp.iinfo(jnp.int32)
    high = jnp.where(area, labels, info.min)  # Padding never wins the max nor the min.
    low = jnp.where(area, labels, info.max)
    bands, done = {}, 0
    # Widening in steps: a (2a+1) then a (2b+1) window make a (2(a+b)+1) one, so the widths
    # cost 2 max(w) + len(w) window taps per axis rather than sum(2w + 1).
    for width in sorted(set(widths)):
        high = _window_extreme(high, width - done, maximum=True)
        low = _window_extreme(low, width - done, maximum=False)
        bands[width] = (high > labels) | (low < labels)
        done = width
    return jnp.stack([bands[w] for w in widths])


def segmentation_counts(
    labels: jax.Array,
    preds: jax.Array,
    num_classes: int,
    ignore_label: int = 255,
    mask: jax.Array | None = None,
    *,
    dilation_ratio: float = BOUNDARY_DILATION_RATIO,
    trimap_widths: Sequence[int] = TRIMAP_WIDTHS,
) -> dict[str, jax.Array]:
    """Every count of the metric set for one batch (jit-safe; sum them over the split).

    Args:
      labels: integer ground truth [B, H, W] (or [H, W]).
      preds: integer predictions, same shape.
      num_classes: number of classes C.
      ignore_label: label value that is not counted.
      mask: optional bool [B, H, W]; False pixels (eval padding) are outside the image.
      dilation_ratio: Boundary IoU's d as a fraction of the image diagonal.
      trimap_widths: the trimap band half-widths in pixels.

    Returns:
      int32 arrays: `confusion` [C, C], `boundary_intersection` and `boundary_union` [C],
      `trimap_confusion` [len(trimap_widths), C, C] (the confusion matrix of each band).
    """
    labels, preds = _as_batch(labels), _as_batch(preds)
    mask = None if mask is None else _as_batch(mask).astype(bool)
    intersection, union = boundary_iou_counts(
        labels, preds, num_classes, ignore_label, mask, dilation_ratio
    )
    bands = trimap_bands(labels, trimap_widths, mask)
    # One confusion matrix per band, counted as a single [W * C, C] matrix whose row index
    # is (band, label): one scatter instead of one per width. Ignored and padded pixels are
    # already -1 here, so no row index can be mistaken for the ignore label.
    band_index = jnp.arange(len(trimap_widths))[:, None, None, None]
    keep = jnp.where(bands, labels[None], -1)  # -1: outside the band, never counted.
    if mask is not None:
        keep = jnp.where(mask[None], keep, -1)
    keep = jnp.where((keep >= 0) & (keep < num_classes), band_index * num_classes + keep, -1)
    trimap = confusion_matrix(
        keep, jnp.broadcast_to(preds, keep.shape), len(trimap_widths) * num_classes, -1
    )[:, :num_classes].reshape(len(trimap_widths), num_classes, num_classes)
    return {
        'confusion': confusion_matrix(labels, preds, num_classes, ignore_label, mask),
        'boundary_intersection': intersection,
        'boundary_union': union,
        'trimap_confusion': trimap,
    }


def zero_counts(num_classes: int, num_widths: int = len(TRIMAP_WIDTHS)) -> dict[str, np.ndarray]:
    """int64 zeros shaped like `segmentation_counts`' output: the host's running sums."""
    c = num_classes
    return {
        'confusion': np.zeros((c, c), np.int64),
        'boundary_intersection': np.zeros(c, np.int64),
        'boundary_union': np.zeros(c, np.int64),
        'trimap_confusion': np.zeros((num_widths, c, c), np.int64),
    }


def boundary_scores(
    counts: Mapping[str, np.ndarray], trimap_widths: Sequence[int] = TRIMAP_WIDTHS
) -> dict[str, float | list[float]]:
    """Boundary IoU and the trimap metrics from a split's summed `segmentation_counts`.

    Args:
      counts: `boundary_intersection`, `boundary_union` and `trimap_confusion` summed
        over the split.
      trimap_widths: the widths `trimap_confusion` was counted with, in its order.

    Returns:
      `boundary_iou` (mean over classes with a non-empty union), `per_class_boundary_iou`
      (C floats, NaN where the union is empty) and, for each width w,
      `trimap_accuracy_{w}px` and `trimap_mean_iou_{w}px` (NaN for an empty band).
    """
    intersection = np.asarray(counts['boundary_intersection'], np.float64)
    union = np.asarray(counts['boundary_union'], np.float64)
    with np.errstate(divide='ignore', invalid='ignore'):
        per_class = intersection / union
    finite = per_class[~np.isnan(per_class)]
    result: dict[str, float | list[float]] = {
        'boundary_iou': float(finite.mean()) if finite.size else float('nan'),
        'per_class_boundary_iou': [float(v) for v in per_class],
    }
    trimap = np.asarray(counts['trimap_confusion'])
    if len(trimap) != len(trimap_widths):
        raise ValueError(f'{len(trimap)} trimap matrices for widths {tuple(trimap_widths)}.')
    for width, confusion in zip(trimap_widths, trimap, strict=True):
        band = scores(confusion)
        result[f'trimap_accuracy_{width}px'] = band['pixel_accuracy']
        result[f'trimap_mean_iou_{width}px'] = band['mean_iou']
    return result


def scores_from_counts(
    counts: Mapping[str, np.ndarray], trimap_widths: Sequence[int] = TRIMAP_WIDTHS
) -> dict[str, float | list[float]]:
    """The whole metric set: `scores(counts['confusion'])` plus `boundary_scores(counts)`."""
    return scores(counts['confusion']) | boundary_scores(counts, trimap_widths)
