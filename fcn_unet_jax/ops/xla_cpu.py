"""Steering XLA's CPU compiler: values it must compute once, recomputations it must keep.

Two identity functions that change only how XLA:CPU schedules a program; every other
platform gets the value unchanged (`platform.on_cpu`), since their compilers weigh
recomputation against memory traffic themselves and keep `jax.checkpoint`'s barriers.
With `plain_ops` both are the identity everywhere.

* `materialize(x)`: XLA:CPU fuses a chain of elementwise operations into every consumer
  that can take it, even where the value is materialised anyway for a consumer that cannot
  (a matrix product, a convolution). A ResNet stage's block outputs, each
  `relu(bn(conv) + previous)`, were so recomputed from the stage's first matrix product
  onwards inside later fusions, among them the backward pass's transposed copies for
  kernel gradients, which read every input of the chain in transposed order. Computed
  once, each consumer (the next block's matrix products and residual sum, a decoder's
  skip convolution, the backward pass's copies) reads the value from one buffer.
  `jax.lax.optimization_barrier` does not stop this on CPU (the barriers are gone before
  fusion); a conditional does: its operand is a buffer, and XLA does not fuse across
  control flow.
* `keep_recomputation(x)`: `jax.checkpoint` keeps its recomputation apart from the forward
  pass with optimisation barriers, but XLA:CPU drops the barriers before
  common-subexpression elimination, which then merges the recomputation back into the
  forward pass: the forward activations stay alive and rematerialisation saves nothing.
  Used by rematerialised blocks (`ops.remat`) and by the Winograd convolution's backward
  pass, which both recompute forward values on purpose to keep fewer of them alive.
"""

import jax
import jax.numpy as jnp

from fcn_unet_jax.ops import platform
from fcn_unet_jax.ops.switch import uses_plain_ops

Array = jax.Array


def _through_conditional(x: Array) -> Array:
    # Both branches return x, so the result never depends on the predicate. The branches
    # differ in form (XLA removes a conditional whose branches are identical) and the
    # predicate is a random draw, which the compiler cannot fold.
    draw = jax.lax.rng_uniform(jnp.float32(0), jnp.float32(1), ())
    return jax.lax.cond(draw < 2, lambda v: v, lambda v: v * jnp.ones((), v.dtype), x)


@jax.custom_vjp
def _materialize_on_cpu(x: Array) -> Array:
    return materialize_in_cpu_rule(x)


def materialize_in_cpu_rule(x: Array) -> Array:
    """`materialize` without the switch and undifferentiated, for a rule that runs on CPU.

    For the CPU branch of a custom VJP's rule (`platform.on_cpu`), which is traced outside
    the `plain_ops` block and runs only where the tuned forward pass chose it.
    """
    return platform.on_cpu(_through_conditional, lambda v: v, x)


def _materialize_fwd(x: Array):
    return _materialize_on_cpu(x), None


def _materialize_bwd(_, grad: Array):
    return (grad,)


_materialize_on_cpu.defvjp(_materialize_fwd, _materialize_bwd)


def materialize(x: Array) -> Array:
    """`x`, which consumers on CPU read from one buffer instead of fusing its producers.

    The identity function, with the identity as its gradient. Other platforms, and
    `plain_ops`, get `x` unchanged.
    """
    return x if uses_plain_ops() else _materialize_on_cpu(x)


def keep_recomputation(x: Array) -> Array:
    """`x` plus a zero that XLA's CPU compiler cannot prove equal across recomputations.

    A zero drawn from XLA's stateful RNG (never merged; `0 * r` is not folded for floats)
    makes each recomputation distinct. Other platforms, and `plain_ops`, get `x` unchanged.
    """
    return x if uses_plain_ops() else keep_recomputation_on_cpu(x)


def keep_recomputation_on_cpu(x: Array) -> Array:
    """`keep_recomputation` without the switch, for custom backward rules.

    A backward rule is traced after the forward pass, outside the `plain_ops` block, so
    it must not ask the switch; it only runs where the tuned forward pass chose it.
    """

    def with_distinct_zero(x: Array) -> Array:
        random = jax.lax.rng_uniform(jnp.float32(0), jnp.float32(1), ())
        return x + (random * 0).astype(x.dtype)

    # Not inside a custom VJP: differentiated, both branches are linearised, which costs
    # little for an addition and the identity.
    return platform.on_cpu(with_distinct_zero, lambda x: x, x)
