"""`models.pooling`: nn.max_pool's values and gradients (ties included), without indices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_unet_jax.ops import pooling
from tests.ops.helpers import primitive_names


def batch_with_ties(shape, seed=0):
    """Random values, half of them zeros (ReLU outputs), and one all-equal window."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    x = np.where(rng.random(shape) < 0.5, 0.0, x)
    x[0, :3, :3, 0] = 1.0
    return jnp.asarray(x)


def assert_same_function(ours, reference, x, tol=0.0):
    """Equal values; gradients equal up to `tol` (overlapping windows add in another order).

    A gradient sent to the wrong position would be off by O(1) (the cotangent's scale).
    """
    np.testing.assert_array_equal(ours(x), reference(x))
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=reference(x).shape), x.dtype)
    got, want = jax.vjp(ours, x)[1](cotangent)[0], jax.vjp(reference, x)[1](cotangent)[0]
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tol, atol=tol)


@pytest.mark.parametrize('shape', [(2, 6, 8, 3), (2, 7, 5, 3)])
@pytest.mark.parametrize('ceil_mode', [False, True])
def test_2x2_pooling_equals_nn_max_pool(shape, ceil_mode):
    h, w = shape[1:3]
    padding = ((0, h % 2), (0, w % 2)) if ceil_mode else 'VALID'
    assert_same_function(
        lambda x: pooling.max_pool_2x2(x, ceil_mode),
        lambda x: nn.max_pool(x, (2, 2), (2, 2), padding=padding),
        batch_with_ties(shape),
    )


@pytest.mark.parametrize('shape', [(2, 9, 8, 3), (1, 10, 7, 2)])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_overlapping_pooling_equals_nn_max_pool(shape, dtype):
    """The ResNet stem's 3x3 stride-2 pooling: windows overlap, gradients add up."""
    padding = ((1, 1), (1, 1))
    assert_same_function(
        lambda x: pooling.max_pool(x, (3, 3), (2, 2), padding),
        lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=padding),
        batch_with_ties(shape).astype(dtype),
        tol=1e-6 if dtype == jnp.float32 else 2e-2,
    )


def test_gradient_keeps_no_index_tensors():
    # On CPU; other platforms take `nn.max_pool`'s gradient (`platform.on_cpu`).
    x = jnp.zeros((1, 8, 8, 2))
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: pooling.max_pool_2x2(x).sum()))(x)
    on_cpu, elsewhere = primitive_names(jaxpr), primitive_names(jaxpr, 'tpu')
    assert 'reduce_window_max' in on_cpu and 'select_and_scatter_add' not in on_cpu
    reference = jax.make_jaxpr(jax.grad(lambda x: nn.max_pool(x, (2, 2), (2, 2)).sum()))(x)
    assert 'select_and_scatter_add' in primitive_names(reference)  # What the pooling replaces.
    assert 'select_and_scatter_add' in elsewhere
