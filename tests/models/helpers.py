"""Shared helpers for tests of the models: tiny configs, abstract and real runs.

Real compute runs jitted at width 1/16 (`TINY`) on small inputs; full-size shapes and
parameter counts use `jax.eval_shape`, which allocates nothing.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from configs import default

TINY = 1 / 16


def make_config(name, **overrides):
    """A model config: 3 classes, 3 channels, tiny width unless overridden."""
    c = default.get_config().model
    c.update({'name': name, 'num_classes': 3, 'input_channels': 3, 'width': TINY, **overrides})
    return c


def abstract_init(model, shape):
    """The model's variables as shapes (`jax.eval_shape` of `init`, nothing allocated)."""
    return jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct(shape, jnp.float32),
    )


def abstract_apply(model, variables, shape, train=False):
    """The output's shape and dtype (BatchNorm statistics updated and dropped in training)."""
    mutable = ['batch_stats'] if train and 'batch_stats' in variables else False
    out = jax.eval_shape(
        functools.partial(
            model.apply, train=train, rngs={'dropout': jax.random.key(1)}, mutable=mutable
        ),
        variables,
        jax.ShapeDtypeStruct(shape, jnp.float32),
    )
    return out[0] if mutable else out


def random_variables(model, shape, seed=0):
    """Variables with the model's structure, filled by NumPy (no JAX RNG compilations).

    Kernels ~ N(0, 1 / fan_in), BN scale and variance 1, biases and means 0.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == 'kernel':
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)
        return jnp.full(leaf.shape, 1.0 if name in ('scale', 'var') else 0.0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract_init(model, shape))


def run(model, variables, x, train):
    """Jitted apply; returns the output (BN statistics are updated and dropped in training)."""

    def apply(variables, x):
        if not train:
            return model.apply(variables, x, train=False)
        return model.apply(
            variables, x, train=True, rngs={'dropout': jax.random.key(2)}, mutable=['batch_stats']
        )[0]

    return jax.jit(apply)(variables, x)


def real_init(model, shape):
    """Jitted `init_with_output` (cheaper than eager init, which compiles per parameter shape)."""
    init = jax.jit(functools.partial(model.init_with_output, train=False))
    return init(jax.random.key(0), jnp.ones(shape))


def count(tree):
    """The number of elements of all leaves."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def paths(tree):
    """The '/'-joined paths of a variable tree's leaves."""
    return {'/'.join(k) for k in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))}
