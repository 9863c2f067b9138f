"""Confusion matrix and the FCN paper's metric set (section 5), plus Dice.

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
"""

import jax
import jax.numpy as jnp
import numpy as np


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
