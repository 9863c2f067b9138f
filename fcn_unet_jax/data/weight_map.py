"""The U-Net border weight map (Ronneberger et al., 2015, eq. 2), computed with NumPy/SciPy.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

w_c balances the class frequencies, d1 and d2 are the distances to the nearest and the
second-nearest object. The border term makes the thin background gaps between touching
objects expensive to get wrong, which is what teaches the network to separate them. The
input pipeline calls `border_weight_map` on each augmented crop through
`tf.numpy_function`.
"""

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# Distances beyond which the border term is below this value (relative to w0) are not
# computed exactly: each object's distance transform only covers its bounding box grown by
# that margin, which keeps the cost proportional to the objects' size, not the image's.
_NEGLIGIBLE = 1e-6


def _objects(
    label: np.ndarray, instances: np.ndarray | None, ignore_label: int
) -> tuple[np.ndarray, int]:
    """Returns an object id map (0 = no object) and the number of objects."""
    if instances is not None:
        instances = np.asarray(instances)
        if instances.shape != label.shape:
            raise ValueError(f'instances {instances.shape} and label {label.shape} differ.')
        ids, objects = np.unique(instances, return_inverse=True)
        objects = objects.reshape(label.shape)
        if ids[0] != 0:  # No background id present: every id is an object.
            objects = objects + 1
        return objects, int(objects.max())
    objects = np.zeros(label.shape, np.int32)
    count = 0
    foreground = np.unique(label[(label != 0) & (label != ignore_label)])
    for value in foreground:
        components, n = ndimage.label(label == value)
        objects[components > 0] = components[components > 0] + count
        count += n
    return objects, count


def border_weight_map(
    label: np.ndarray,
    *,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: Sequence[float] | np.ndarray | None = None,
    instances: np.ndarray | None = None,
    ignore_label: int = 255,
) -> np.ndarray:
    """Computes the U-Net weight map of one label map.

    Objects are the instances of `instances` if given, else the connected components
    (4-connected) of each foreground class (every class but 0 and the ignore label). The
    border term is added on background pixels (class 0, outside every object): those are the
    separating gaps; inside an object d1 = 0 and the term would only blur its border.

    Args:
      label: integer `[H, W]` (or `[H, W, 1]`) class indices.
      w0: border weight.
      sigma: border width in pixels.
      class_weights: per-class weights w_c indexed by class; None = inverse class frequency
        in this label map, scaled so that the mean of w_c over non-ignored pixels is 1.
      instances: optional integer `[H, W]` instance ids, 0 = no instance.
      ignore_label: pixels with this label get weight 0.

    Returns:
      float32 weights with the shape of `label`.
    """
    label = np.asarray(label)
    shape = label.shape
    label = label.reshape(shape[:2]) if label.ndim == 3 else label
    if label.ndim != 2:
        raise ValueError(f'label must be [H, W] or [H, W, 1], got shape {shape}.')
    label = label.astype(np.int64)
    valid = label != ignore_label
    weights = np.zeros(label.shape, np.float64)
    if not valid.any():
        return weights.astype(np.float32).reshape(shape)

    if class_weights is None:
        classes, counts = np.unique(label[valid], return_counts=True)
        # 1 / (K f_c): each present class gets the same total weight, mean over pixels is 1.
        per_class = counts.sum() / (len(classes) * counts)
        weights[valid] = per_class[np.searchsorted(classes, label[valid])]
    else:
        table = np.asarray(class_weights, np.float64)
        if label[valid].max() >= len(table):
            raise ValueError(f'{len(table)} class weights, but label {label[valid].max()}.')
        weights[valid] = table[label[valid]]

    objects, count = _objects(label, instances, ignore_label)
    if count >= 2 and w0 > 0:
        margin = int(np.ceil(sigma * np.sqrt(-2.0 * np.log(_NEGLIGIBLE)))) + 1
        d1 = np.full(label.shape, np.inf)
        d2 = np.full(label.shape, np.inf)
        for index, box in enumerate(ndimage.find_objects(objects), start=1):
            if box is None:
                continue
            window = tuple(
                slice(max(s.start - margin, 0), min(s.stop + margin, n))
                for s, n in zip(box, label.shape, strict=True)
            )
            distance = ndimage.distance_transform_edt(objects[window] != index)
            near, second = d1[window], d2[window]
            d2[window] = np.minimum(second, np.maximum(near, distance))
            d1[window] = np.minimum(near, distance)
        background = valid & (objects == 0) & (label == 0)
        border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
        weights[background] += border[background]
    return weights.astype(np.float32).reshape(shape)
