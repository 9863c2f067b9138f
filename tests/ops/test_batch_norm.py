"""`models.batch_norm.BatchNorm` against `flax.linen.BatchNorm`: variables, outputs, gradients.

The hand-written training gradient must be the gradient of flax's function: of the loss
through the output, and of anything computed from the returned batch statistics.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_unet_jax.ops import batch_norm

SHAPE = (3, 5, 7, 6)


def _inputs(dtype, offset=1.5):
    rng = np.random.default_rng(0)
    # A mean far from zero and unequal channel scales, as after a conv without bias.
    x = rng.normal(size=SHAPE) * rng.uniform(0.5, 4, size=SHAPE[-1]) + offset
    params = {
        'scale': jnp.asarray(rng.normal(size=SHAPE[-1]), jnp.float32),
        'bias': jnp.asarray(rng.normal(size=SHAPE[-1]), jnp.float32),
    }
    batch_stats = {
        'mean': jnp.asarray(rng.normal(size=SHAPE[-1]), jnp.float32),
        'var': jnp.asarray(rng.uniform(0.5, 2, size=SHAPE[-1]), jnp.float32),
    }
    weights = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
    return jnp.asarray(x, dtype), params, batch_stats, weights


def _layers(train, dtype, epsilon=1e-5):
    options = {
        'use_running_average': not train,
        'momentum': 0.9,
        'epsilon': epsilon,
        'dtype': dtype,
        'param_dtype': jnp.float32,
    }
    return nn.BatchNorm(**options), batch_norm.BatchNorm(**options)


def test_variables_are_flax_batchnorms():
    # A batch mean of 3: had initialisation updated the running mean, it would be 0.3.
    x = jnp.full(SHAPE, 3.0)
    reference, ours = _layers(train=True, dtype=jnp.float32)
    want = reference.init(jax.random.key(0), x)
    got = ours.init(jax.random.key(0), x)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    'dtype, tolerance', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)], ids=['float32', 'bfloat16']
)
@pytest.mark.parametrize('offset', [0.0, 1.5, 40.0])
def test_training_matches_flax(dtype, tolerance, offset):
    x, params, batch_stats, weights = _inputs(dtype, offset)
    reference, ours = _layers(train=True, dtype=dtype)

    def loss(layer, params, x):
        y, updates = layer.apply(
            {'params': params, 'batch_stats': batch_stats}, x, mutable=['batch_stats']
        )
        # The ReLU after the layer, as in every model, and unequal weights per element.
        value = jnp.sum(nn.relu(y).astype(jnp.float32) * weights)
        return value, (y, updates['batch_stats'])

    grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2), has_aux=True), static_argnums=0)
    (value, (y, stats)), grads = grad(ours, params, x)
    (want_value, (want_y, want_stats)), want_grads = grad(reference, params, x)

    assert y.dtype == want_y.dtype == dtype
    np.testing.assert_allclose(np.float32(y), np.float32(want_y), rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(value, want_value, rtol=tolerance)
    for key in ('mean', 'var'):
        np.testing.assert_allclose(stats[key], want_stats[key], rtol=1e-5, atol=1e-6)
    got_params, got_x = grads
    want_params, want_x = want_grads
    for key in ('scale', 'bias'):
        scale = np.abs(want_params[key]).max()
        np.testing.assert_allclose(
            got_params[key], want_params[key], rtol=tolerance, atol=tolerance * scale
        )
    assert got_x.dtype == dtype
    scale = np.abs(np.float32(want_x)).max()
    np.testing.assert_allclose(
        np.float32(got_x), np.float32(want_x), rtol=tolerance, atol=tolerance * scale
    )


def test_gradient_through_the_batch_statistics():
    # In a train step the statistics only feed the running averages, but a loss that
    # reads them must still get their gradient.
    x, params, _, weights = _inputs(jnp.float32)
    axes = (0, 1, 2)

    def reference(x, scale, bias):
        mean = jnp.mean(x, axes)
        var = jnp.maximum(0.0, jnp.mean(x * x, axes) - mean * mean)
        y = (x - mean) * (jax.lax.rsqrt(var + 1e-3) * scale) + bias
        return y, mean, var

    def ours(x, scale, bias):
        return batch_norm.normalize_with_batch_statistics(x, scale, bias, 1e-3, jnp.float32)

    def loss(f, x, scale, bias):
        y, mean, var = f(x, scale, bias)
        ramp = jnp.arange(SHAPE[-1], dtype=jnp.float32)
        return jnp.sum(y * weights) + jnp.sum(mean * ramp) - jnp.sum(var * ramp**2)

    args = (x, params['scale'], params['bias'])
    got = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(*args)
    want = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(*args)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_evaluation_matches_flax():
    x, params, batch_stats, _ = _inputs(jnp.float32)
    variables = {'params': params, 'batch_stats': batch_stats}
    reference, ours = _layers(train=False, dtype=jnp.float32, epsilon=1.001e-5)
    np.testing.assert_array_equal(ours.apply(variables, x), reference.apply(variables, x))


@pytest.mark.parametrize('shape', [(16, 6), (2, 3, 4, 5, 6)])
def test_statistics_are_over_every_axis_but_the_last(shape):
    x = jnp.asarray(np.random.default_rng(1).normal(size=shape) * 2 + 1, jnp.float32)
    reference, ours = _layers(train=True, dtype=jnp.float32)
    variables = reference.init(jax.random.key(0), x)

    def loss(layer, x):
        y, _ = layer.apply(variables, x, mutable=['batch_stats'])
        return jnp.sum(jnp.sin(y))

    for layer_loss in (loss, jax.grad(loss, argnums=1)):
        np.testing.assert_allclose(
            layer_loss(ours, x), layer_loss(reference, x), rtol=1e-5, atol=1e-5
        )
