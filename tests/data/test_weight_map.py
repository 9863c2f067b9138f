"""Tests of the U-Net border weight map on hand-checkable label maps."""

import numpy as np
import pytest
from scipy import ndimage

from fcn_unet_jax.data.weight_map import border_weight_map


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
