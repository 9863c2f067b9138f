"""BatchNorm statistics over the global batch or per device (`ops.batch_norm_statistics`).

On the 4 simulated CPU devices: per-device statistics on one device are the global ones;
on four they are four separate normalisations of the four shards, whose running averages
are averaged; and the compiled step sums no statistic across devices, where the global
choice sums each layer's in both passes.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fcn_unet_jax import ops, sharding

pytestmark = pytest.mark.usefixtures('fast_compiles')


class _ConvBN(nn.Module):
    """`layers` x (3x3 conv, BatchNorm, ReLU): a small BatchNorm network."""

    layers: int = 2
    statistics: str = 'global'

    @nn.compact
    def __call__(self, x):
        with ops.batch_norm_statistics(self.statistics):
            for _ in range(self.layers):
                x = ops.Conv(4, (3, 3))(x)
                x = nn.relu(ops.BatchNorm(use_running_average=False)(x))
        return x


def _inputs(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * 2 + 1, jnp.float32)


def _step(model, variables):
    """(images) -> (outputs, updated batch_stats, parameter gradients) of a train pass."""

    def loss(params, images):
        y, updates = model.apply({**variables, 'params': params}, images, mutable=['batch_stats'])
        return jnp.sum(jnp.sin(y)), (y, updates['batch_stats'])

    def step(images):
        grads, (y, stats) = jax.grad(loss, has_aux=True)(variables['params'], images)
        return y, stats, grads

    return step


def _run(model, variables, images, devices):
    """`_step` jitted over a mesh of `devices`, the batch sharded, traced under the mesh."""
    mesh = sharding.create_mesh(devices)
    step = jax.jit(
        _step(model, variables),
        in_shardings=sharding.batch_sharding(mesh),
        out_shardings=(sharding.batch_sharding(mesh), *(sharding.replicated_sharding(mesh),) * 2),
    )
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        lowered = step.trace(images).lower()
    compiled = lowered.compile()
    return compiled(jax.device_put(images, NamedSharding(mesh, P('data')))), compiled.as_text()


def _all_reduces(hlo_text):
    return len(re.findall(r'\sall-reduce(?:-start)?\(', hlo_text))


def test_the_choice_is_a_context():
    assert ops.batch_norm.statistics_groups() == 1
    with pytest.raises(ValueError, match='must be one of'), ops.batch_norm_statistics('local'):
        pass
    with ops.batch_norm_statistics('per_device'), pytest.raises(ValueError, match='mesh'):
        ops.batch_norm.statistics_groups()  # No mesh in context: the device count is unknown.
    mesh = sharding.create_mesh(jax.devices()[:2])
    with (
        ops.batch_norm_statistics('per_device'),
        jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
    ):
        assert ops.batch_norm.statistics_groups() == 2
    assert ops.batch_norm.statistics_groups() == 1


@pytest.mark.parametrize('plain', [False, True])
def test_per_device_statistics_on_one_device_are_the_global_ones(plain):
    images = _inputs((4, 6, 6, 3))
    variables = _ConvBN().init(jax.random.key(0), images)
    with ops.plain_ops(plain):
        want, _ = _run(_ConvBN(), variables, images, jax.devices()[:1])
        got, _ = _run(_ConvBN(statistics='per_device'), variables, images, jax.devices()[:1])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('plain', [False, True])
def test_per_device_statistics_normalise_each_devices_shard(plain):
    images = _inputs((8, 6, 6, 3))
    variables = _ConvBN().init(jax.random.key(0), images)
    with ops.plain_ops(plain):
        (y, stats, grads), _ = _run(
            _ConvBN(statistics='per_device'), variables, images, jax.devices()
        )
        # Each device's 2 images alone, with global statistics on one device.
        shards = images.reshape(4, 2, 6, 6, 3)
        per_shard = [_run(_ConvBN(), variables, s, jax.devices()[:1])[0] for s in shards]
    np.testing.assert_allclose(y, jnp.concatenate([s[0] for s in per_shard]), rtol=1e-5, atol=1e-5)
    # Running averages: the mean over the devices of what each device's would be.
    mean_stats = jax.tree.map(lambda *s: sum(s) / len(s), *[s[1] for s in per_shard])
    sum_grads = jax.tree.map(lambda *g: sum(g), *[s[2] for s in per_shard])
    for got_tree, want_tree in ((stats, mean_stats), (grads, sum_grads)):
        for a, b in zip(jax.tree.leaves(got_tree), jax.tree.leaves(want_tree), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_per_device_statistics_are_not_summed_across_devices():
    images = _inputs((8, 6, 6, 3))
    counts = {}
    for layers in (2, 4):
        variables = _ConvBN(layers).init(jax.random.key(0), images)
        for choice in ('global', 'per_device'):
            model = _ConvBN(layers, statistics=choice)
            counts[layers, choice] = _all_reduces(_run(model, variables, images, jax.devices())[1])
    # Global statistics: each layer's statistics (forward) and their gradients (backward)
    # are sums across devices, two more per layer. Per device only the parameter gradients
    # and running averages are, which XLA combines whatever the depth.
    assert counts[4, 'global'] - counts[2, 'global'] >= 4, counts
    assert counts[4, 'per_device'] == counts[2, 'per_device'], counts
    assert counts[4, 'per_device'] < counts[4, 'global'], counts
