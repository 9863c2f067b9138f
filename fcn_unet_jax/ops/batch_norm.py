"""BatchNorm with a hand-written training gradient, and statistics global or per device.

Same parameters, statistics and outputs as `flax.linen.BatchNorm` (`scale`, `bias` and the
`batch_stats` `mean` / `var`; statistics in float32, the variance as E[x^2] - E[x]^2,
running averages updated outside initialisation), so checkpoints and imported weights
load unchanged. What differs is the backward pass in training. Differentiating flax's
normalisation, XLA:CPU writes the output gradient scaled by `scale / std` as one more
activation-sized tensor and reduces over the output gradient three times (for the bias,
through the mean and through the variance). Here the gradient is the textbook one (Ioffe
& Szegedy 2015, section 3), with `sum(dy)` and `sum(dy * (x - mean))` its only
reductions and `dx` one elementwise pass:

    dx = scale / std * (dy - mean(dy) - x_hat * mean(dy * x_hat)).

That saves an activation-sized temporary and two passes over the output gradient per
BatchNorm layer on XLA:CPU, in time and in peak memory (`benchmarks/model_benchmark.py`
measures train steps; results in `docs/performance.md`). The gradient is chosen inside
the custom VJP's backward rule (`platform.on_cpu`): other platforms, and `plain_ops`, get
JAX's derivative of the same forward function, as for flax's BatchNorm.

Statistics (`batch_norm_statistics`, set by the models from `config.model.batch_norm_stats`):

* 'global' (the default): over the whole batch. Under `jax.jit` with the batch sharded over
  the devices, XLA sums the per-device partial sums across devices (one small all-reduce
  per layer in the forward pass and one in the backward pass, each on the critical path),
  so the result does not depend on the number of devices: synchronised BatchNorm.
* 'per_device': over each device's shard of the batch, as a data-parallel PyTorch model
  without SyncBatchNorm does. The batch is viewed as [groups, batch / groups, ...] with
  `groups` the size of the mesh's 'data' axis, kept sharded on that axis, and normalised
  group by group (`jax.vmap`), so no statistic crosses a device in either pass. Results
  then depend on the device count (each device's batch is the global one over it), and the
  running averages, the means over the groups of each group's statistics (as averaging
  per-device `batch_stats` gives), are the one cross-device sum per layer that is left; it
  feeds no later computation of the step, so XLA can combine them all. The group count is
  read while the train step is traced, from the mesh JAX has in context
  (`jax.set_mesh(mesh)`, `jax.sharding.use_abstract_mesh(mesh.abstract_mesh)`); with one
  device it is 1 and both choices compute the same.
"""

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from fcn_unet_jax.ops import platform
from fcn_unet_jax.ops.switch import uses_plain_ops
from fcn_unet_jax.sharding import DATA_AXIS

Array = jax.Array

STATISTICS = ('global', 'per_device')
_STATISTICS = contextvars.ContextVar('fcn_unet_jax_batch_norm_statistics', default='global')


@contextlib.contextmanager
def batch_norm_statistics(statistics: str) -> Iterator[None]:
    """Within the block, `BatchNorm` in training takes its statistics this way.

    A model sets it for its whole forward pass from its `batch_norm_stats` field, as it
    sets `plain_ops`; the choice is read when the model is traced.

    Args:
      statistics: 'global' (over the whole, possibly sharded, batch) or 'per_device' (over
        each device's shard; see the module docstring).

    Raises:
      ValueError: for any other value.
    """
    if statistics not in STATISTICS:
        raise ValueError(f'BatchNorm statistics must be one of {STATISTICS}, got {statistics!r}.')
    token = _STATISTICS.set(statistics)
    try:
        yield
    finally:
        _STATISTICS.reset(token)


def statistics_groups() -> int:
    """How many groups of the batch BatchNorm takes its statistics over, as traced now.

    1 for 'global'; for 'per_device' the size of the 'data' axis of the mesh in context.

    Raises:
      ValueError: for 'per_device' when no mesh with a 'data' axis is in context.
    """
    if _STATISTICS.get() == 'global':
        return 1
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names:
        raise ValueError(
            "BatchNorm statistics 'per_device' need the device mesh while the train step is "
            'traced, to know the devices the batch is split over: trace it under '
            '`jax.set_mesh(mesh)` or `jax.sharding.use_abstract_mesh(mesh.abstract_mesh)` '
            f'(found {mesh}).'
        )
    return mesh.shape[DATA_AXIS]


def _reduced_axes(x: Array) -> tuple[int, ...]:
    # Statistics per channel (the last axis) over all others, as flax's default `axis=-1`.
    return tuple(range(x.ndim - 1))


def _statistics_dtype(x: Array) -> Any:
    # As flax's `force_float32_reductions`: at least float32, also for bfloat16 inputs.
    return jnp.promote_types(x.dtype, jnp.float32)


