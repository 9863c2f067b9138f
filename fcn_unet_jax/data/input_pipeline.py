"""tf.data input pipelines: a resumable, deterministic train stream and padded eval passes.

Examples are read by index from the tfds dataset prepared in the `array_record` format
(random access), so the data order is computed, not replayed:

* Train: the global sample stream is the concatenation of epochs, each a stateless
  permutation of the split keyed by (seed, epoch). Global batch k is samples
  [k B, (k + 1) B); process p takes the contiguous slice [p b, (p + 1) b) of it (b = B / P).
  The augmentation of slot i of batch k uses a seed folded from (seed, k, i). Everything is
  therefore a function of (seed, step): starting at step k yields exactly what an
  uninterrupted run yields at step k, without reading the batches before it, and the
  union over processes does not depend on the process count.
* Eval: process p reads a contiguous, near-equal share of the split; every process yields
  the same number of batches (the last ones padded with fully masked examples) so that
  multi-host evaluation never deadlocks. Images and labels are padded, never resized, to
  one static size, so the jitted eval step compiles once.

TensorFlow is hidden from accelerators, so it never takes memory that JAX needs.
"""

import dataclasses
import functools
import io
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from fcn_unet_jax import errors
from fcn_unet_jax.data import augment, builders, decoded_cache
from fcn_unet_jax.data.weight_map import border_weight_map

# Offsets folded into config.seed, so that the data order and the augmentations are
# independent random streams.
_ORDER_STREAM = 0
_AUGMENT_STREAM = 1
# Eval images are padded up to a multiple of this (the output stride of the deepest models).
_EVAL_PAD_MULTIPLE = 32


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about the dataset.

    Attributes:
      num_classes: Number of classes (labels are in [0, num_classes) or `ignore_label`).
      class_names: One name per class.
      palette: uint8 `[num_classes, 3]` RGB colour per class, for visualisations.
      ignore_label: Label of pixels that are not scored.
      num_train_examples: Size of `config.dataset.train_split`.
      num_eval_examples: Size of `config.dataset.eval_split`.
    """

    num_classes: int
    class_names: tuple[str, ...]
    palette: np.ndarray
    ignore_label: int
    num_train_examples: int
    num_eval_examples: int


def _hide_accelerators() -> None:
    """Keeps TensorFlow off GPUs/TPUs so that all accelerator memory stays with JAX."""
    try:
        tf.config.set_visible_devices([], 'GPU')
        tf.config.set_visible_devices([], 'TPU')
    except (RuntimeError, ValueError):
        # RuntimeError: TensorFlow has already initialised its devices (normally in an
        # earlier call, which hid them), and visibility cannot change any more.
        # ValueError: no such device type in this build (tensorflow-cpu has no TPU).
        pass


def _without_autotuning(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Turns off tf.data's autotuning for `ds`: each AUTOTUNE map runs min(16, cores) calls.

    Autotuning gives every iterator a model thread, and deleting the iterator waits for it:
    at the end of a training run that wait took up to half a minute (docs/performance.md).
    The fixed parallelism (tf.data's value for AUTOTUNE when autotuning is off) reads about
    as fast (`benchmarks/input_pipeline_benchmark.py --compare_autotuning`), and the batches
    are the same either way: the maps are deterministic.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def _builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    return builders.get_builder(config.dataset)


def get_dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Returns class names, palette, ignore label and split sizes of `config.dataset`.

    Args:
      config: The full config; reads `dataset`.

    Returns:
      The dataset's `DatasetInfo` (the dataset must be prepared).
    """
    info = _builder(config).info
    class_names = tuple(info.metadata['class_names'])
    return DatasetInfo(
        num_classes=len(class_names),
        class_names=class_names,
        palette=np.asarray(info.metadata['palette'], np.uint8).reshape(-1, 3),
        ignore_label=int(info.metadata['ignore_label']),
        num_train_examples=_num_examples(config, info, 'train_split'),
        num_eval_examples=_num_examples(config, info, 'eval_split'),
    )


