"""Tests of `xla_cpu.materialize`: the identity, computed once on CPU."""

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_unet_jax.models.resnet import ResNet
from fcn_unet_jax.ops import xla_cpu


def _entry_readers(hlo: str, param_index: int) -> list[str]:
    """The instructions of the compiled module's entry computation that read a parameter."""
    entry = hlo[hlo.index('\nENTRY') :]
    name = re.search(rf'%([\w.\-]+) = \S+ parameter\({param_index}\)', entry).group(1)
    pattern = re.compile(rf'%{re.escape(name)}\b')
    return [
        line
        for line in entry.splitlines()[1:]
        if ' = ' in line and pattern.search(line.split(' = ', 1)[1])
    ]


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_materialize_is_the_identity_with_the_identity_gradient(dtype):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 5, 3)), dtype)
    np.testing.assert_array_equal(jax.jit(xla_cpu.materialize)(x), x)
    weights = jnp.arange(x.size, dtype=dtype).reshape(x.shape)

    def loss(v):
        return jnp.sum(jnp.sin(xla_cpu.materialize(v * 2)) * weights)

    def reference(v):
        return jnp.sum(jnp.sin(v * 2) * weights)

    np.testing.assert_array_equal(jax.jit(jax.grad(loss))(x), jax.jit(jax.grad(reference))(x))


def test_consumers_on_cpu_read_the_materialized_value():
    # A value read by a matrix product (which cannot fuse its producer) and by a
    # transposed copy (which can): without the barrier XLA:CPU (jaxlib 0.10) computes it
    # twice, inside both consumers' fusions; with it, one fusion reads the inputs.
    def f(a, b, w):
        x = xla_cpu.materialize(jax.nn.relu(a * 2 + b))
        return x.reshape(-1, 64) @ w, jnp.transpose(x, (3, 1, 2, 0))

    args = (jnp.ones((4, 16, 16, 64)), jnp.ones((4, 16, 16, 64)), jnp.ones((64, 64)))
    compiled = jax.jit(f).lower(*args).compile()
    assert len(_entry_readers(compiled.as_text(), 0)) == 1
    np.testing.assert_allclose(compiled(*args)[0], jnp.full((4 * 16 * 16, 64), 3.0 * 64))


def test_every_resnet_block_output_is_materialized():
    model = ResNet(depth=50, width=1 / 16)
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), flax.core.unfreeze(variables))
    hlo = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(params, x).compile().as_text()
    entry = hlo[hlo.index('\nENTRY') :]
    assert entry.count(' conditional(') == sum((3, 4, 6, 3))
