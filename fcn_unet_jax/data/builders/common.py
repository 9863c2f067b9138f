"""Pieces shared by every segmentation builder: the feature spec, metadata and file helpers.

All builders in this package yield the same features, so the input pipeline codes against
one spec:

* `image`: `tfds.features.Image(shape=(None, None, 3))`, uint8 RGB (PNG or JPEG encoded);
* `segmentation_mask`: `tfds.features.Image(shape=(None, None, 1), use_colormap=False)`,
  uint8 class indices with `IGNORE_LABEL` (255) for pixels that are not scored;
* `file_name`: `tfds.features.Text()`, the source file's stem.

Each builder's `info.metadata` holds `class_names`, `palette` (one `[r, g, b]` per class)
and `ignore_label`.

`GeneratedBuilder` is the builder of the synthetic datasets (`shapes`, `shapes_fine`): a
subclass names its classes and palette and draws one example from its index and split.

Errors in the user's files are `errors.UserError`s (ValueErrors) that name the file. For
builders that infer the class count from the masks, `LabelCounts` gathers the pixel count
of each label value and reports them once the build is done, flagging a label far above
the others (a stray value that would silently add classes).
"""

import abc
import io
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from fcn_unet_jax import errors

IGNORE_LABEL = 255


def features() -> tfds.features.FeaturesDict:
    """Returns the feature dict every builder in this package yields."""
    return tfds.features.FeaturesDict(
        {
            'image': tfds.features.Image(shape=(None, None, 3)),
            'segmentation_mask': tfds.features.Image(shape=(None, None, 1), use_colormap=False),
            'file_name': tfds.features.Text(),
        }
    )


def metadata(
    class_names: Sequence[str], palette: Sequence[Sequence[int]]
) -> tfds.core.MetadataDict:
    """Returns the `info.metadata` of a builder: class names, palette and ignore label.

    Args:
      class_names: One name per class index.
      palette: One `(r, g, b)` colour per class index.

    Returns:
      A MetadataDict with `class_names`, `palette` and `ignore_label`, stored as JSON next to
      the prepared data so that a loaded dataset gets it back.
    """
    if len(class_names) != len(palette):
        raise errors.UserError(
            f'{len(class_names)} class names but {len(palette)} palette colours.'
        )
    return tfds.core.MetadataDict(
        class_names=list(class_names),
        palette=[[int(c) for c in colour] for colour in palette],
        ignore_label=IGNORE_LABEL,
    )


def voc_palette(num_classes: int) -> list[list[int]]:
    """Returns the PASCAL VOC colour map (bit-interleaved class index) for `num_classes`."""
    palette = []
    for index in range(num_classes):
        r = g = b = 0
        label = index
        for shift in range(7, -1, -1):
            r |= (label & 1) << shift
            g |= ((label >> 1) & 1) << shift
            b |= ((label >> 2) & 1) << shift
            label >>= 3
        palette.append([r, g, b])
    return palette


def load_image(data: bytes, name: str) -> tuple[np.ndarray | bytes, tuple[int, int]]:
    """Decodes an image file and returns it in the form the `image` feature stores.

    RGB PNGs and JPEGs are passed on as their original bytes (re-encoding a JPEG as PNG
    would grow it several-fold); anything else (grayscale, palette, RGBA, CMYK, BMP, TIFF)
    is converted to an RGB array, so every builder yields three channels. The file is
    decoded in full either way, so a truncated file fails here and not during training.

    Args:
      data: The encoded file content.
      name: The file's name, used in the error message.

    Returns:
      `(image, (height, width))`: the encoded bytes or an RGB uint8 array (H, W, 3).

    Raises:
      ValueError: the file cannot be decoded as an image (the message names the file).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            size = (image.height, image.width)
            if image.format in ('PNG', 'JPEG') and image.mode == 'RGB':
                return data, size
            return np.asarray(image.convert('RGB'), dtype=np.uint8), size
    except Exception as error:  # PIL raises several unrelated types for corrupt files.
        raise errors.UserError(f'Cannot decode image {name}: {decode_reason(error)}.') from error


def decode_reason(error: BaseException) -> str:
    """Pillow's reason for not decoding a file, in one line, without its in-memory file repr."""
    if isinstance(error, Image.UnidentifiedImageError):
        return 'not an image file Pillow can decode (is it really an image?)'
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f'{type(error).__name__}: {text}'


