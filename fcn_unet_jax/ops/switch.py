"""The switch between the tuned ops of this package and XLA's own (`plain_ops`).

Every op the architectures call asks `uses_plain_ops()` where it is called, in the forward
pass, and then runs either its tuned form or the plain Flax/XLA op with the same
parameters. The choice is a context variable rather than a module field so that it
reaches every op of a model without being threaded through each layer: a model sets it
for its whole forward pass from its `plain_ops` field (`config.model.plain_ops`).

The choice is made while JAX traces, never inside a custom gradient's backward rule:
JAX traces those rules after `model.apply` has returned, outside any `with` block, so a
rule that asked the switch would see its default. A plain op therefore has no custom
gradient at all; it is differentiated by JAX like any Flax layer.

Under `jax.jit` the switch is read once, when the function is traced. A model's
`plain_ops` field is part of the model, so two models that differ in it trace apart; a
`with plain_ops():` block around an already traced function changes nothing.
"""

import contextlib
import contextvars
from collections.abc import Iterator

_PLAIN_OPS = contextvars.ContextVar('fcn_unet_jax_plain_ops', default=False)


@contextlib.contextmanager
def plain_ops(enabled: bool = True) -> Iterator[None]:
    """Within the block, the ops of this package trace as the plain Flax/XLA ops.

    Args:
      enabled: whether to switch to the plain ops. False leaves the enclosing choice in
        force (tuned unless an outer block chose plain), so a model whose field is False
        still honours a user's `with ops.plain_ops():` around it.
    """
    token = _PLAIN_OPS.set(bool(enabled) or _PLAIN_OPS.get())
    try:
        yield
    finally:
        _PLAIN_OPS.reset(token)


def uses_plain_ops() -> bool:
    """Whether ops traced now should be the plain Flax/XLA ops (see `plain_ops`)."""
    return _PLAIN_OPS.get()
