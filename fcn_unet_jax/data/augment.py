"""Joint image + mask augmentation ops for tf.data (also usable eagerly).

Every op takes the image as float32 `[H, W, C]` in pixel space ([0, 255], RGB; `random_crop`
also takes uint8 and casts only its crop) and the mask as an integer `[H, W, 1]` tensor of
class indices, and moves both with one random draw: bilinear (or bicubic) interpolation
for the image, nearest neighbour for the mask. Pixels that come from outside the source
are filled with `pad_value` in the image (the dataset mean, which normalisation maps to 0)
and with the ignore label in the mask.

All randomness is stateless: each op takes an explicit `seed` (a shape `[2]` integer
tensor), so an augmentation is a pure function of its seed and the pipeline can be
resumed at any step without replaying the ones before it.
"""

from collections.abc import Sequence

import tensorflow as tf

# The per-channel RGB means of each normalisation, in pixel space: padding with these makes
# padded pixels exactly 0 after `normalize`, i.e. they carry no signal.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The FCN reference models (Caffe) subtract this BGR mean from BGR images in [0, 255].
FCN_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
# ITU-R 601-2 luma weights (those of `tf.image.rgb_to_grayscale`), scaled to sum to 1 so that
# white stays 255.
_LUMA = tuple(w / 0.9999 for w in (0.2989, 0.5870, 0.1140))
NORMALIZATIONS = ('unit', 'imagenet', 'fcn_bgr')


def pad_value(normalization: str) -> tuple[float, float, float]:
    """Returns the RGB pixel value that `normalize(..., normalization)` maps to 0.

    Args:
      normalization: One of `NORMALIZATIONS`.

    Returns:
      The dataset mean in pixel space for 'imagenet' and 'fcn_bgr', black for 'unit'.
    """
    if normalization == 'imagenet':
        return tuple(255.0 * m for m in IMAGENET_MEAN)
    if normalization == 'fcn_bgr':
        return tuple(reversed(FCN_BGR_MEAN))
    if normalization == 'unit':
        return (0.0, 0.0, 0.0)
    raise ValueError(f'Unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}.')


def statistics(
    normalization: str, input_channels: int = 3
) -> tuple[tuple[float, ...], tuple[float, ...], bool]:
    """The constants of `normalize`: `(mean, scale, bgr)`, with `input = (pixel - mean) / scale`.

    Args:
      normalization: One of `NORMALIZATIONS`.
      input_channels: 1 (grey: the statistics converted with the luma weights) or 3.

    Returns:
      Per-channel mean and scale in pixel units, in the model input's channel order, and
      whether that order is BGR (the FCN's Caffe convention).
    """
    if input_channels not in (1, 3):
        raise ValueError(f'input_channels must be 1 or 3, got {input_channels}.')
    if normalization == 'unit':
        mean, scale = (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)
    elif normalization == 'imagenet':
        mean = tuple(255.0 * m for m in IMAGENET_MEAN)
        scale = tuple(255.0 * s for s in IMAGENET_STD)
    elif normalization == 'fcn_bgr':
        mean, scale = pad_value('fcn_bgr'), (1.0, 1.0, 1.0)
    else:
        raise ValueError(
            f'Unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}.'
        )
    if input_channels == 1:
        mean = (sum(w * m for w, m in zip(_LUMA, mean, strict=True)),)
        scale = (sum(w * s for w, s in zip(_LUMA, scale, strict=True)),)
        return mean, scale, False
    if normalization == 'fcn_bgr':
        # Statistics above are in RGB order; the Caffe models want BGR.
        return tuple(reversed(mean)), scale, True
    return mean, scale, False


