"""Tests of the joint image + mask augmentation ops, eagerly and inside tf.data.

The test image encodes its mask: every class has its own flat colour, so after any op the
mask still matches the image wherever the colour of a pixel is its class's colour. Only
pixels on class boundaries (where bilinear interpolation mixes colours) may disagree.
"""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from fcn_unet_jax.data import augment

PALETTE = np.array([[20, 40, 60], [200, 30, 30], [30, 200, 30], [30, 30, 200]], np.float32)
PAD = augment.pad_value('imagenet')
IGNORE = 255


def _example(height: int = 48, width: int = 64) -> tuple[tf.Tensor, tf.Tensor]:
    """Blocky mask (8 px cells) of 4 classes and the image painted with PALETTE."""
    rng = np.random.default_rng(0)
    cells = rng.integers(0, 4, size=(-(-height // 8), -(-width // 8)))
    mask = np.kron(cells, np.ones((8, 8), np.int64))[:height, :width]
    image = PALETTE[mask]
    return tf.constant(image), tf.constant(mask[..., None], tf.int32)


def _aligned_fraction(image: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of non-ignored pixels whose colour is nearest to their class's colour."""
    mask = np.asarray(mask)[..., 0]
    distances = np.abs(np.asarray(image)[..., None, :] - PALETTE).sum(axis=-1)
    nearest = distances.argmin(axis=-1)
    scored = mask != IGNORE
    return (nearest == mask)[scored].mean()


def _seed(n: int) -> tf.Tensor:
    return tf.constant([n, 7], tf.int64)


def _chain(image, mask, seed, **overrides):
    kwargs = {
        'crop_size': (40, 40),
        'scale_range': (0.5, 2.0),
        'hflip': True,
        'color_jitter_strength': 0.0,
        'elastic': True,
        'elastic_grid': 3,
        'elastic_sigma': 10.0,
        'pad_value': PAD,
        'ignore_label': IGNORE,
    }
    kwargs.update(overrides)
    return augment.train_augment(image, mask, seed, **kwargs)


@pytest.mark.parametrize('seed', range(4))
def test_random_scale_keeps_alignment_and_range(seed):
    image, mask = _example()
    out_image, out_mask = augment.random_scale(image, mask, _seed(seed), (0.5, 2.0))
    height, width = out_image.shape[:2]
    assert out_mask.shape[:2] == (height, width)
    assert 24 <= height <= 96 and width == pytest.approx(height * 64 / 48, abs=1)
    assert _aligned_fraction(out_image, out_mask) > 0.95
    # Nearest-neighbour: no new label values.
    assert set(np.unique(out_mask)) <= set(np.unique(mask))


def test_random_crop_pads_with_mean_and_ignore():
    image, mask = _example(20, 30)
    out_image, out_mask = augment.random_crop(image, mask, _seed(0), (32, 40), PAD, IGNORE)
    assert out_image.shape == (32, 40, 3) and out_mask.shape == (32, 40, 1)
    # The source is smaller than the crop in both dims: it sits at the top left.
    np.testing.assert_array_equal(out_image[:20, :30], image)
    np.testing.assert_array_equal(out_mask[:20, :30], mask)
    np.testing.assert_allclose(out_image[20:], np.broadcast_to(PAD, (12, 40, 3)), rtol=1e-6)
    np.testing.assert_allclose(out_image[:, 30:], np.broadcast_to(PAD, (32, 10, 3)), rtol=1e-6)
    assert (out_mask[20:] == IGNORE).numpy().all() and (out_mask[:, 30:] == IGNORE).numpy().all()


def test_random_crop_windows_are_aligned_and_vary():
    image, mask = _example(48, 64)
    offsets = set()
    for seed in range(6):
        out_image, out_mask = augment.random_crop(image, mask, _seed(seed), (16, 16), PAD, IGNORE)
        assert _aligned_fraction(out_image, out_mask) == 1.0
        assert (out_mask != IGNORE).numpy().all()
        offsets.add(out_image.numpy().tobytes())
    assert len(offsets) > 1


@pytest.mark.parametrize('crop_size', [(16, 16), (24, 12), (12, 40), (30, 40)])
def test_random_crop_of_uint8_equals_the_window_of_the_padded_float_input(crop_size):
    # The crop slices before it casts and pads; its output must still be a window of the
    # whole input cast to float32 and padded (with the same float32 arithmetic), for crops
    # inside the input, taller, wider or both.
    image, mask = _example(20, 30)
    image8, mask8 = tf.cast(image, tf.uint8), tf.cast(mask, tf.uint8)
    crop_h, crop_w = crop_size
    height, width = max(20, crop_h), max(30, crop_w)
    pad = np.float32(PAD)
    padded = np.zeros((height, width, 3), np.float32)
    padded[:20, :30] = image.numpy() - pad
    padded = padded + pad
    padded_mask = np.full((height, width, 1), IGNORE, np.int32)
    padded_mask[:20, :30] = mask.numpy()
    for seed in range(4):
        out_image, out_mask = augment.random_crop(
            image8, mask8, _seed(seed), crop_size, PAD, IGNORE
        )
        assert out_image.dtype == tf.float32 and out_mask.dtype == tf.int32
        windows = [
            (y, x)
            for y in range(height - crop_h + 1)
            for x in range(width - crop_w + 1)
            if np.array_equal(out_image.numpy(), padded[y : y + crop_h, x : x + crop_w])
            and np.array_equal(out_mask.numpy(), padded_mask[y : y + crop_h, x : x + crop_w])
        ]
        assert windows, f'seed {seed}: not a window of the padded input'


def test_random_flip_moves_image_and_mask_together():
    image, mask = _example()
    flipped = 0
    for seed in range(8):
        out_image, out_mask = augment.random_flip(image, mask, _seed(seed))
        if np.array_equal(out_image, image):
            np.testing.assert_array_equal(out_mask, mask)
        else:
            np.testing.assert_array_equal(out_image, image[:, ::-1])
            np.testing.assert_array_equal(out_mask, mask[:, ::-1])
            flipped += 1
    assert 0 < flipped < 8


def test_elastic_is_deterministic_changes_image_and_keeps_alignment():
    image, mask = _example()
    args = (3, 10.0, PAD, IGNORE)
    first = augment.elastic_deform(image, mask, _seed(1), *args)
    again = augment.elastic_deform(image, mask, _seed(1), *args)
    other = augment.elastic_deform(image, mask, _seed(2), *args)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[0], image)
    assert not np.array_equal(first[1], mask)
    assert _aligned_fraction(*first) > 0.95
    # The check is sharp enough to see a one-pixel misalignment.
    assert _aligned_fraction(first[0][:, 1:], first[1][:, :-1]) < 0.95
    # Pixels pulled from outside the source are filled with the mean / the ignore label. The
    # ring next to the source mixes both in the image (bilinear), so it is left out.
    outside = ndimage.binary_erosion(
        first[1].numpy()[..., 0] == IGNORE, np.ones((3, 3)), border_value=1
    )
    assert outside.sum() > 10
    np.testing.assert_allclose(first[0].numpy()[outside], np.broadcast_to(PAD, (outside.sum(), 3)))


def test_elastic_with_zero_sigma_is_the_identity():
    image, mask = _example()
    out_image, out_mask = augment.elastic_deform(image, mask, _seed(0), 3, 0.0, PAD, IGNORE)
    np.testing.assert_allclose(out_image, image, atol=1e-4)
    np.testing.assert_array_equal(out_mask, mask)


def test_color_jitter_changes_colours_within_range():
    image, _ = _example()
    np.testing.assert_array_equal(augment.color_jitter(image, _seed(0), 0.0), image)
    out = augment.color_jitter(image, _seed(0), 0.5).numpy()
    assert out.min() >= 0.0 and out.max() <= 255.0
    assert np.abs(out - image.numpy()).mean() > 1.0


@pytest.mark.parametrize('normalization', augment.NORMALIZATIONS)
@pytest.mark.parametrize('channels', [1, 3])
def test_pad_value_normalizes_to_zero(normalization, channels):
    pad = tf.constant(augment.pad_value(normalization), tf.float32)[None, None]
    out = augment.normalize(pad, normalization, channels)
    assert out.shape == (1, 1, channels)
    np.testing.assert_allclose(out, 0.0, atol=1e-4)


def test_normalize_conventions():
    pixel = tf.constant([[[10.0, 100.0, 200.0]]])
    np.testing.assert_allclose(augment.normalize(pixel, 'unit'), pixel / 255.0)
    # Caffe FCN: BGR order, BGR mean subtracted, no scaling.
    np.testing.assert_allclose(
        augment.normalize(pixel, 'fcn_bgr')[0, 0],
        np.array([200.0, 100.0, 10.0]) - np.array(augment.FCN_BGR_MEAN),
        rtol=1e-5,
    )
    expected = (np.array([10.0, 100.0, 200.0]) / 255 - augment.IMAGENET_MEAN) / augment.IMAGENET_STD
    np.testing.assert_allclose(augment.normalize(pixel, 'imagenet')[0, 0], expected, rtol=1e-5)
    np.testing.assert_allclose(
        augment.normalize(pixel, 'unit', input_channels=1)[0, 0, 0],
        (0.2989 * 10 + 0.587 * 100 + 0.114 * 200) / 0.9999 / 255,
        rtol=1e-5,
    )


@pytest.mark.parametrize('seed', range(3))
def test_full_chain_keeps_alignment(seed):
    image, mask = _example()
    out_image, out_mask = _chain(image, mask, _seed(seed))
    assert out_image.shape == (40, 40, 3) and out_mask.shape == (40, 40, 1)
    assert out_image.dtype == tf.float32 and out_mask.dtype == tf.int32
    # Lower than for single ops: at scale 0.5 the 8 px cells shrink to 4 px, so more of the
    # pixels lie on (interpolated) boundaries; a flip of only one of the two would give ~0.3.
    assert _aligned_fraction(out_image, out_mask) > 0.85


def test_full_chain_is_the_same_eagerly_and_inside_tf_data():
    image, mask = _example()
    seeds = tf.constant([[s, 3] for s in range(4)], tf.int64)
    eager = [_chain(image, mask, seed, color_jitter_strength=0.3) for seed in seeds]
    ds = tf.data.Dataset.from_tensor_slices(seeds).map(
        lambda s: _chain(image, mask, s, color_jitter_strength=0.3),
        num_parallel_calls=2,
        deterministic=True,
    )
    graph = list(ds.as_numpy_iterator())
    for (eager_image, eager_mask), (graph_image, graph_mask) in zip(eager, graph, strict=True):
        np.testing.assert_allclose(eager_image, graph_image, atol=1e-3)
        np.testing.assert_array_equal(eager_mask, graph_mask)
    # Different seeds give different augmentations.
    assert not np.array_equal(graph[0][0], graph[1][0])


_OPS = {
    'scale': lambda image, mask, seed: augment.random_scale(image, mask, seed, (0.5, 2.0)),
    'crop': lambda image, mask, seed: augment.random_crop(image, mask, seed, (56, 72), PAD, IGNORE),
    'flip': augment.random_flip,
    'elastic': lambda image, mask, seed: augment.elastic_deform(
        image, mask, seed, 3, 10.0, PAD, IGNORE
    ),
    'jitter': lambda image, mask, seed: (augment.color_jitter(image, seed, 0.5), mask),
}


@pytest.mark.parametrize('name', sorted(_OPS))
def test_each_op_inside_tf_data_equals_eager(name):
    op = _OPS[name]
    image, mask = _example()
    seeds = tf.constant([[s, 5] for s in range(3)], tf.int64)
    ds = tf.data.Dataset.from_tensor_slices(seeds).map(lambda s: op(image, mask, s))
    for seed, (graph_image, graph_mask) in zip(seeds, ds.as_numpy_iterator(), strict=True):
        eager_image, eager_mask = op(image, mask, seed)
        np.testing.assert_allclose(graph_image, eager_image, atol=1e-3)
        np.testing.assert_array_equal(graph_mask, eager_mask)
        if name == 'jitter':  # Photometric only: colours change, the mask does not.
            np.testing.assert_array_equal(graph_mask, mask)
        else:
            assert _aligned_fraction(graph_image, graph_mask) > 0.9