def num_split_examples(config: ml_collections.ConfigDict, split: str, flag: str) -> int:
    """Examples in `split` of the (prepared) dataset; an unknown split is a UserError.

    Args:
      config: The full config; reads `dataset`.
      split: a tfds split name or slice (`validation`, `train[:64]`).
      flag: the flag that named it, for the message (`--split`).
    """
    return _split_size(config, _builder(config).info, split, flag)


def _num_examples(
    config: ml_collections.ConfigDict, info: tfds.core.DatasetInfo, field: str
) -> int:
    """Examples in the split `config.dataset.<field>` names; an unknown split is a UserError."""
    return _split_size(config, info, config.dataset[field], f'--config.dataset.{field}')


def _split_size(
    config: ml_collections.ConfigDict, info: tfds.core.DatasetInfo, split: str, flag: str
) -> int:
    try:
        return info.splits[split].num_examples
    except (KeyError, ValueError) as error:
        available = ', '.join(f'{n} ({s.num_examples})' for n, s in info.splits.items())
        raise errors.UserError(
            f'{flag.removeprefix("--")}={split!r}, but dataset {config.dataset.name} has no '
            f'such split; it has {available or "no split"}.',
            hint=f'set {flag} to one of them',
        ) from error


def normalization_for(config: ml_collections.ConfigDict) -> str:
    """Resolves `config.input.normalization` ('auto' picks the model family's convention).

    Args:
      config: The full config; reads `input.normalization` and `model.name`.

    Returns:
      'fcn_bgr' for the FCN-VGG16 models (Caffe BGR mean subtraction), 'unit' ([0, 1]) for
      the classic `unet`, 'imagenet' (mean/std) for models on ResNet/VGG encoders; or the
      configured value when it is not 'auto'.
    """
    normalization = config.input.normalization
    if normalization != 'auto':
        if normalization not in augment.NORMALIZATIONS:
            raise errors.UserError(
                f'config.input.normalization={normalization!r}; expected auto or one of '
                f'{augment.NORMALIZATIONS}.'
            )
        return normalization
    name = config.model.name
    if name.startswith('fcn') and name.endswith('_vgg16'):
        return 'fcn_bgr'
    if name == 'unet':
        return 'unit'
    return 'imagenet'


def preprocess_image(
    image_uint8: np.ndarray | tf.Tensor, config: ml_collections.ConfigDict
) -> np.ndarray | tf.Tensor:
    """Normalises RGB images for the model exactly as the train and eval pipelines do.

    Args:
      image_uint8: RGB `[..., H, W, 3]` in [0, 255].
      config: The full config; reads `input.normalization`, `model.name` and
        `model.input_channels`.

    Returns:
      float32 `[..., H, W, config.model.input_channels]`: a NumPy array for NumPy input,
      a tf.Tensor for tf.Tensor input.
    """
    result = augment.normalize(
        tf.convert_to_tensor(image_uint8), normalization_for(config), config.model.input_channels
    )
    return result if isinstance(image_uint8, tf.Tensor) else result.numpy()


def _process_split(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f'process_index {index} not in [0, {count}).')
    return index, count


def _local_batch_size(global_batch: int, process_count: int, name: str) -> int:
    if global_batch % process_count:
        raise errors.UserError(
            f'config.{name}={global_batch} is not divisible by the {process_count} processes.'
        )
    return global_batch // process_count


def _random_access_source(builder: tfds.core.DatasetBuilder, split: str):
    """Returns the split's serialized examples as a random-access sequence of bytes."""
    try:
        return builder.as_data_source(
            split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
        )
    except NotImplementedError as error:
        raise ValueError(
            f'{builder.name} in {builder.data_dir} is not stored in the array_record format, '
            'which the input pipeline needs to read examples by index; prepare it with '
            "download_and_prepare(file_format='array_record') in a fresh data_dir."
        ) from error


def _read_records(source, indices: tf.Tensor) -> tf.Tensor:
    """Reads serialized examples by index (one Python call per batch of indices)."""

    def read(keys: np.ndarray) -> np.ndarray:
        return np.asarray(source.__getitems__([int(k) for k in keys]), dtype=object)

    records = tf.numpy_function(read, [indices], tf.string, stateful=False)
    return tf.ensure_shape(records, indices.shape)


