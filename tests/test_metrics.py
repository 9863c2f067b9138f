"""Tests of the confusion matrix and the FCN metric set against direct NumPy formulas, and
of the boundary metrics against hand-worked masks and the reference algorithm."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from fcn_unet_jax import metrics

# Logic checks: compiled-code speed does not matter, compile time does.
pytestmark = pytest.mark.usefixtures('fast_compiles')


def _np_confusion(labels, preds, c, mask=None):
    keep = labels != 255
    if mask is not None:
        keep &= mask
    out = np.zeros((c, c), np.int64)
    for t, p in zip(labels[keep], preds[keep], strict=True):
        out[t, p] += 1
    return out


def _np_scores(n):
    """Paper formulas (FCN section 5), written per class with explicit loops."""
    c = n.shape[0]
    t = n.sum(1)
    acc, iu, dice = [], [], []
    for i in range(c):
        col = n[:, i].sum()
        if t[i] + col == 0:  # Absent from ground truth and prediction: left out.
            continue
        iu.append(n[i, i] / (t[i] + col - n[i, i]))
        dice.append(2 * n[i, i] / (t[i] + col))
        if t[i] > 0:
            acc.append(n[i, i] / t[i])
    fw = sum(t[i] * n[i, i] / (t[i] + n[:, i].sum() - n[i, i]) for i in range(c) if t[i] > 0)
    return {
        'pixel_accuracy': np.trace(n) / t.sum(),
        'mean_accuracy': np.mean(acc),
        'mean_iou': np.mean(iu),
        'frequency_weighted_iou': fw / t.sum(),
        'dice': np.mean(dice),
    }


def test_confusion_matrix_matches_numpy_with_ignore_and_mask():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (3, 7, 9))
    labels[rng.random(labels.shape) < 0.2] = 255
    preds = rng.integers(0, 5, labels.shape)
    mask = rng.random(labels.shape) < 0.8
    got = jax.jit(metrics.confusion_matrix, static_argnums=2)(
        jnp.asarray(labels), jnp.asarray(preds), 5, 255, jnp.asarray(mask)
    )
    np.testing.assert_array_equal(got, _np_confusion(labels, preds, 5, mask))
    np.testing.assert_array_equal(
        metrics.confusion_matrix(labels, preds, 5), _np_confusion(labels, preds, 5)
    )


def test_scores_match_paper_formulas_on_random_data():
    rng = np.random.default_rng(1)
    for _ in range(5):
        confusion = rng.integers(0, 100, (6, 6))
        got = metrics.scores(confusion)
        for key, value in _np_scores(confusion).items():
            np.testing.assert_allclose(got[key], value, rtol=1e-12, err_msg=key)


def test_scores_leave_out_absent_classes():
    confusion = np.zeros((4, 4), np.int64)
    confusion[0, 0], confusion[0, 1], confusion[1, 1] = 8, 2, 5
    confusion[3, 3] = 0
    confusion[0, 2] = 1  # Class 2 is predicted but absent from the ground truth.
    got = metrics.scores(confusion)
    assert np.isnan(got['per_class_iou'][3])  # Absent from both: undefined.
    assert got['per_class_iou'][2] == 0.0
    np.testing.assert_allclose(got['mean_iou'], np.mean([8 / 11, 5 / 7, 0.0]))
    np.testing.assert_allclose(got['mean_accuracy'], np.mean([8 / 11, 1.0]))
    for key, value in _np_scores(confusion).items():
        np.testing.assert_allclose(got[key], value, err_msg=key)


def test_perfect_prediction_scores_one():
    labels = np.random.default_rng(2).integers(0, 3, (2, 8, 8))
    got = metrics.scores(np.asarray(metrics.confusion_matrix(labels, labels, 3)))
    for key in ('pixel_accuracy', 'mean_accuracy', 'mean_iou', 'frequency_weighted_iou', 'dice'):
        assert got[key] == 1.0


def test_all_ignored_gives_empty_matrix_and_nan_scores():
    labels = np.full((2, 4, 4), 255)
    confusion = np.asarray(metrics.confusion_matrix(labels, np.zeros_like(labels), 3))
    assert confusion.sum() == 0
    got = metrics.scores(confusion)
    assert all(np.isnan(got[k]) for k in ('pixel_accuracy', 'mean_iou', 'dice'))


# Boundary metrics on hand-worked masks. With images of at most 10 x 10 pixels the diagonal
# is at most 14.1, so d = max(1, round(0.02 * 14.1)) = 1: a pixel is in X's inner band iff
# it is in X and its 3 x 3 neighbourhood leaves X (or the image).


def _square(shape, top, left, size, label=1, fill=0):
    out = np.full(shape, fill, np.int32)
    out[top : top + size, left : left + size] = label
    return out


def _counts(labels, preds, num_classes=2, mask=None):
    counts = jax.jit(metrics.segmentation_counts, static_argnums=(2, 3))(
        jnp.asarray(labels)[None],
        jnp.asarray(preds)[None],
        num_classes,
        255,
        None if mask is None else jnp.asarray(mask)[None],
    )
    return {key: np.asarray(value) for key, value in counts.items()}


def test_boundary_iou_and_trimap_of_a_shifted_square():
    # Ground truth: a 4 x 4 square (rows 3-6, cols 3-6) in a 10 x 10 image; prediction:
    # the same square one column to the right (cols 4-7).
    labels = _square((10, 10), 3, 3, 4)
    preds = _square((10, 10), 3, 4, 4)
    counts = _counts(labels, preds)
    # Class 1: each square's band is its 12-pixel ring (its 2 x 2 core is eroded). Both
    # rings hold rows 3 and 6 at cols 4-6: 6 pixels; union 12 + 12 - 6 = 18.
    # Class 0: each band is the 36-pixel image frame (the border bounds the mask) plus the
    # 20-pixel ring around its square: 56. The outer rings share rows 2 and 7 at cols 3-7
    # (10 pixels), so the intersection is 36 + 10 = 46 and the union 56 + 56 - 46 = 66.
    np.testing.assert_array_equal(counts['boundary_intersection'], [46, 6])
    np.testing.assert_array_equal(counts['boundary_union'], [66, 18])
    result = metrics.scores_from_counts(counts)
    np.testing.assert_allclose(result['per_class_boundary_iou'], [46 / 66, 6 / 18])
    np.testing.assert_allclose(result['boundary_iou'], (46 / 66 + 1 / 3) / 2)
    np.testing.assert_allclose(result['per_class_iou'][1], 12 / 20)  # Region IoU: 0.6.
    # Trimap at w = 1: the ground truth's inner ring (12) and outer ring (20). Inner ring:
    # col 3 is predicted 0 (4 wrong), the rest 1 (8 right). Outer ring: col 7 at rows 3-6
    # is predicted 1 (4 wrong), the other 16 are right. Accuracy 24 / 32.
    band = counts['trimap_confusion'][0]
    np.testing.assert_array_equal(band, [[16, 4], [4, 8]])
    np.testing.assert_allclose(result['trimap_accuracy_1px'], 24 / 32)
    np.testing.assert_allclose(result['trimap_mean_iou_1px'], (16 / 24 + 8 / 16) / 2)
    # At w = 16 the band holds every pixel: the trimap is the whole confusion matrix.
    np.testing.assert_array_equal(counts['trimap_confusion'][-1], counts['confusion'])


def test_merging_touching_objects_costs_more_boundary_iou_than_region_iou():
    # Two 3 x 3 objects of class 1 (rows 1-3, cols 1-3 and 5-7) in a 5 x 9 image, apart by
    # a 1-pixel background column (col 4); the prediction fills the gap: one 3 x 7 block.
    labels = _square((5, 9), 1, 1, 3) + _square((5, 9), 1, 5, 3)
    preds = np.zeros((5, 9), np.int32)
    preds[1:4, 1:8] = 1
    counts = _counts(labels, preds)
    # Class 1: each 3 x 3 object keeps only its centre, band 8 + 8 = 16; the 3 x 7 block
    # keeps row 2, cols 2-6, band 21 - 5 = 16. Shared: rows 1 and 3 of both objects (12)
    # and row 2 at cols 1 and 7 (2): 14; union 16 + 16 - 14 = 18.
    # Class 0: every background pixel (27) touches an object or the border, band 27; the
    # predicted background is the 24-pixel frame, all in the band and all shared.
    np.testing.assert_array_equal(counts['boundary_intersection'], [24, 14])
    np.testing.assert_array_equal(counts['boundary_union'], [27, 18])
    result = metrics.scores_from_counts(counts)
    np.testing.assert_allclose(result['per_class_iou'], [24 / 27, 18 / 21])
    np.testing.assert_allclose(result['boundary_iou'], (24 / 27 + 14 / 18) / 2)
    assert result['per_class_boundary_iou'][1] < result['per_class_iou'][1]
    # Trimap at w = 1: every pixel but the two object centres (43); the 3 gap pixels are
    # the only errors.
    np.testing.assert_array_equal(counts['trimap_confusion'][0], [[24, 3], [0, 16]])
    np.testing.assert_allclose(result['trimap_accuracy_1px'], 40 / 43)


def test_boundary_counts_leave_out_ignored_pixels():
    # The shifted square of the first test, with the ground truth's top row of the square
    # (row 3, cols 3-6) set to the ignore label.
    labels = _square((10, 10), 3, 3, 4)
    labels[3, 3:7] = 255
    preds = _square((10, 10), 3, 4, 4)
    counts = _counts(labels, preds)
    # Class 1: G is now rows 4-6, cols 3-6 (core: row 5, cols 4-5), band 10. P's band is
    # the 12-pixel ring, of which row 3 at cols 4-6 is ignored: 9 counted. Shared: row 6
    # at cols 4-6 and (4, 4): 4; union 10 + 9 - 4 = 15.
    # Class 0: G and P as in the first test (an ignored pixel is not background), but P's
    # band pixel (3, 3) is now ignored: union 56 + 55 - 46 = 65.
    np.testing.assert_array_equal(counts['boundary_intersection'], [46, 4])
    np.testing.assert_array_equal(counts['boundary_union'], [65, 15])
    assert counts['confusion'].sum() == 96
    assert (counts['trimap_confusion'].sum(axis=(1, 2)) <= 96).all()


def _brute_force_counts(labels, preds, num_classes, ratio):
    """Boundary IoU counts as the authors' `mask_to_boundary` (zero-padded erosion), and
    trimap bands from an explicit window scan, for one image."""
    height, width = labels.shape
    d = metrics.boundary_dilation(height, width, ratio)
    intersection, union = np.zeros(num_classes, int), np.zeros(num_classes, int)
    for c in range(num_classes):
        bands = []
        for x in (labels == c, preds == c):
            eroded = ndimage.binary_erosion(np.pad(x, 1), np.ones((3, 3)), iterations=d)
            bands.append(x & ~eroded[1:-1, 1:-1])
        intersection[c] = (bands[0] & bands[1]).sum()
        union[c] = (bands[0] | bands[1]).sum()
    band = np.zeros(labels.shape, bool)
    for y in range(height):
        for x in range(width):
            window = labels[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3]
            band[y, x] = (window != labels[y, x]).any()
    return intersection, union, band


def test_boundary_counts_match_the_reference_algorithm_and_ignore_eval_padding():
    rng = np.random.default_rng(3)
    labels = np.kron(rng.integers(0, 3, (5, 6)), np.ones((7, 6), int))[:33, :31]
    preds = np.kron(rng.integers(0, 3, (6, 5)), np.ones((6, 7), int))[:33, :31]
    ratio = 0.1  # d = round(0.1 * 45.3) = 5.
    intersection, union, band = _brute_force_counts(labels, preds, 3, ratio)
    # The same image padded to 40 x 36 as an eval batch pads it, next to a filler example.
    padded_labels = np.full((2, 40, 36), 255)
    padded_labels[0, :33, :31] = labels
    padded_preds = rng.integers(0, 3, padded_labels.shape)
    padded_preds[0, :33, :31] = preds
    mask = np.zeros(padded_labels.shape, bool)
    mask[0, :33, :31] = True
    count = functools.partial(metrics.segmentation_counts, dilation_ratio=ratio, trimap_widths=(2,))
    counts = jax.jit(count, static_argnums=(2, 3))(padded_labels, padded_preds, 3, 255, mask)
    np.testing.assert_array_equal(counts['boundary_intersection'], intersection)
    np.testing.assert_array_equal(counts['boundary_union'], union)
    expected_band = np.zeros((3, 3), np.int64)
    np.add.at(expected_band, (labels[band], preds[band]), 1)
    np.testing.assert_array_equal(counts['trimap_confusion'][0], expected_band)


def test_boundary_dilation_is_two_percent_of_the_diagonal():
    assert metrics.boundary_dilation(10, 10) == 1  # Never below one pixel.
    assert metrics.boundary_dilation(256, 256) == 7  # 0.02 * 362.0 = 7.24.
    assert metrics.boundary_dilation(512, 512) == 14  # 0.02 * 724.1 = 14.5.


def test_boundary_scores_leave_out_classes_absent_from_both():
    counts = metrics.zero_counts(3, num_widths=1)
    counts['boundary_intersection'][:] = [5, 0, 0]
    counts['boundary_union'][:] = [10, 4, 0]
    result = metrics.boundary_scores(counts, trimap_widths=(3,))
    assert np.isnan(result['per_class_boundary_iou'][2])
    np.testing.assert_allclose(result['boundary_iou'], (0.5 + 0.0) / 2)
    assert np.isnan(result['trimap_accuracy_3px'])  # An empty band.


def test_both_boundary_count_forms_agree_per_image_radius_ignore_and_padding():
    """CPU's window-extreme form equals the per-class box-sum form (other platforms') exactly:
    images of different real sizes in one padded batch (so different d), ignored pixels,
    predictions on padding, and an all-padding filler example."""
    rng = np.random.default_rng(7)
    num_classes, shape = 4, (4, 40, 36)
    labels = np.stack(
        [np.kron(rng.integers(0, num_classes, (8, 8)), np.ones((5, 5), int))[:40, :36]]
        + [np.kron(rng.integers(0, num_classes, (14, 12)), np.ones((3, 3), int))[:40, :36]] * 3
    )
    labels[rng.random(shape) < 0.03] = 255
    preds = np.where(rng.random(shape) < 0.1, rng.integers(0, num_classes, shape), labels % 4)
    mask = np.zeros(shape, bool)
    for index, (height, width) in enumerate([(40, 36), (25, 30), (10, 12), (0, 0)]):
        mask[index, :height, :width] = True
    labels = np.where(mask, labels, 255)
    labels, preds, mask = jnp.asarray(labels), jnp.asarray(preds), jnp.asarray(mask)
    radius = metrics._image_dilation(mask, 0.1)
    np.testing.assert_array_equal(radius, [5, 4, 2, 1])
    counted = mask & (labels < num_classes)
    args = (labels, preds, mask, counted, radius, num_classes)
    by_windows = metrics._boundary_counts_by_windows(*args, max_radius=6)
    by_box_sums = metrics._boundary_counts_by_box_sums(*args)
    assert by_box_sums[1].sum() > by_box_sums[0].sum() > 0
    for windows, box_sums in zip(by_windows, by_box_sums, strict=True):
        np.testing.assert_array_equal(windows, box_sums)


def test_boundary_counts_lower_to_the_box_sum_form_off_cpu():
    """A TPU program counts with the box sums (cumulative sums), a CPU one with windows."""
    count = jax.jit(lambda labels, preds: metrics.boundary_iou_counts(labels, preds, 3))
    labels = jnp.zeros((1, 16, 16), jnp.int32)
    tpu = count.trace(labels, labels).lower(lowering_platforms=('tpu',)).as_text()
    cpu = count.lower(labels, labels).as_text()
    assert 'gather' in tpu and 'cumsum' in tpu
    assert 'gather' not in cpu and 'cumsum' not in cpu and 'reduce_window' in cpu
