"""`shapes_fine`: synthetic scenes where skip connections matter (the skip ablation's data).

`shapes` (the demo data) holds one to four large, smooth shapes per image: a stride-32 FCN
already covers most of their pixels, so mean IoU barely separates FCN-32s from FCN-8s or a
U-Net from one without skips. Here each 256 x 256 image mixes every scale the papers' skip
connections are about:

* large objects (radius 12% to 20% of the side, 30 to 50 px): several stride-32 cells
  wide, so even FCN-32s resolves them, as on VOC (about 16 x 16 cells for 500 px images);
* small objects (radius 3 to 8 px): smaller than one stride-8 cell;
* thin bars, 2 to 5 px wide and 15% to 50% of the side long;
* clusters of two to four touching instances of the same class, separated in the mask by
  a background line of `GAP` = 2 px (also visible in the image), like the touching cells
  the U-Net paper separates;
* fine boundary detail: cell contours ripple by 1 to 3 px (radius modulated by two
  harmonics of 5 to 12 periods per turn) and stars have sharp spikes.

Classes: 0 `background`, 1 `cell` (rippled discs: the large ones, the clusters and some of
the small ones), 2 `bar`, 3 `star` (5 to 8 spikes, inner radius 45% to 65% of the outer).
As in `shapes` with `class_hues`, each class has a hue (cell red, bar green, star blue,
jittered by +-30 degrees per instance, so touching instances differ slightly) on a muted
textured background (`shapes._background`), every instance at least 60 (mean absolute RGB
difference) away from the background under it, and Gaussian noise (std 6): the class is
easy to tell, where its pixels end is what the models are scored on. Later objects occlude
earlier ones; an instance drawn over or against one of its own class cuts a `GAP`-pixel
background line around itself, in mask and image.

Scales (radii, bar lengths) are fractions of the image side, detail sizes (bar width, gap,
ripple, small radii) are pixels: the detail is at the input resolution whatever the image
size. Example `i` of a split is drawn from `np.random.default_rng([SEED, split_id, i])`,
so builds are deterministic and independent of order. Configs: `default` (256 x 256,
train 1,000 / validation 100; about 35 s of CPU time to build) and `small` (128 x 128,
train 500 / validation 50; for quick checks).
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from scipy import ndimage

from fcn_unet_jax.data.builders import common, shapes

CLASS_NAMES = ('background', 'cell', 'bar', 'star')
PALETTE = shapes.PALETTE  # Same hues as `shapes`: red, green, blue.
SEED = 20260127
GAP = 2  # Background pixels between touching instances of the same class.
_SPLIT_IDS = {'train': 0, 'validation': 1}
_CELL, _BAR, _STAR = 1, 2, 3


@dataclasses.dataclass(eq=False)
class ShapesFineConfig(tfds.core.BuilderConfig):
    """Size of the synthetic data.

    Attributes:
      image_size: Height and width of every image, in pixels.
      num_train: Number of examples in `train`.
      num_validation: Number of examples in `validation`.
    """

    image_size: int = 256
    num_train: int = 1000
    num_validation: int = 100


def _polar(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float) -> tuple:
    """Distance and angle of the pixel centres from (cy, cx)."""
    dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
    return np.hypot(dy, dx), np.arctan2(dy, dx)


def _cell(rng: np.random.Generator, yy, xx, cy: float, cx: float, radius: float) -> np.ndarray:
    """A disc whose radius ripples by up to 3 px (capped at 20%): fine boundary detail."""
    rho, phi = _polar(yy, xx, cy, cx)
    ripple = np.zeros_like(phi)
    for _ in range(2):
        amplitude = min(rng.uniform(0.5, 1.5), 0.1 * radius)
        ripple += amplitude * np.sin(rng.integers(5, 13) * phi + rng.uniform(0, 2 * np.pi))
    return rho <= radius + ripple


def _star(rng: np.random.Generator, yy, xx, cy: float, cx: float, radius: float) -> np.ndarray:
    """A star polygon: `n` spikes of outer radius `radius`, sharp corners."""
    n = int(rng.integers(5, 9))
    inner = radius * rng.uniform(0.45, 0.65)
    start = rng.uniform(0, 2 * np.pi)
    rho, phi = _polar(yy, xx, cy, cx)
    step = np.pi / n
    # Each pixel lies in the sector between vertex j (radius outer or inner, alternating)
    # and vertex j + 1; it is inside iff it is on the centre's side of that edge.
    j = np.floor(((phi - start) % (2 * np.pi)) / step).astype(int)
    r0 = np.where(j % 2 == 0, radius, inner)
    r1 = np.where(j % 2 == 0, inner, radius)
    a0, a1 = start + j * step, start + (j + 1) * step
    x0, y0, x1, y1 = r0 * np.cos(a0), r0 * np.sin(a0), r1 * np.cos(a1), r1 * np.sin(a1)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    # Vertices go counter-clockwise, so the centre is on the left of every edge.
    return (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0) >= 0


def _bar(yy, xx, cy: float, cx: float, theta: float, half_length: float, half_width: float):
    """A straight bar through (cy, cx) at angle `theta`."""
    dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
    along = np.cos(theta) * dx + np.sin(theta) * dy
    across = -np.sin(theta) * dx + np.cos(theta) * dy
    return (np.abs(along) <= half_length) & (np.abs(across) <= half_width)


def _objects(rng: np.random.Generator, size: int) -> list[tuple[int, str, tuple]]:
    """The scene's objects in drawing order: (class, 'blob', (cy, cx, radius)) for cells and
    stars, (class, 'bar', (cy, cx, angle, half length, half width)) for bars.

    Large objects first, so the clusters, bars and small objects drawn later stay visible.
    """
    objects = []

    def centre(margin: float) -> tuple[float, float]:
        return tuple(rng.uniform(margin, size - margin, size=2))

    for _ in range(rng.integers(1, 3)):  # Large: resolved even by a stride-32 output.
        radius = rng.uniform(0.12, 0.20) * size
        label = _CELL if rng.uniform() < 0.5 else _STAR
        objects.append((label, 'blob', (*centre(0.5 * radius), radius)))
    for _ in range(rng.integers(1, 3)):  # Clusters of touching cells.
        radius = rng.uniform(0.04, 0.08) * size
        cells = [(*centre(radius), radius)]
        for _ in range(rng.integers(1, 4)):
            py, px, pr = cells[rng.integers(len(cells))]
            radius = rng.uniform(0.04, 0.08) * size
            angle = rng.uniform(0, 2 * np.pi)
            # Slightly closer than touching: the gap line is then cut into both.
            distance = (pr + radius) * rng.uniform(0.8, 0.95)
            cells.append((py + distance * np.sin(angle), px + distance * np.cos(angle), radius))
        objects += [(_CELL, 'blob', cell) for cell in cells]
    for _ in range(rng.integers(2, 5)):  # Thin: 2 to 5 px wide.
        half_width = rng.uniform(1.0, 2.5)
        half_length = rng.uniform(0.075, 0.25) * size
        cy, cx = rng.uniform(0.1 * size, 0.9 * size, size=2)
        objects.append((_BAR, 'bar', (cy, cx, rng.uniform(0, np.pi), half_length, half_width)))
    for _ in range(rng.integers(3, 7)):  # Small: below one stride-8 cell.
        radius = rng.uniform(3.0, 8.0)
        label = _CELL if rng.uniform() < 0.5 else _STAR
        objects.append((label, 'blob', (*centre(radius), radius)))
    return objects


def generate_example(index: int, split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Generates one example of `shapes_fine`.

    Args:
      index: Index of the example in its split.
      split: `train` or `validation`.
      image_size: Height and width in pixels.

    Returns:
      `(image, mask)`: uint8 arrays of shapes (S, S, 3) and (S, S), with mask values in
      `[0, len(CLASS_NAMES))`. The result depends only on the arguments.
    """
    rng = np.random.default_rng([SEED, _SPLIT_IDS[split], index])
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
    background = shapes._background(rng, yy / image_size, xx / image_size, muted=True)
    image = background.copy()
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    for label, kind, params in _objects(rng, image_size):
        # Each object is drawn in its bounding box (plus the gap ring): a fraction of the
        # image, which keeps a 256 px build to about 30 ms per example.
        cy, cx = params[:2]
        extent = params[3] + params[4] if kind == 'bar' else params[2] + 3.0
        reach = extent + GAP + 2
        y0, y1 = (int(np.clip(c, 0, image_size)) for c in (cy - reach, cy + reach + 1))
        x0, x1 = (int(np.clip(c, 0, image_size)) for c in (cx - reach, cx + reach + 1))
        box = (slice(y0, y1), slice(x0, x1))
        if kind == 'bar':
            inside = _bar(yy[box], xx[box], *params)
        elif label == _CELL:
            inside = _cell(rng, yy[box], xx[box], *params)
        else:
            inside = _star(rng, yy[box], xx[box], *params)
        if not inside.any():
            continue
        # The ring of GAP px around the new instance turns its own class to background:
        # touching instances stay apart, in the mask and in the image.
        box_mask, box_image, box_background = mask[box], image[box], background[box]
        outside = ndimage.distance_transform_edt(~inside)
        ring = (outside <= GAP) & ~inside & (box_mask == label)
        box_mask[ring] = 0
        box_image[ring] = box_background[ring]
        colour = shapes._shape_colour(rng, label, box_background[inside], class_hues=True)
        box_image[inside] = colour
        box_mask[inside] = label
    image += rng.normal(0, shapes._NOISE_STD, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), mask


class ShapesFine(common.GeneratedBuilder):
    """Synthetic scenes of large, small, thin and touching objects (see the module doc)."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    CLASS_NAMES = CLASS_NAMES
    PALETTE = PALETTE
    BUILDER_CONFIGS = [
        ShapesFineConfig(name='default', description='256 x 256, train 1,000 / validation 100.'),
        ShapesFineConfig(
            name='small',
            description='128 x 128, train 500 / validation 50.',
            image_size=128,
            num_train=500,
            num_validation=50,
        ),
    ]

    def generate_example(self, index: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        return generate_example(index, split, self.builder_config.image_size)
