"""A split's decoded images and masks held in host memory, read by index inside tf.data.

The train stream reads examples by index, so a run of E epochs decodes every image E times:
about 10 times in each skip ablation run, where decoding a 256 px PNG pair costs about
3.5 ms of CPU that the train step would otherwise have (docs/performance.md). With
`config.input.cache_decoded` the split is decoded once, in parallel, into one flat buffer
per feature; the pipeline then slices an example out of it. The pixels are the ones the
decoder yields, so every batch is the same as without the cache.

The cache is meant for splits that fit in memory many times over (the synthetic datasets,
small medical sets): the decoded size is known from the image headers before anything is
decoded, and a split above `MAX_FRACTION_OF_MEMORY` of the machine's memory is refused with
a one-line error. One split is kept per process, so the runs of a sweep, which all read the
same split, decode it once.
"""

import dataclasses
import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from fcn_unet_jax import errors

# The features the train stream reads.
FEATURES = ('image', 'segmentation_mask')
# A split whose decoded size exceeds this fraction of physical memory is not cached.
MAX_FRACTION_OF_MEMORY = 0.25
# Examples decoded per `numpy_function` read while the cache is filled.
_READ_BATCH = 64


@dataclasses.dataclass(frozen=True)
class _Feature:
    """One feature of every example, concatenated.

    Attributes:
      flat: 1-D tensor, the examples' values one after the other (row-major each).
      offsets: int64 `[n + 1]`: example i is `flat[offsets[i]:offsets[i + 1]]`.
      shapes: int64 `[n, rank]`: the shape of each example's value.
      static_shape: the feature's shape with None where it varies between examples.
    """

    flat: tf.Tensor
    offsets: tf.Tensor
    shapes: tf.Tensor
    static_shape: tuple[int | None, ...]


class DecodedSplit:
    """The decoded `FEATURES` of every example of one split."""

    def __init__(self, features: dict[str, _Feature]):
        self._features = features

    def lookup(self, index: tf.Tensor) -> dict[str, tf.Tensor]:
        """The decoded features of example `index`, a scalar int64 tensor (inside tf.data)."""
        result = {}
        for name, feature in self._features.items():
            start, stop = feature.offsets[index], feature.offsets[index + 1]
            value = tf.reshape(feature.flat[start:stop], feature.shapes[index])
            value.set_shape(feature.static_shape)
            result[name] = value
        return result


def _decoded_nbytes(builder: tfds.core.DatasetBuilder, sizes: np.ndarray) -> int:
    """Bytes of the decoded FEATURES, from the images' `[n, 2]` (height, width)."""
    pixels = int(np.prod(sizes, axis=1).sum())
    per_pixel = 0
    for name in FEATURES:
        feature = builder.info.features[name]
        channels = int(np.prod([d for d in feature.shape[2:] if d is not None] or [1]))
        per_pixel += channels * np.dtype(feature.np_dtype).itemsize
    return pixels * per_pixel


def _physical_memory() -> int:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def _decode_all(
    num_examples: int,
    read: Callable[[tf.Tensor], tf.Tensor],
    decode: Callable[[tf.Tensor], dict[str, tf.Tensor]],
) -> dict[str, list[np.ndarray]]:
    """Every example's FEATURES, decoded in parallel by tf.data, in index order."""
    ds = tf.data.Dataset.range(num_examples).batch(_READ_BATCH).map(read).unbatch()
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    values: dict[str, list[np.ndarray]] = {name: [] for name in FEATURES}
    for example in ds.as_numpy_iterator():
        for name in FEATURES:
            values[name].append(example[name])
    return values


def _concatenate(builder: tfds.core.DatasetBuilder, name: str, values: list[np.ndarray]):
    shapes = np.array([v.shape for v in values], np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.prod(shapes, axis=1))]).astype(np.int64)
    flat = np.concatenate([v.reshape(-1) for v in values])
    return _Feature(
        flat=tf.constant(flat),
        offsets=tf.constant(offsets),
        shapes=tf.constant(shapes),
        static_shape=tuple(builder.info.features[name].shape),
    )


# The one split kept per process: (data_dir, split) -> DecodedSplit.
_CACHED: dict[tuple[str, str], DecodedSplit] = {}


def decoded_split(
    builder: tfds.core.DatasetBuilder,
    split: str,
    num_examples: int,
    image_sizes: Callable[[], np.ndarray],
    read: Callable[[tf.Tensor], tf.Tensor],
    decode: Callable[[tf.Tensor], dict[str, tf.Tensor]],
) -> DecodedSplit:
    """Decodes `split` once per process (the last split asked for is kept).

    Args:
      builder: the prepared dataset's builder.
      split: the split's name.
      num_examples: the split's size.
      image_sizes: returns int `[n, 2]`, each example's (height, width) from its image
        header (called only when the split is not cached yet).
      read: serialized examples of a 1-D tensor of indices (the train stream's reader).
      decode: the features of one serialized example (the train stream's decoder).

    Raises:
      errors.UserError: the decoded split would take more than `MAX_FRACTION_OF_MEMORY` of
        the machine's memory.
    """
    key = (str(builder.data_dir), split)
    if key in _CACHED:
        return _CACHED[key]
    nbytes = _decoded_nbytes(builder, image_sizes())
    limit = MAX_FRACTION_OF_MEMORY * _physical_memory()
    if nbytes > limit:
        raise errors.UserError(
            f'config.input.cache_decoded: split {split!r} of {builder.name} decodes to '
            f'{nbytes / 2**30:.1f} GiB, more than {MAX_FRACTION_OF_MEMORY:.0%} of this '
            f"machine's {_physical_memory() / 2**30:.0f} GiB.",
            hint='set --config.input.cache_decoded=False',
        )
    _CACHED.clear()  # Free the previous split before decoding this one.
    values = _decode_all(num_examples, read, decode)
    features = {name: _concatenate(builder, name, values[name]) for name in FEATURES}
    _CACHED[key] = DecodedSplit(features)
    return _CACHED[key]
