"""`shapes`: a synthetic, deterministic segmentation dataset (the embedded default).

Each example is a square RGB image holding one to four filled shapes on a textured
background, and its mask of class indices:

* 0 `background`, 1 `circle`, 2 `rectangle` (rotated, aspect ratio 0.6 to 1), 3 `triangle`
  (equilateral, rotated). The class count matches `config.model.num_classes` (4).
* Backgrounds are one of: a linear gradient between two colours, sinusoidal stripes, smooth
  colour blobs (a bilinearly upsampled coarse random grid) or a checkerboard; so the
  model has to learn objects, not "anything that is not flat".
* Shapes have a radius of 10% to 22% of the image side, a slight shading gradient, and may
  overlap: later shapes occlude earlier ones, and the mask shows the top one. Shapes may be
  cut by the image border. Their colour is kept at least 60 (mean absolute RGB difference)
  away from the background under them.
* Colours: with `class_hues` (configs `default`, `small`) each class has a hue (circle red,
  rectangle green, triangle blue, each jittered by +-30 degrees, saturation >= 0.55) and
  backgrounds are muted (saturation <= 0.35): a small model reaches a high mean IoU within
  minutes on a CPU, which the demo needs. Without it (config `hard`), shapes and
  backgrounds take any colour and only the geometry tells the classes apart.
* Gaussian pixel noise (std 6) is added everywhere.

Generation is pure numpy. Example `i` of a split is drawn from
`np.random.default_rng([SEED, split_id, i])`, so every example is a function of its index
alone: builds are deterministic and independent of generation order or sharding. Configs:
`default` (128 x 128, train 2,000 / validation 200), `small` (64 x 64, train 1,000 /
validation 100) and `hard` (as `default`, without class hues). A build of `default` takes
about ten seconds.
"""

import colorsys
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from fcn_unet_jax.data.builders import common

CLASS_NAMES = ('background', 'circle', 'rectangle', 'triangle')
PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200))
SEED = 20240601
_SPLIT_IDS = {'train': 0, 'validation': 1}
_CLASS_HUES = {1: 0.0, 2: 1 / 3, 3: 2 / 3}  # Red, green, blue (fractions of a turn).
_HUE_JITTER = 30 / 360
_MIN_CONTRAST = 60.0
_NOISE_STD = 6.0


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Size and difficulty of the synthetic data.

    Attributes:
      image_size: Height and width of every image, in pixels.
      num_train: Number of examples in `train`.
      num_validation: Number of examples in `validation`.
      class_hues: Colour shapes by class and mute the backgrounds (see the module docstring).
    """

    image_size: int = 128
    num_train: int = 2000
    num_validation: int = 200
    class_hues: bool = True


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    """Returns an RGB colour in [0, 255] from HSV components in [0, 1]."""
    return 255.0 * np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def _background_colour(rng: np.random.Generator, muted: bool) -> np.ndarray:
    """Returns a random background colour, of low saturation when `muted`."""
    if muted:
        return _hsv(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.15, 0.95))
    return rng.uniform(0, 255, size=3)


def _bilinear_upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Upsamples a (g, g, C) grid to (size, size, C) by bilinear interpolation."""
    g = grid.shape[0]
    coords = np.linspace(0.0, g - 1.0, size)
    low = np.minimum(np.floor(coords).astype(int), g - 2)
    frac = (coords - low)[:, None]
    rows = grid[low] * (1 - frac[..., None]) + grid[low + 1] * frac[..., None]
    return rows[:, low] * (1 - frac[None]) + rows[:, low + 1] * frac[None]


def _background(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, muted: bool
) -> np.ndarray:
    """Returns a textured (H, W, 3) float background."""
    size = yy.shape[0]
    kind = rng.integers(4)
    if kind == 2:  # Smooth colour blobs.
        grid = np.stack([_background_colour(rng, muted) for _ in range(25)]).reshape(5, 5, 3)
        return _bilinear_upsample(grid, size)
    c0, c1 = _background_colour(rng, muted), _background_colour(rng, muted)
    angle = rng.uniform(0, 2 * np.pi)
    along = np.cos(angle) * xx + np.sin(angle) * yy
    if kind == 0:  # Linear gradient.
        t = (along - along.min()) / (np.ptp(along) + 1e-6)
    elif kind == 1:  # Stripes.
        t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 10) * along + rng.uniform(0, 2 * np.pi))
    else:  # Checkerboard.
        cells = rng.integers(4, 11)
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float64)
    return c0 + (c1 - c0) * t[..., None]


