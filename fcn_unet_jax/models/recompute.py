"""Recomputation in a backward pass that XLA's CPU compiler does not merge away.

Used by rematerialised blocks (`layers.maybe_remat`) and by the Winograd convolution's
backward pass (`winograd.conv3x3`), which both recompute forward values on purpose to keep
fewer of them alive.
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def keep_recomputation(x: Array) -> Array:
    """`x` plus a zero that XLA's CPU compiler cannot prove equal across recomputations.

    `jax.checkpoint` keeps its recomputation apart from the forward pass with optimisation
    barriers, but XLA:CPU drops the barriers before common-subexpression elimination,
    which then merges the recomputation back into the forward pass: the forward
    activations stay alive and rematerialisation saves nothing. A zero drawn from XLA's
    stateful RNG (never merged; `0 * r` is not folded for floats) makes each computation
    distinct. Other platforms keep their barriers and get `x` unchanged.
    """

    def with_distinct_zero(x: Array) -> Array:
        random = jax.lax.rng_uniform(jnp.float32(0), jnp.float32(1), ())
        return x + (random * 0).astype(x.dtype)

    return jax.lax.platform_dependent(x, cpu=with_distinct_zero, default=lambda x: x)