def normalize(image: tf.Tensor, normalization: str, input_channels: int = 3) -> tf.Tensor:
    """Maps an RGB image in pixel space to the model's input space.

    Args:
      image: `[..., H, W, 3]` RGB image in [0, 255] (any real or integer dtype).
      normalization: 'unit' ([0, 1]), 'imagenet' (mean/std on [0, 1]) or 'fcn_bgr' (the
        FCN's Caffe convention: BGR order, mean subtracted, no scaling).
      input_channels: 1 converts to grayscale (luma) first; the statistics are converted
        with the same weights, so the grey mean still maps to 0. Otherwise 3.

    Returns:
      float32 `[..., H, W, input_channels]`.
    """
    mean, scale, bgr = statistics(normalization, input_channels)
    image = tf.cast(image, tf.float32)
    if input_channels == 1:
        luma = tf.constant(_LUMA, tf.float32)
        image = tf.reduce_sum(image * luma, axis=-1, keepdims=True)
    elif bgr:
        image = tf.reverse(image, [-1])  # Not `[..., ::-1]`: TF's slow negative-stride copy.
    return (image - tf.constant(mean, tf.float32)) / tf.constant(scale, tf.float32)


def _pad_constant(x: tf.Tensor, paddings: tf.Tensor, value: Sequence[float] | float) -> tf.Tensor:
    """Pads `[H, W, C]` with a per-channel constant (tf.pad only takes a scalar)."""
    value = tf.cast(tf.constant(value), x.dtype)
    return tf.pad(x - value, paddings) + value


def random_scale(
    image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor, scale_range: Sequence[float]
) -> tuple[tf.Tensor, tf.Tensor]:
    """Rescales image and mask by one factor drawn uniformly from `scale_range`.

    Args:
      image: float32 `[H, W, C]`.
      mask: integer `[H, W, 1]`.
      seed: shape `[2]` integer seed.
      scale_range: `(min, max)` factor; `(1, 1)` is the identity.

    Returns:
      The rescaled image (bilinear) and mask (nearest neighbour), both
      `[round(s H), round(s W), .]`.
    """
    low, high = float(scale_range[0]), float(scale_range[1])
    if low <= 0 or high < low:
        raise ValueError(f'scale_range must satisfy 0 < min <= max, got {scale_range}.')
    scale = tf.random.stateless_uniform([], seed, minval=low, maxval=high)
    size = tf.cast(tf.shape(image)[:2], tf.float32)
    new_size = tf.maximum(tf.cast(tf.round(size * scale), tf.int32), 1)
    image = tf.image.resize(image, new_size, method='bilinear')
    mask = tf.image.resize(mask, new_size, method='nearest')
    return image, mask


