"""The U-Net border weight map (Ronneberger et al., 2015, eq. 2), computed with NumPy/SciPy.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

w_c balances the class frequencies, d1 and d2 are the distances to the nearest and the
second-nearest object. The border term makes the thin background gaps between touching
objects expensive to get wrong, which is what teaches the network to separate them. The
input pipeline calls `border_weight_map` on each augmented crop (one `tf.numpy_function`
call per batch), so its CPU time is taken from the train step's cores: the
distances are kept as integer squared distances while the two nearest objects are
found, and the square root and the exponential run only on the pixels that get a border
term. That gives the values of a distance transform per object to the last bit: the
squared distances are exact integers either way, the square root is correctly rounded
and monotonic, so it commutes with taking the two smallest.
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
    for value in np.flatnonzero(np.bincount(label.ravel())):
        if value in (0, ignore_label):
            continue
        components, n = ndimage.label(label == value)
        np.add(components, count, out=objects, where=components > 0)
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
    if label.size and label.min() < 0:
        raise ValueError(f'label holds {label.min()}: class indices are 0 or more.')
    valid = label != ignore_label
    weights = np.zeros(label.shape, np.float64)
    if not valid.any():
        return weights.astype(np.float32).reshape(shape)

    if class_weights is None:
        counts = np.bincount(label[valid])
        present = counts > 0
        # 1 / (K f_c): each present class gets the same total weight, mean over pixels is 1.
        per_class = np.zeros(len(counts), np.float64)
        per_class[present] = counts[present].sum() / (np.count_nonzero(present) * counts[present])
        weights[valid] = per_class[label[valid]]
    else:
        table = np.asarray(class_weights, np.float64)
        if label[valid].max() >= len(table):
            raise ValueError(f'{len(table)} class weights, but label {label[valid].max()}.')
        weights[valid] = table[label[valid]]

    objects, count = _objects(label, instances, ignore_label)
    if count >= 2 and w0 > 0:
        margin = int(np.ceil(sigma * np.sqrt(-2.0 * np.log(_NEGLIGIBLE)))) + 1
        # Squared distances to the nearest and the second-nearest object; `far` = none yet.
        # int32 (half the memory traffic of int64) holds them below 32,768 px a side.
        dtype = np.int32 if 2 * max(label.shape) ** 2 < np.iinfo(np.int32).max else np.int64
        far = np.iinfo(dtype).max
        near = np.full(label.shape, far, dtype)
        second = np.full(label.shape, far, dtype)
        for index, box in enumerate(ndimage.find_objects(objects), start=1):
            if box is None:
                continue
            window = tuple(
                slice(max(s.start - margin, 0), min(s.stop + margin, n))
                for s, n in zip(box, label.shape, strict=True)
            )
            squared = _squared_distances(objects[window] != index, dtype)
            near_w, second_w = near[window], second[window]  # Views: updated in place.
            np.minimum(second_w, np.maximum(near_w, squared), out=second_w)
            np.minimum(near_w, squared, out=near_w)
        # Where a second object is in reach; elsewhere the term is exp(-inf) = 0.
        border = valid & (objects == 0) & (label == 0) & (second < far)
        d1 = np.sqrt(near[border].astype(np.float64))
        d2 = np.sqrt(second[border].astype(np.float64))
        weights[border] += w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
    return weights.astype(np.float32).reshape(shape)


def _squared_distances(outside: np.ndarray, dtype: type) -> np.ndarray:
    """Integer squared Euclidean distance from each pixel to the nearest False pixel."""
    nearest = ndimage.distance_transform_edt(
        outside, return_distances=False, return_indices=True
    ).astype(dtype, copy=False)
    rows = np.arange(outside.shape[0], dtype=dtype)[:, None]
    columns = np.arange(outside.shape[1], dtype=dtype)[None, :]
    return (nearest[0] - rows) ** 2 + (nearest[1] - columns) ** 2