def _shape_mask(
    rng: np.random.Generator, label: int, yy: np.ndarray, xx: np.ndarray, size: int
) -> np.ndarray:
    """Returns the boolean (H, W) mask of one random shape of class `label`."""
    radius = rng.uniform(0.10, 0.22) * size
    cy, cx = rng.uniform(0.5 * radius, size - 0.5 * radius, size=2)
    dy, dx = (yy * size + 0.5) - cy, (xx * size + 0.5) - cx  # Pixel centres.
    theta = rng.uniform(0, 2 * np.pi)
    if label == 1:
        return dy**2 + dx**2 <= radius**2
    if label == 2:
        u = np.cos(theta) * dx + np.sin(theta) * dy
        v = -np.sin(theta) * dx + np.cos(theta) * dy
        return (np.abs(u) <= radius) & (np.abs(v) <= radius * rng.uniform(0.6, 1.0))
    # Equilateral triangle with circumradius 1.2 * radius (about the area of the others):
    # a point is inside when its projection on each edge normal is at most the inradius.
    circumradius = 1.2 * radius
    inside = np.ones_like(dx, dtype=bool)
    for k in range(3):
        normal = theta + np.pi / 3 + 2 * np.pi * k / 3
        inside &= np.cos(normal) * dx + np.sin(normal) * dy <= circumradius / 2
    return inside


def _shape_colour(
    rng: np.random.Generator, label: int, under: np.ndarray, class_hues: bool
) -> np.ndarray:
    """Returns a colour for a shape of class `label` that stands out from `under` (N, 3)."""

    def draw() -> np.ndarray:
        if not class_hues:
            return rng.uniform(0, 255, size=3)
        hue = _CLASS_HUES[label] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)
        return _hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0))

    reference = under.mean(axis=0)
    for _ in range(20):
        colour = draw()
        if np.abs(colour - reference).mean() >= _MIN_CONTRAST:
            return colour
    # Rejection failed (a background close to every candidate): the complement stands out.
    return 255.0 - reference if not class_hues else _hsv(_CLASS_HUES[label], 1.0, 1.0)


def generate_example(
    index: int, split: str, image_size: int, class_hues: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Generates one example of the `shapes` dataset.

    Args:
      index: Index of the example in its split.
      split: `train` or `validation`.
      image_size: Height and width in pixels.
      class_hues: Colour shapes by class and mute the backgrounds.

    Returns:
      `(image, mask)`: uint8 arrays of shapes (S, S, 3) and (S, S), with mask values in
      `[0, len(CLASS_NAMES))`. The result depends only on the arguments.
    """
    rng = np.random.default_rng([SEED, _SPLIT_IDS[split], index])
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    image = _background(rng, yy, xx, muted=class_hues)
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    for _ in range(rng.integers(1, 5)):
        label = int(rng.integers(1, len(CLASS_NAMES)))
        inside = _shape_mask(rng, label, yy, xx, image_size)
        if not inside.any():
            continue
        colour = _shape_colour(rng, label, image[inside], class_hues)
        shading = 1.0 + 0.15 * (np.cos(rng.uniform(0, 2 * np.pi)) * (xx - 0.5))
        image[inside] = np.clip(colour * shading[inside][:, None], 0, 255)
        mask[inside] = label
    image += rng.normal(0, _NOISE_STD, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), mask


class Shapes(common.GeneratedBuilder):
    """Synthetic shapes on textured backgrounds (see the module docstring)."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    CLASS_NAMES = CLASS_NAMES
    PALETTE = PALETTE
    BUILDER_CONFIGS = [
        ShapesConfig(name='default', description='128 x 128, train 2,000 / validation 200.'),
        ShapesConfig(
            name='small',
            description='64 x 64, train 1,000 / validation 100.',
            image_size=64,
            num_train=1000,
            num_validation=100,
        ),
        ShapesConfig(
            name='hard',
            description='As default, but any colour: only the geometry gives the class.',
            class_hues=False,
        ),
    ]

    def generate_example(self, index: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        config = self.builder_config
        return generate_example(index, split, config.image_size, config.class_hues)
