"""Rematerialisation of whole blocks in the backward pass (`jax.checkpoint` via `nn.remat`)."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from fcn_unet_jax.ops import xla_cpu


def remat(module_cls: type[nn.Module], enabled: bool, **kwargs: Any) -> Callable[..., Any]:
    """Returns `nn.remat(module_cls)` when `enabled`, else the class itself.

    Lifting keeps the module's name, so parameter paths do not depend on `enabled`.
    `kwargs` go to `nn.remat` (e.g. `static_argnums=(2,)` for a positional `train` flag).
    The rematerialised module's first input passes through `xla_cpu.keep_recomputation`,
    without which XLA:CPU undoes the rematerialisation. Rematerialisation is a model
    option (`config.model.remat`), not a rewrite: `plain_ops` keeps it and drops only
    `keep_recomputation`.
    """
    if not enabled:
        return module_cls

    class Rematerialised(module_cls):
        @nn.compact
        def __call__(self, x, *args, **kwargs):
            return super().__call__(xla_cpu.keep_recomputation(x), *args, **kwargs)

    # Flax names unnamed submodules after their class: keep the original's.
    Rematerialised.__name__ = module_cls.__name__
    Rematerialised.__qualname__ = module_cls.__qualname__
    return nn.remat(Rematerialised, **kwargs)
