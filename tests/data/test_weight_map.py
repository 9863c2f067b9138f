"""Tests of the U-Net border weight map on hand-checkable label maps."""

import numpy as np
import pytest
from scipy import ndimage

from fcn_unet_jax.data.weight_map import _squared_distances, border_weight_map


def _two_squares(gap: int) -> np.ndarray:
    """A 40 x 60 background with two 10 x 10 class-1 squares `gap` pixels apart."""
    label = np.zeros((40, 60), np.uint8)
    label[15:25, 10:20] = 1
    label[15:25, 20 + gap : 30 + gap] = 1
    return label


def test_single_object_has_no_border_term():
    label = np.zeros((30, 30), np.uint8)
    label[10:20, 10:20] = 1
    weights = border_weight_map(label, class_weights=[1.0, 3.0])
    np.testing.assert_array_equal(weights, np.where(label == 1, 3.0, 1.0))


def test_gap_between_close_objects_gets_the_border_weight():
    label = _two_squares(gap=3)
    weights = border_weight_map(label, w0=10.0, sigma=5.0, class_weights=[1.0, 1.0])
    # Middle of the gap (column 21): one pixel from each square, d1 = 2, d2 = 2.
    np.testing.assert_allclose(weights[20, 21], 1.0 + 10.0 * np.exp(-(16) / 50.0), rtol=1e-6)
    # Next to the left square (column 20): d1 = 1, d2 = 3: same sum, same weight.
    np.testing.assert_allclose(weights[20, 20], weights[20, 21], rtol=1e-6)
    # Far from both squares the weight is w_c (up to a negligible border term).
    assert weights[0, 59] == pytest.approx(1.0, abs=1e-3)
    # Inside the objects there is no border term.
    np.testing.assert_array_equal(weights[label == 1], 1.0)
    assert weights[20, 21] > 6.0


def test_ignore_pixels_get_zero_weight():
    label = _two_squares(gap=3)
    label[:5] = 255
    weights = border_weight_map(label)
    np.testing.assert_array_equal(weights[:5], 0.0)
    assert (weights[5:] > 0).all()


def test_inverse_frequency_class_weights():
    label = np.zeros((10, 10), np.uint8)
    label[:2] = 1  # 20 pixels of class 1, 80 of class 0.
    weights = border_weight_map(label, w0=0.0)
    # 1 / (K f_c): equal total weight per class, mean 1.
    np.testing.assert_allclose(weights[label == 1], 100 / (2 * 20))
    np.testing.assert_allclose(weights[label == 0], 100 / (2 * 80))
    assert weights.mean() == pytest.approx(1.0)


def test_instances_separate_touching_objects_of_one_class():
    label = _two_squares(gap=0)
    instances = np.zeros_like(label, np.int32)
    instances[15:25, 10:20] = 1
    instances[15:25, 20:30] = 2
    as_one = border_weight_map(label, class_weights=[1.0, 1.0])
    as_two = border_weight_map(label, class_weights=[1.0, 1.0], instances=instances)
    # Just below the seam: one component gives no border term, two instances a large one.
    assert as_one[25, 19] == pytest.approx(1.0)
    assert as_two[25, 19] == pytest.approx(1.0 + 10.0 * np.exp(-((1 + np.sqrt(2)) ** 2) / 50))


def test_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(0)
    label = (ndimage.gaussian_filter(rng.normal(size=(64, 80)), 3) > 0.05).astype(np.uint8)
    label[rng.random(label.shape) < 0.01] = 255
    weights = border_weight_map(label, w0=10.0, sigma=5.0, class_weights=[1.0, 2.0])
    objects, count = ndimage.label(label == 1)
    assert count >= 3
    distances = np.sort(
        np.stack([ndimage.distance_transform_edt(objects != i) for i in range(1, count + 1)]),
        axis=0,
    )
    expected = np.where(label == 1, 2.0, 1.0)
    background = label == 0
    border = 10.0 * np.exp(-((distances[0] + distances[1]) ** 2) / 50.0)
    expected[background] += border[background]
    expected[label == 255] = 0
    np.testing.assert_allclose(weights, expected, atol=1e-4)


def test_keeps_a_channel_axis():
    label = _two_squares(gap=3)[..., None]
    assert border_weight_map(label).shape == label.shape


def _per_object_reference(label, class_weights, w0=10.0, sigma=5.0):
    """The map from one float distance transform per object, over the same windows."""
    objects, count = ndimage.label(label == 1)
    margin = int(np.ceil(sigma * np.sqrt(-2.0 * np.log(1e-6)))) + 1
    d1 = np.full(label.shape, np.inf)
    d2 = np.full(label.shape, np.inf)
    for index, box in enumerate(ndimage.find_objects(objects), start=1):
        window = tuple(
            slice(max(s.start - margin, 0), min(s.stop + margin, n))
            for s, n in zip(box, label.shape, strict=True)
        )
        distance = ndimage.distance_transform_edt(objects[window] != index)
        d2[window] = np.minimum(d2[window], np.maximum(d1[window], distance))
        d1[window] = np.minimum(d1[window], distance)
    weights = np.where(label == 255, 0.0, np.asarray(class_weights)[np.minimum(label, 1)])
    background = label == 0
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
    weights[background] += border[background]
    return weights.astype(np.float32)


@pytest.mark.parametrize('seed', range(4))
def test_equals_a_distance_transform_per_object_to_the_last_bit(seed):
    # Integer squared distances, rooted only where a border term is added, must give the
    # float per-object transform's weights exactly, not just closely: a changed bit changes
    # the training run.
    rng = np.random.default_rng(seed)
    label = (ndimage.gaussian_filter(rng.normal(size=(90, 120)), 2.5) > 0.15).astype(np.uint8)
    label[rng.random(label.shape) < 0.02] = 255
    class_weights = [0.7, 1.9]
    weights = border_weight_map(label, class_weights=class_weights)
    expected = _per_object_reference(label, class_weights)
    assert ndimage.label(label == 1)[1] >= 20
    np.testing.assert_array_equal(weights.view(np.uint32), expected.view(np.uint32))


def test_squared_distances_agree_in_both_integer_widths():
    outside = np.ones((40, 50), bool)
    outside[10:14, 30:33] = False
    outside[35, 2] = False
    narrow = _squared_distances(outside, np.int32)
    wide = _squared_distances(outside, np.int64)
    np.testing.assert_array_equal(narrow, wide)
    np.testing.assert_array_equal(np.sqrt(wide), ndimage.distance_transform_edt(outside))


def test_negative_label_is_refused():
    label = _two_squares(gap=3).astype(np.int32)
    label[0, 0] = -1
    with pytest.raises(ValueError, match='label holds -1'):
        border_weight_map(label)
