"""Tests of the segmentation losses against direct NumPy formulas."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fcn_unet_jax import losses


def _random_batch(seed=0, n=2, h=5, w=6, c=4, ignore_fraction=0.2):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, h, w, c)).astype(np.float32) * 3
    labels = rng.integers(0, c, size=(n, h, w))
    labels[rng.random((n, h, w)) < ignore_fraction] = 255
    return logits, labels.astype(np.int32)


def _np_nll(logits, labels):
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    safe = np.where(labels == 255, 0, labels)
    return -np.take_along_axis(log_probs, safe[..., None], -1)[..., 0]


def _loss_config(**overrides):
    config = ml_collections.ConfigDict(
        {
            'name': 'cross_entropy',
            'normalization': 'mean',
            'class_weights': None,
            'dice_weight': 1.0,
            'aux_weight': 0.5,
        }
    )
    config.update(overrides)
    return config


def test_cross_entropy_mean_ignores_label_255():
    logits, labels = _random_batch()
    valid = labels != 255
    expected = _np_nll(logits, labels)[valid].mean()
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_cross_entropy_sum_is_per_image_sum():
    logits, labels = _random_batch()
    valid = labels != 255
    expected = _np_nll(logits, labels)[valid].sum() / logits.shape[0]
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), normalization='sum')
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_cross_entropy_class_and_pixel_weights():
    logits, labels = _random_batch(seed=1)
    class_weights = np.array([0.5, 1.0, 2.0, 3.0], np.float32)
    pixel_weights = np.random.default_rng(2).uniform(1, 10, labels.shape).astype(np.float32)
    valid = labels != 255
    cw = class_weights[np.where(valid, labels, 0)] * valid
    expected = (cw * pixel_weights * _np_nll(logits, labels)).sum() / cw.sum()
    got = losses.cross_entropy(
        jnp.asarray(logits),
        jnp.asarray(labels),
        class_weights=class_weights,
        pixel_weights=jnp.asarray(pixel_weights),
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_cross_entropy_all_ignored_is_zero_and_finite():
    logits, labels = _random_batch()
    labels[:] = 255
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    assert float(got) == 0.0


def test_cross_entropy_is_float32_for_bfloat16_logits():
    logits, labels = _random_batch()
    got = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, _np_nll(logits, labels)[labels != 255].mean(), rtol=2e-2)


def test_dice_loss_matches_numpy():
    logits, labels = _random_batch(seed=3)
    valid = (labels != 255)[..., None]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    probs = e / e.sum(-1, keepdims=True) * valid
    onehot = np.eye(4)[np.where(labels == 255, 0, labels)] * valid
    inter = (probs * onehot).sum((0, 1, 2))
    dice = (2 * inter + 1) / (probs.sum((0, 1, 2)) + onehot.sum((0, 1, 2)) + 1)
    got = losses.dice_loss(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(got, 1 - dice.mean(), rtol=1e-5)


def test_dice_loss_near_zero_for_perfect_prediction():
    _, labels = _random_batch(seed=4, ignore_fraction=0.0)
    logits = np.eye(4)[labels] * 50.0
    assert float(losses.dice_loss(jnp.asarray(logits), jnp.asarray(labels))) < 1e-3


def test_combined_loss_and_aux_weight():
    logits, labels = _random_batch(seed=5)
    aux = np.roll(logits, 1, axis=-1)
    config = _loss_config(name='cross_entropy+dice', dice_weight=0.3, aux_weight=0.4)

    def single(x):
        ce = losses.cross_entropy(jnp.asarray(x), jnp.asarray(labels))
        return ce + 0.3 * losses.dice_loss(jnp.asarray(x), jnp.asarray(labels))

    loss, terms = losses.total_loss({'out': logits, 'aux': aux}, jnp.asarray(labels), config)
    np.testing.assert_allclose(terms['main_loss'], single(logits), rtol=1e-5)
    np.testing.assert_allclose(terms['aux_loss'], single(aux), rtol=1e-5)
    np.testing.assert_allclose(loss, single(logits) + 0.4 * single(aux), rtol=1e-5)


def test_unknown_names_and_shape_mismatch_raise():
    logits, labels = _random_batch()
    with pytest.raises(ValueError, match='Unknown loss'):
        losses.total_loss(logits, labels, _loss_config(name='focal'))
    with pytest.raises(ValueError, match='normalization'):
        losses.cross_entropy(logits, labels, normalization='batch')
    with pytest.raises(ValueError, match='do not match'):
        losses.total_loss(logits[:, :-1], labels, _loss_config())


def test_crop_to_output_takes_the_centre_of_labels_and_weights():
    labels = np.arange(2 * 7 * 9).reshape(2, 7, 9).astype(np.int32)
    weights = labels.astype(np.float32) / 10
    logits = jnp.zeros((2, 3, 4, 5))
    cropped, cropped_weights = losses.crop_to_output(logits, labels, weights)
    np.testing.assert_array_equal(cropped, labels[:, 2:5, 2:6])
    np.testing.assert_array_equal(cropped_weights, weights[:, 2:5, 2:6])
    assert losses.crop_to_output(logits, labels)[1] is None
    same, same_weights = losses.crop_to_output(jnp.zeros((2, 7, 9, 5)), labels, weights)
    assert same is labels and same_weights is weights
    with pytest.raises(ValueError, match='larger than the labels'):
        losses.crop_to_output(jnp.zeros((2, 8, 9, 5)), labels)