def read_index_mask(data: bytes, name: str) -> np.ndarray:
    """Decodes a mask PNG holding class indices to a uint8 array (H, W).

    Palette PNGs (mode `P`, as in VOC's `SegmentationClass`) give their palette indices,
    which are the class indices; grayscale PNGs (mode `L`) give their values. Converting a
    palette image to RGB, as a generic decoder would, would lose the indices.

    Args:
      data: The encoded file content.
      name: The file's name, used in the error messages.

    Returns:
      The class-index mask.

    Raises:
      ValueError: the file cannot be decoded, or it is not a one-channel index image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            # 1-bit, palette, 8-bit and 16/32-bit grayscale all hold one value a pixel.
            values = np.asarray(image) if mode in ('1', 'P', 'L', 'I', 'I;16') else None
    except Exception as error:  # PIL raises several unrelated types for corrupt files.
        raise errors.UserError(f'Cannot decode mask {name}: {decode_reason(error)}.') from error
    if values is None:
        raise errors.UserError(
            f'Mask {name} has PIL mode {mode!r}; expected a one-channel index PNG '
            "(mode 'L' or 'P')."
        )
    if values.size and (values.min() < 0 or values.max() > 255):
        raise errors.UserError(f'Mask {name} holds values outside [0, 255].')
    return values.astype(np.uint8)


def example(image: np.ndarray | bytes, mask: np.ndarray, file_name: str) -> dict:
    """Returns one example in the common feature layout.

    Args:
      image: An RGB uint8 array (H, W, 3), or encoded PNG/JPEG bytes of an RGB image
        (the first item `load_image` returns).
      mask: The class-index mask, uint8 (H, W).
      file_name: The source file's stem.
    """
    return {
        'image': image,
        'segmentation_mask': np.asarray(mask, dtype=np.uint8)[..., None],
        'file_name': file_name,
    }


class LabelCounts:
    """Pixel counts of each label value (0-255) over the masks of one build."""

    def __init__(self):
        self.counts = np.zeros(256, np.int64)

    def add(self, mask: np.ndarray) -> None:
        """Counts the labels of one uint8 mask."""
        self.counts += np.bincount(np.asarray(mask, np.uint8).ravel(), minlength=256)

    def as_dict(self) -> dict[str, int]:
        """{label: pixels} of the labels present (string keys, as JSON metadata needs)."""
        return {str(i): int(c) for i, c in enumerate(self.counts) if c}

    def far_label(self) -> tuple[int, int] | None:
        """(largest class label, the next largest) when a gap of unused labels separates them.

        The ignore label is not a class. With labels 0, 1, 2, 7 the answer is (7, 2): label 7
        alone adds classes 3-6, which have no pixels, which is what a stray value in a mask
        does. None when the labels present have no such gap.
        """
        labels = [i for i in np.flatnonzero(self.counts) if i != IGNORE_LABEL]
        if len(labels) < 2 or labels[-1] - labels[-2] <= 1:
            return None
        return int(labels[-1]), int(labels[-2])

    def report(self, source: str) -> None:
        """Logs (as a warning: the class count is a guess) the labels and their pixel counts.

        Warns again about a label far above the others (`far_label`).

        Args:
          source: the dataset, for the messages (e.g. 'folder /data/cells').
        """
        listing = ', '.join(f'{label}: {count}' for label, count in self.as_dict().items())
        labels = [i for i in np.flatnonzero(self.counts) if i != IGNORE_LABEL]
        logging.warning(
            '%s: no classes.txt, so the masks define %d classes; label values and their pixel '
            'counts: %s.',
            source,
            max(labels, default=0) + 1,
            listing,
        )
        far = self.far_label()
        if far is not None:
            logging.warning(
                '%s: label %d is far above the others (the next is %d), so it alone makes %d '
                'classes; add classes.txt or fix the masks.',
                source,
                far[0],
                far[1],
                far[0] + 1,
            )


class GeneratedBuilder(tfds.core.GeneratorBasedBuilder):
    """A synthetic dataset: every example drawn from its split and index, nothing downloaded.

    Its `builder_config` has `num_train` and `num_validation`; a subclass sets `CLASS_NAMES`
    and `PALETTE` and implements `generate_example`. The dataset's description is the
    subclass's module docstring. Abstract, so tfds does not register it as a dataset.
    """

    CLASS_NAMES: Sequence[str] = ()
    PALETTE: Sequence[Sequence[int]] = ()

    @abc.abstractmethod
    def generate_example(self, index: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Returns example `index` of `split`: uint8 image [H, W, 3] and mask [H, W]."""

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=sys.modules[type(self).__module__].__doc__,
            features=features(),
            supervised_keys=('image', 'segmentation_mask'),
            metadata=metadata(self.CLASS_NAMES, self.PALETTE),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Nothing to download: the data is generated.
        config = self.builder_config
        return {
            'train': self._generate_examples('train', config.num_train),
            'validation': self._generate_examples('validation', config.num_validation),
        }

    def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[int, dict]]:
        for index in range(num_examples):
            image, mask = self.generate_example(index, split)
            yield index, example(image, mask, f'{split}_{index:05d}')
