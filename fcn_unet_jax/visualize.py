"""Colouring label maps with a dataset palette and blending them over images.

Pure NumPy and Pillow, so the training demo and the prediction CLI share it without
touching JAX. Label maps are integer [H, W] arrays; pixels equal to `ignore_label` (or with
no palette entry) are drawn in `ignore_color` and left unblended in overlays.
"""

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

IGNORE_COLOR = (255, 255, 255)


def colorize(
    label: np.ndarray,
    palette: np.ndarray | Sequence[Sequence[int]],
    *,
    ignore_label: int = 255,
    ignore_color: Sequence[int] = IGNORE_COLOR,
) -> np.ndarray:
    """RGB rendering of a label map.

    Args:
      label: integer [H, W] class indices.
      palette: [num_classes, 3] uint8 colours.
      ignore_label: label drawn in `ignore_color`.
      ignore_color: RGB colour of ignored (and out-of-palette) pixels.

    Returns:
      uint8 [H, W, 3].
    """
    palette = np.asarray(palette, np.uint8).reshape(-1, 3)
    label = np.asarray(label)
    known = (label >= 0) & (label < len(palette)) & (label != ignore_label)
    rgb = palette[np.where(known, label, 0)]
    rgb[~known] = np.asarray(ignore_color, np.uint8)
    return rgb


def overlay(
    image: np.ndarray,
    label: np.ndarray,
    palette: np.ndarray | Sequence[Sequence[int]],
    *,
    alpha: float = 0.5,
    ignore_label: int = 255,
) -> np.ndarray:
    """Blends the coloured `label` over `image`; ignored pixels show the image unchanged.

    Args:
      image: uint8 [H, W, 3] (or [H, W] / [H, W, 1] grey, broadcast to RGB).
      label: integer [H, W] class indices.
      palette: [num_classes, 3] uint8 colours.
      alpha: opacity of the label colours.
      ignore_label: label left unblended.

    Returns:
      uint8 [H, W, 3].
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    image = np.broadcast_to(image, (*image.shape[:2], 3)).astype(np.float32)
    colours = colorize(label, palette, ignore_label=ignore_label).astype(np.float32)
    blended = (1 - alpha) * image + alpha * colours
    blended = np.where((np.asarray(label) == ignore_label)[..., None], image, blended)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def comparison_panel(
    image: np.ndarray,
    ground_truth: np.ndarray,
    prediction: np.ndarray,
    palette: np.ndarray | Sequence[Sequence[int]],
    *,
    ignore_label: int = 255,
    gap: int = 4,
) -> np.ndarray:
    """Image | ground-truth overlay | prediction overlay, side by side with white gaps.

    Returns:
      uint8 [H, 3 W + 2 gap, 3].
    """
    rgb = overlay(
        image, np.full_like(ground_truth, ignore_label), palette, ignore_label=ignore_label
    )
    tiles = [
        rgb,
        overlay(image, ground_truth, palette, ignore_label=ignore_label),
        overlay(image, prediction, palette, ignore_label=ignore_label),
    ]
    spacer = np.full((rgb.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([tiles[0], spacer, tiles[1], spacer, tiles[2]], axis=1)


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Writes a uint8 RGB (or label) array as PNG, creating the parent folder."""
    os.makedirs(os.path.dirname(os.fspath(path)) or '.', exist_ok=True)
    Image.fromarray(np.asarray(rgb, np.uint8)).save(path)
