"""Tests of the confusion matrix and the FCN metric set against direct NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np

from fcn_unet_jax import metrics


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