def _decode(builder: tfds.core.DatasetBuilder, record: tf.Tensor) -> dict[str, tf.Tensor]:
    return builder.info.features.deserialize_example(record)


def create_train_iterator(
    config: ml_collections.ConfigDict,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Returns the infinite, deterministic training stream of this process.

    The NumPy iterator of `train_dataset`, which documents the arguments and the batches.
    """
    return train_dataset(
        config, start_step=start_step, process_index=process_index, process_count=process_count
    ).as_numpy_iterator()


def train_dataset(
    config: ml_collections.ConfigDict,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tf.data.Dataset:
    """Returns the infinite, deterministic training stream of this process as a tf.data pipeline.

    Args:
      config: The full config; reads `seed`, `batch_size`, `dataset`, `input` and
        `model.input_channels` / `model.name` (normalisation).
      start_step: The first step to yield: the stream starts exactly where an uninterrupted
        stream would be at this step, without reading the batches before it.
      process_index: This process; None = `jax.process_index()`.
      process_count: Number of processes; None = `jax.process_count()`.

    Returns:
      A dataset of dicts with this process's `config.batch_size // process_count`
      examples per step: `image` float32 `[b, H, W, C]` (normalised), `label` int32
      `[b, H, W]` (`ignore_label` where not scored) and, when `config.input.border_weights`,
      `weight` float32 `[b, H, W]` (the U-Net border weight map). `(H, W)` is
      `config.input.crop_size`.
    """
    _hide_accelerators()
    process_index, process_count = _process_split(process_index, process_count)
    global_batch = config.batch_size
    local_batch = _local_batch_size(global_batch, process_count, 'batch_size')
    builder = _builder(config)
    split = config.dataset.train_split
    source = _random_access_source(builder, split)
    num_examples = len(source)
    if num_examples == 0:
        raise errors.UserError(f'Split {split!r} of {config.dataset.name} is empty.')
    ignore_label = config.dataset.ignore_label
    normalization = normalization_for(config)
    pad_value = augment.pad_value(normalization)
    crop_size = tuple(config.input.crop_size)
    seed = config.seed

    def sample(position: tf.Tensor) -> dict[str, tf.Tensor]:
        """Maps this process's sample position to (example index, augmentation seed)."""
        step, slot = position // local_batch, position % local_batch + process_index * local_batch
        global_position = step * global_batch + slot
        epoch = global_position // num_examples
        order_key = tf.random.experimental.stateless_fold_in(
            tf.constant([seed, _ORDER_STREAM], tf.int64), epoch
        )
        index = tf.random.experimental.index_shuffle(
            global_position % num_examples, order_key, tf.constant(num_examples - 1, tf.int64)
        )
        key = tf.constant([seed, _AUGMENT_STREAM], tf.int64)
        key = tf.random.experimental.stateless_fold_in(key, step)
        key = tf.random.experimental.stateless_fold_in(key, slot)
        return {'index': index, 'seed': key}

    def read(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {'record': _read_records(source, batch['index']), 'seed': batch['seed']}

    def process(decoded: dict[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
        image, mask = augment.train_augment(
            decoded['image'],
            decoded['segmentation_mask'],
            seed,
            crop_size=crop_size,
            scale_range=tuple(config.input.scale_range),
            hflip=config.input.hflip,
            color_jitter_strength=config.input.color_jitter,
            elastic=config.input.elastic,
            elastic_grid=config.input.elastic_grid,
            elastic_sigma=config.input.elastic_sigma,
            pad_value=pad_value,
            ignore_label=ignore_label,
        )
        return {
            'image': augment.normalize(image, normalization, config.model.input_channels),
            'label': mask[..., 0],
        }

    first = start_step * local_batch
    ds = tf.data.Dataset.range(first, np.iinfo(np.int64).max).map(sample)
    if config.input.cache_decoded:
        decoded = decoded_cache.decoded_split(
            builder,
            split,
            num_examples,
            lambda: _image_sizes(source),
            read=functools.partial(_read_records, source),
            decode=functools.partial(_decode, builder),
        )
        ds = ds.map(
            lambda s: process(decoded.lookup(s['index']), s['seed']),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    else:
        # Reading stays sequential (one call per batch); decoding and augmenting run in
        # parallel.
        ds = ds.batch(local_batch).map(read).unbatch()
        ds = ds.map(
            lambda e: process(_decode(builder, e['record']), e['seed']),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    ds = ds.batch(local_batch, drop_remainder=True)
    if config.input.border_weights:
        ds = ds.map(
            functools.partial(
                _with_border_weights,
                w0=config.input.border_w0,
                sigma=config.input.border_sigma,
                ignore_label=ignore_label,
            )
        )
    ds = ds.prefetch(config.input.prefetch)
    return _without_autotuning(ds)


def _with_border_weights(batch: dict[str, tf.Tensor], **kwargs) -> dict[str, tf.Tensor]:
    """Adds `weight`, the border weight map of each label map of the batch.

    One `tf.numpy_function` call per batch rather than per crop: each call hands the GIL
    between TensorFlow's threads and Python, which cost the U-Net pipeline about 4 ms of
    CPU per batch of 8 (docs/performance.md), taken from the train step's cores.
    """

    def weight_maps(labels: np.ndarray) -> np.ndarray:
        return np.stack([border_weight_map(label, **kwargs) for label in labels])

    weights = tf.numpy_function(weight_maps, [batch['label']], tf.float32, stateful=False)
    return {**batch, 'weight': tf.ensure_shape(weights, batch['label'].shape)}


def _image_size(record: bytes) -> tuple[int, int]:
    """Reads (height, width) of a serialized example's image from its header only."""
    example = tf.train.Example.FromString(record)
    encoded = example.features.feature['image'].bytes_list.value[0]
    with Image.open(io.BytesIO(encoded)) as image:
        width, height = image.size
    return height, width


# Largest (height, width) per (prepared dataset directory, split): finding it reads every
# example's image header, which is cheap but not free, and eval runs many times per training.
_MAX_SIZE_CACHE: dict[tuple[str, str], tuple[int, int]] = {}


def _image_sizes(source) -> np.ndarray:
    """int64 `[n, 2]`: (height, width) of every example of `source`, from the headers."""
    return np.array([_image_size(record) for record in source], np.int64).reshape(-1, 2)


def _split_max_size(builder: tfds.core.DatasetBuilder, split: str) -> tuple[int, int]:
    key = (str(builder.data_dir), split)
    if key not in _MAX_SIZE_CACHE:
        sizes = _image_sizes(_random_access_source(builder, split))
        if not len(sizes):
            raise errors.UserError(f'Split {split!r} of {builder.name} is empty.')
        _MAX_SIZE_CACHE[key] = tuple(int(n) for n in sizes.max(axis=0))
    return _MAX_SIZE_CACHE[key]


def eval_pad_size(config: ml_collections.ConfigDict, split: str | None = None) -> tuple[int, int]:
    """Returns the static `(height, width)` eval batches are padded to.

    Args:
      config: The full config; reads `input.eval_pad_size` and `dataset`.
      split: The split; None = `config.dataset.eval_split`.

    Returns:
      `config.input.eval_pad_size` if set, else the largest image height and width in the
      split, each rounded up to a multiple of 32 (found by reading only image headers).
    """
    if config.input.eval_pad_size is not None:
        height, width = config.input.eval_pad_size
        return int(height), int(width)
    builder = _builder(config)
    split = config.dataset.eval_split if split is None else split
    height, width = _split_max_size(builder, split)
    round_up = lambda n: -(-n // _EVAL_PAD_MULTIPLE) * _EVAL_PAD_MULTIPLE  # noqa: E731
    return round_up(height), round_up(width)


class EvalIterable:
    """One process's share of an eval split; each `iter()` is one full, identical pass.

    Every pass yields `len(self)` batches of `config.eval_batch_size // process_count`
    examples, the same number on every process, as dicts:

    * `image`: float32 `[b, Hp, Wp, C]`, normalised; padding is 0 (the mean).
    * `label`: int32 `[b, Hp, Wp]` at the original resolution; padding is `ignore_label`.
    * `mask`: bool `[b, Hp, Wp]`, True on the original pixels of real examples; the
      examples that only fill up the last batches are all False.
    * `file_name`: object array of `b` bytes (empty for the filler examples).

    `(Hp, Wp)` is `eval_pad_size(config, split)`, static across batches.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        split: str | None = None,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        _hide_accelerators()
        self._config = config
        self._process_index, self._process_count = _process_split(process_index, process_count)
        self._batch_size = _local_batch_size(
            config.eval_batch_size, self._process_count, 'eval_batch_size'
        )
        self.split = config.dataset.eval_split if split is None else split
        self._builder = _builder(config)
        self._source = _random_access_source(self._builder, self.split)
        self.num_examples = len(self._source)
        if self.num_examples == 0:
            raise errors.UserError(f'Split {self.split!r} of {config.dataset.name} is empty.')
        # Process p reads [p N // P, (p + 1) N // P): contiguous shares that differ in size by
        # at most one example, as tfds.even_splits makes them.
        n, p, count = self.num_examples, self._process_index, self._process_count
        self._begin, self._end = p * n // count, (p + 1) * n // count
        largest_share = -(-n // count)
        self._num_batches = -(-largest_share // self._batch_size)
        self.pad_size = eval_pad_size(config, self.split)

    def __len__(self) -> int:
        """Number of batches per pass (equal on every process)."""
        return self._num_batches

    def dataset(self) -> tf.data.Dataset:
        """One pass over this process's share as a tf.data pipeline (what iterating yields)."""
        config, builder, source = self._config, self._builder, self._source
        begin, end = self._begin, self._end
        height, width = self.pad_size
        ignore_label = config.dataset.ignore_label
        normalization = normalization_for(config)

        def sample(position: tf.Tensor) -> dict[str, tf.Tensor]:
            valid = begin + position < end
            # Filler examples re-read a real one (index `begin`, or 0 for a process without
            # any example), then get masked out entirely.
            index = tf.where(valid, begin + position, begin if begin < end else 0)
            return {'index': index, 'valid': valid}

        def read(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            return {'record': _read_records(source, batch['index']), 'valid': batch['valid']}

        def process(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            decoded = _decode(builder, example['record'])
            image = augment.normalize(decoded['image'], normalization, config.model.input_channels)
            label = tf.cast(decoded['segmentation_mask'][..., 0], tf.int32)
            shape = tf.shape(label)
            tf.debugging.assert_less_equal(
                shape,
                tf.constant([height, width]),
                message=f'An eval example is larger than the eval pad size {(height, width)}; '
                'raise config.input.eval_pad_size (or set it to None).',
            )
            paddings = [[0, height - shape[0]], [0, width - shape[1]]]
            valid = example['valid']
            mask = tf.pad(tf.fill(shape, valid), paddings)
            label = tf.where(mask, tf.pad(label, paddings), ignore_label)
            image = tf.pad(image, paddings + [[0, 0]]) * tf.cast(mask, tf.float32)[..., None]
            file_name = tf.where(valid, decoded['file_name'], '')
            return {
                'image': tf.ensure_shape(image, [height, width, config.model.input_channels]),
                'label': tf.ensure_shape(label, [height, width]),
                'mask': tf.ensure_shape(mask, [height, width]),
                'file_name': file_name,
            }

        ds = tf.data.Dataset.range(self._num_batches * self._batch_size)
        ds = ds.map(sample).batch(self._batch_size).map(read).unbatch()
        ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(self._batch_size, drop_remainder=True).prefetch(config.input.prefetch)
        return _without_autotuning(ds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.dataset().as_numpy_iterator()


def create_eval_iterable(
    config: ml_collections.ConfigDict,
    split: str | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalIterable:
    """Returns this process's re-iterable share of an eval split (see `EvalIterable`).

    Across processes every example of the split appears exactly once per pass, at its
    original resolution, and every process yields the same number of batches.

    Args:
      config: The full config; reads `eval_batch_size`, `dataset`, `input.eval_pad_size`,
        `input.normalization`, `input.prefetch` and `model`.
      split: The split; None = `config.dataset.eval_split`.
      process_index: This process; None = `jax.process_index()`.
      process_count: Number of processes; None = `jax.process_count()`.

    Returns:
      An `EvalIterable`; `iter()` on it starts a full pass, `len()` is its batch count.
    """
    return EvalIterable(config, split, process_index=process_index, process_count=process_count)
