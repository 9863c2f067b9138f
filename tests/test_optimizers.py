"""Tests of the optimiser construction: schedules, bias rules, frozen parameters, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from fcn_unet_jax import optimizers


def _config(**optimizer):
    config = default.get_config()
    config.num_train_steps = 100
    config.optimizer.update(optimizer)
    return config


def _params():
    return {
        'conv': {'kernel': jnp.ones((3, 3)), 'bias': jnp.ones((3,))},
        'encoder': {'conv': {'kernel': jnp.ones((2,)), 'bias': jnp.ones((2,))}},
    }


def _one_update(config, grads=None, params=None):
    params = params or _params()
    tx, _ = optimizers.create_optimizer(config, params)
    grads = grads or jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_groups_by_name_and_frozen_regex():
    groups = optimizers.param_groups(_params(), ('^encoder/',))
    assert groups['conv'] == {'kernel': 'weight', 'bias': 'bias'}
    assert groups['encoder']['conv'] == {'kernel': 'frozen', 'bias': 'frozen'}


def test_sgd_bias_lr_multiplier_and_no_bias_weight_decay():
    config = _config(
        name='sgd',
        learning_rate=0.1,
        schedule='constant',
        momentum=0.99,
        weight_decay=0.5,
        bias_lr_multiplier=2.0,
        bias_weight_decay=False,
    )
    updates = _one_update(config)
    # Weight: -lr * (grad + wd * param) = -0.1 * 1.5; bias: -2 lr * grad, no decay.
    np.testing.assert_allclose(updates['conv']['kernel'], -0.15, rtol=1e-6)
    np.testing.assert_allclose(updates['conv']['bias'], -0.2, rtol=1e-6)


def test_bias_weight_decay_when_enabled():
    config = _config(
        name='sgd', learning_rate=0.1, schedule='constant', weight_decay=0.5, bias_weight_decay=True
    )
    np.testing.assert_allclose(_one_update(config)['conv']['bias'], -0.15, rtol=1e-6)


@pytest.mark.parametrize('name', ['sgd', 'adam', 'adamw'])
def test_frozen_params_stay_fixed(name):
    config = _config(name=name, frozen_params=('^encoder/',), grad_clip_norm=1.0)
    updates = _one_update(config)
    for leaf in jax.tree_util.tree_leaves(updates['encoder']):
        np.testing.assert_array_equal(leaf, 0.0)
    assert np.all(np.asarray(updates['conv']['kernel']) != 0)


def test_frozen_gradients_do_not_count_towards_clipping():
    config = _config(
        name='sgd',
        learning_rate=1.0,
        schedule='constant',
        momentum=0.0,
        weight_decay=0.0,
        frozen_params=('^encoder/',),
        grad_clip_norm=1.0,
    )
    grads = jax.tree_util.tree_map(jnp.zeros_like, _params())
    grads['conv']['bias'] = jnp.array([0.6, 0.0, 0.0])
    grads['encoder']['conv']['kernel'] = jnp.array([100.0, 100.0])
    # Norm 0.6 < 1 once the frozen gradient is left out, so nothing is clipped.
    np.testing.assert_allclose(_one_update(config, grads)['conv']['bias'], [-0.6, 0, 0], rtol=1e-6)


def test_schedules():
    poly = optimizers.create_learning_rate_schedule(
        _config(learning_rate=0.01, schedule='poly', poly_power=0.9)
    )
    np.testing.assert_allclose(poly(50), 0.01 * 0.5**0.9, rtol=1e-5)
    warm = optimizers.create_learning_rate_schedule(
        _config(learning_rate=0.01, schedule='cosine', warmup_steps=10)
    )
    np.testing.assert_allclose(warm(5), 0.005, rtol=1e-5)
    np.testing.assert_allclose(warm(10), 0.01, rtol=1e-5)
    assert float(warm(100)) < 1e-6
    with pytest.raises(ValueError, match='schedule'):
        optimizers.create_learning_rate_schedule(_config(schedule='step'))
