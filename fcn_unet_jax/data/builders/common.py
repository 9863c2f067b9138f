"""Pieces shared by every segmentation builder: the feature spec, metadata and file helpers.

All builders in this package yield the same features, so the input pipeline codes against
one spec:

* `image`: `tfds.features.Image(shape=(None, None, 3))`, uint8 RGB (PNG or JPEG encoded);
* `segmentation_mask`: `tfds.features.Image(shape=(None, None, 1), use_colormap=False)`,
  uint8 class indices with `IGNORE_LABEL` (255) for pixels that are not scored;
* `file_name`: `tfds.features.Text()`, the source file's stem.

Each builder's `info.metadata` holds `class_names`, `palette` (one `[r, g, b]` per class)
and `ignore_label`.
"""

import io
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

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
        raise ValueError(f'{len(class_names)} class names but {len(palette)} palette colours.')
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
        raise ValueError(f'Cannot decode image {name}: {error}') from error


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
        raise ValueError(f'Cannot decode mask {name}: {error}') from error
    if values is None:
        raise ValueError(
            f'Mask {name} has PIL mode {mode!r}; expected a one-channel index PNG '
            "(mode 'L' or 'P')."
        )
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError(f'Mask {name} holds values outside [0, 255].')
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