def random_crop(
    image: tf.Tensor,
    mask: tf.Tensor,
    seed: tf.Tensor,
    crop_size: Sequence[int],
    pad_value: Sequence[float],
    ignore_label: int,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Takes one random `crop_size` window of image and mask, padding if they are smaller.

    Inputs smaller than the crop are padded at the bottom and right, the image with
    `pad_value` and the mask with `ignore_label`, so padded pixels are never scored.

    Args:
      image: `[H, W, C]` in pixel space (uint8 or float).
      mask: integer `[H, W, 1]`.
      seed: shape `[2]` integer seed.
      crop_size: `(height, width)` of the output.
      pad_value: per-channel image fill.
      ignore_label: mask fill.

    Returns:
      float32 image `[crop_h, crop_w, C]` and int32 mask `[crop_h, crop_w, 1]`.
    """
    crop_h, crop_w = int(crop_size[0]), int(crop_size[1])
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    pad_h, pad_w = tf.maximum(crop_h - height, 0), tf.maximum(crop_w - width, 0)
    limit = tf.stack([height + pad_h - crop_h + 1, width + pad_w - crop_w + 1])
    # Integer stateless_uniform takes scalar bounds only; floor(u * limit) is uniform too.
    offset = tf.cast(tf.random.stateless_uniform([2], seed) * tf.cast(limit, tf.float32), tf.int32)
    offset = tf.minimum(offset, limit - 1)
    # The window of the input padded to at least the crop size, taken as the part inside
    # the input, then padded: the cast and the padding arithmetic run on the crop only,
    # and give the same values as padding the whole input first.
    inside = tf.stack(
        [tf.minimum(crop_h, height - offset[0]), tf.minimum(crop_w, width - offset[1])]
    )
    paddings = [[0, crop_h - inside[0]], [0, crop_w - inside[1]], [0, 0]]
    image = tf.slice(image, [offset[0], offset[1], 0], [inside[0], inside[1], -1])
    mask = tf.slice(mask, [offset[0], offset[1], 0], [inside[0], inside[1], -1])
    image = _pad_constant(tf.cast(image, tf.float32), paddings, pad_value)
    mask = _pad_constant(tf.cast(mask, tf.int32), paddings, ignore_label)
    return tf.ensure_shape(image, [crop_h, crop_w, None]), tf.ensure_shape(
        mask, [crop_h, crop_w, 1]
    )


def random_flip(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Flips image and mask left-right together with probability 1/2.

    Args:
      image: `[H, W, C]`.
      mask: `[H, W, 1]`.
      seed: shape `[2]` integer seed.

    Returns:
      The (possibly) flipped image and mask.
    """
    flip = tf.random.stateless_uniform([], seed) < 0.5
    # tf.cond with tf.reverse, not tf.where over a `[:, ::-1]` slice: the same pixels for
    # a third of the CPU time (a negative-stride slice is TF's slow generic copy, and
    # tf.where would compute both branches). docs/performance.md has the numbers.
    return tf.cond(
        flip,
        lambda: (tf.reverse(image, [1]), tf.reverse(mask, [1])),
        lambda: (image, mask),
    )


def color_jitter(image: tf.Tensor, seed: tf.Tensor, strength: float) -> tf.Tensor:
    """Photometric jitter of strength s (SimCLR's parameterisation; the mask is untouched).

    Brightness (max delta 0.8 s), contrast and saturation (factors in [1 - 0.8 s,
    1 + 0.8 s]) and hue (max delta 0.2 s), applied in this fixed order.

    Args:
      image: float32 `[H, W, 3]` RGB in [0, 255].
      seed: shape `[2]` integer seed.
      strength: s >= 0; 0 returns the image unchanged.

    Returns:
      The jittered image, clipped to [0, 255].
    """
    if strength <= 0:
        return image
    seeds = tf.random.experimental.stateless_split(seed, 4)
    low, high = max(0.0, 1.0 - 0.8 * strength), 1.0 + 0.8 * strength
    # tf.image's colour ops expect [0, 1].
    x = image / 255.0
    x = tf.image.stateless_random_brightness(x, 0.8 * strength, seeds[0])
    x = tf.image.stateless_random_contrast(x, low, high, seeds[1])
    x = tf.image.stateless_random_saturation(tf.clip_by_value(x, 0.0, 1.0), low, high, seeds[2])
    x = tf.image.stateless_random_hue(x, min(0.5, 0.2 * strength), seeds[3])
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def _gather_2d(padded: tf.Tensor, rows: tf.Tensor, cols: tf.Tensor) -> tf.Tensor:
    """Gathers `padded[rows, cols]` for integer index maps of equal shape."""
    width = tf.shape(padded)[1]
    flat = tf.reshape(padded, [-1, tf.shape(padded)[2]])
    return tf.gather(flat, rows * width + cols)


def elastic_deform(
    image: tf.Tensor,
    mask: tf.Tensor,
    seed: tf.Tensor,
    grid_size: int,
    sigma: float,
    pad_value: Sequence[float],
    ignore_label: int,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The U-Net elastic deformation, applied to image and mask with one displacement field.

    Random displacements on a coarse `grid_size` x `grid_size` grid are drawn from
    N(0, sigma^2) pixels (independently for y and x) and interpolated to a dense per-pixel
    field with bicubic upsampling (Ronneberger et al., 2015: 3x3 grid, 10 px, bicubic).
    Output pixel p takes the input at p + d(p): bilinearly for the image, nearest for the
    mask; locations outside the input give `pad_value` / `ignore_label`.

    Args:
      image: float32 `[H, W, C]`.
      mask: integer `[H, W, 1]`.
      seed: shape `[2]` integer seed.
      grid_size: coarse grid points per side.
      sigma: standard deviation of the coarse displacements, in pixels.
      pad_value: per-channel image fill.
      ignore_label: mask fill.

    Returns:
      The deformed image and mask, same shapes as the inputs.
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    coarse = tf.random.stateless_normal([1, grid_size, grid_size, 2], seed, stddev=sigma)
    field = tf.image.resize(coarse, [height, width], method='bicubic')[0]
    ys = tf.cast(tf.range(height), tf.float32)[:, None] + field[..., 0]
    xs = tf.cast(tf.range(width), tf.float32)[None, :] + field[..., 1]

    # A one-pixel ring of fill values around the input: clamping any coordinate into the
    # ring then reads the fill value, so out-of-range samples need no separate branch.
    ring = [[1, 1], [1, 1], [0, 0]]
    padded_image = _pad_constant(image, ring, pad_value)
    padded_mask = _pad_constant(mask, ring, ignore_label)
    max_y, max_x = tf.cast(height + 1, tf.float32), tf.cast(width + 1, tf.float32)
    py = tf.clip_by_value(ys + 1.0, 0.0, max_y)
    px = tf.clip_by_value(xs + 1.0, 0.0, max_x)

    y0, x0 = tf.floor(py), tf.floor(px)
    wy, wx = (py - y0)[..., None], (px - x0)[..., None]
    y0, x0 = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)
    y1, x1 = tf.minimum(y0 + 1, height + 1), tf.minimum(x0 + 1, width + 1)
    top = (1 - wx) * _gather_2d(padded_image, y0, x0) + wx * _gather_2d(padded_image, y0, x1)
    bottom = (1 - wx) * _gather_2d(padded_image, y1, x0) + wx * _gather_2d(padded_image, y1, x1)
    new_image = (1 - wy) * top + wy * bottom

    ny = tf.cast(tf.clip_by_value(tf.floor(ys + 1.5), 0.0, max_y), tf.int32)
    nx = tf.cast(tf.clip_by_value(tf.floor(xs + 1.5), 0.0, max_x), tf.int32)
    new_mask = _gather_2d(padded_mask, ny, nx)
    return new_image, new_mask


def train_augment(
    image: tf.Tensor,
    mask: tf.Tensor,
    seed: tf.Tensor,
    *,
    crop_size: Sequence[int],
    scale_range: Sequence[float] = (1.0, 1.0),
    hflip: bool = False,
    color_jitter_strength: float = 0.0,
    elastic: bool = False,
    elastic_grid: int = 3,
    elastic_sigma: float = 10.0,
    pad_value: Sequence[float] = (0.0, 0.0, 0.0),
    ignore_label: int = 255,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The training chain: jitter, scale, crop, flip, elastic deformation.

    Jitter comes first so that it never alters the fill values added by the later ops; the
    elastic deformation runs on the crop, so its cost does not depend on the source size.

    Args:
      image: `[H, W, 3]` RGB in [0, 255] (uint8 or float).
      mask: integer `[H, W, 1]` class indices.
      seed: shape `[2]` integer seed; the ops get independent seeds split from it.
      crop_size: `(height, width)` of the output.
      scale_range: random rescale range.
      hflip: whether to flip left-right with probability 1/2.
      color_jitter_strength: photometric jitter strength (0 = off).
      elastic: whether to apply the elastic deformation.
      elastic_grid: coarse grid size of the deformation.
      elastic_sigma: coarse displacement std in pixels.
      pad_value: per-channel image fill (see `pad_value()`).
      ignore_label: mask fill.

    Returns:
      float32 image `[crop_h, crop_w, 3]` in pixel space and int32 mask `[crop_h, crop_w, 1]`.
    """
    seeds = tf.random.experimental.stateless_split(seed, 5)
    mask = tf.cast(mask, tf.int32)
    # Without jitter or rescaling the crop casts the image itself, on the crop only.
    if color_jitter_strength > 0:
        image = color_jitter(tf.cast(image, tf.float32), seeds[0], color_jitter_strength)
    if tuple(scale_range) != (1.0, 1.0):
        image, mask = random_scale(tf.cast(image, tf.float32), mask, seeds[1], scale_range)
    image, mask = random_crop(image, mask, seeds[2], crop_size, pad_value, ignore_label)
    if hflip:
        image, mask = random_flip(image, mask, seeds[3])
    if elastic:
        image, mask = elastic_deform(
            image, mask, seeds[4], elastic_grid, elastic_sigma, pad_value, ignore_label
        )
    return image, mask