def _normalize(
    x: Array, mean: Array, var: Array, scale: Array, bias: Array, epsilon: float
) -> Array:
    # The operations of flax's `_normalize`, in its order.
    return (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias


def _batch_statistics(x: Array) -> tuple[Array, Array]:
    x = x.astype(_statistics_dtype(x))
    mean = jnp.mean(x, _reduced_axes(x))
    mean_of_squares = jnp.mean(jnp.square(x), _reduced_axes(x))
    return mean, jnp.maximum(0.0, mean_of_squares - jnp.square(mean))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize_with_batch_statistics(
    x: Array, scale: Array, bias: Array, epsilon: float, dtype: Any
) -> tuple[Array, Array, Array]:
    """Training-mode BatchNorm of `x`: returns `(y, batch mean, batch variance)`.

    Args:
      x: activations, channels last (NHWC for the models).
      scale: per-channel scale (C,).
      bias: per-channel shift (C,).
      epsilon: added to the variance.
      dtype: dtype of `y`.

    Returns:
      `y` in `dtype`, and the batch mean and (biased) variance in float32, which the
      caller folds into its running averages.
    """
    return _forward(x, scale, bias, epsilon, dtype)[0]


def _forward(x, scale, bias, epsilon, dtype):
    mean, var = _batch_statistics(x)
    y = _normalize(x, mean, var, scale, bias, epsilon).astype(dtype)
    return (y, mean, var), (x, scale, bias, mean, var)


def _normalize_by_autodiff(x, scale, bias, epsilon, dtype):
    """`normalize_with_batch_statistics` without its custom gradient (`plain_ops`)."""
    return _forward(x, scale, bias, epsilon, dtype)[0]


def _backward(epsilon, dtype, residuals, cotangents):
    def by_autodiff(x, scale, bias, mean, var, cotangents):
        del mean, var  # JAX's derivative recomputes them (XLA merges the two).
        normalize = functools.partial(_normalize_by_autodiff, epsilon=epsilon, dtype=dtype)
        return platform.vjp_of(normalize)(x, scale, bias, cotangents)

    return platform.on_cpu(
        functools.partial(_textbook_backward, epsilon=epsilon), by_autodiff, *residuals, cotangents
    )


def _textbook_backward(x, scale, bias, mean, var, cotangents, epsilon):
    dy, dmean, dvar = cotangents
    count = x.size // x.shape[-1]
    stats_dtype = _statistics_dtype(x)
    g = dy.astype(stats_dtype)
    centred = x.astype(stats_dtype) - mean
    inv_std = jax.lax.rsqrt(var + epsilon)
    sum_g = jnp.sum(g, _reduced_axes(x))
    sum_g_centred = jnp.sum(g * centred, _reduced_axes(x))
    multiplier = inv_std * scale
    # dx = a * g + b * (x - mean) + c per channel; the batch mean's and variance's own
    # cotangents (zero in a train step, where they only feed the running averages) add
    # to b and c, as d mean / dx = 1 / n and d var / dx = 2 (x - mean) / n (the variance
    # is clipped at zero in the forward pass, where its gradient vanishes).
    dvar = jnp.where(var > 0, dvar, 0)
    b = (2 * dvar - multiplier * jnp.square(inv_std) * sum_g_centred) / count
    c = (dmean - multiplier * sum_g) / count
    dx = multiplier * g + b * centred + c
    dscale = (sum_g_centred * inv_std).astype(scale.dtype)
    dbias = sum_g.astype(bias.dtype)
    return dx.astype(x.dtype), dscale, dbias


normalize_with_batch_statistics.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
    """BatchNorm over the last axis (channels), with `flax.linen.BatchNorm`'s variables.

    In training its gradient is the hand-written one (module docstring); with `plain_ops`
    JAX differentiates the forward pass, as it does flax's BatchNorm.

    Attributes:
      use_running_average: normalise with the running averages (evaluation) instead of
        the batch statistics (training, which also updates the averages).
      momentum: decay of the running averages (0.9 = PyTorch's momentum 0.1).
      epsilon: added to the variance.
      dtype: dtype of the output (default: that of the input and parameters promoted
        together, as in flax).
      param_dtype: dtype of `scale` and `bias`.
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = (x.shape[-1],)
        running_mean = self.variable(
            'batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), features
        )
        running_var = self.variable(
            'batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), features
        )
        scale = self.param('scale', nn.initializers.ones, features, self.param_dtype)
        bias = self.param('bias', nn.initializers.zeros, features, self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, scale, bias)
        if self.use_running_average:
            y = _normalize(x, running_mean.value, running_var.value, scale, bias, self.epsilon)
            return y.astype(dtype)
        normalize = _normalize_by_autodiff if uses_plain_ops() else normalize_with_batch_statistics
        groups = statistics_groups()
        if groups == 1:
            y, mean, var = normalize(x, scale, bias, self.epsilon, dtype)
        else:
            y, mean, var = _normalize_per_group(
                normalize, x, scale, bias, self.epsilon, dtype, groups
            )
        if not self.is_initializing():
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        return y


def _normalize_per_group(normalize, x, scale, bias, epsilon, dtype, groups):
    """`normalize` of each of `groups` equal slices of the batch; their mean statistics."""
    if x.shape[0] % groups:
        raise ValueError(
            f'Per-device BatchNorm statistics split the batch over {groups} devices, but '
            f'the batch of {x.shape[0]} does not divide.'
        )
    grouped = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
    # Group g is device g's shard; the constraint keeps it there, with nothing to sum.
    grouped = jax.lax.with_sharding_constraint(grouped, PartitionSpec(DATA_AXIS))
    y, mean, var = jax.vmap(
        lambda g, s, b: normalize(g, s, b, epsilon, dtype), in_axes=(0, None, None)
    )(grouped, scale, bias)
    return y.reshape(x.shape), jnp.mean(mean, 0), jnp.mean(var, 0)
