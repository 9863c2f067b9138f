"""The jitted programs of a training run, and their reuse by the next run of a sweep.

A `train.Trainer` runs five jitted programs: the model's initialisation, the train state's
creation, the train step, the eval step and the predictions for TensorBoard's pictures.
`build` makes them for one config. JAX keeps each function's compiled executables in
memory, but only for that function object: a new run with new functions traces and lowers
every program again, and loads it from the persistent compilation cache at best: 2 to 7 s
per run of the skip ablation's U-Net on 2 CPU cores (docs/performance.md).

Runs of a sweep (`experiments/skip_ablation.py`) differ in their seed, which reaches the
programs only as a runtime value (the keys). Inside `reuse_across_runs()`, `programs_for`
hands a run whose config equals the previous run's in every field but `seed`, on the same
devices, the previous run's programs, compiled executables included; any other config gets
new ones. Only the latest config's programs are kept, so a sweep holds one set at a time.
Outside that context every call builds afresh: a process that trains once gains nothing,
and tests that patch a step between runs see their patch.
"""

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import jax
import ml_collections
from jax.sharding import Mesh

from fcn_unet_jax import eval_pictures, models, train_steps


@dataclasses.dataclass(frozen=True)
class RunPrograms:
    """A run's model and jitted programs (see the module docstring).

    Attributes:
      model: the Flax module of `config.model`.
      state: the optimiser and the jitted initialisation (`train_steps.state_programs`).
      train_step: `train_steps.jit_train_step`: `(state, batch, rng) -> (state, summary)`.
      eval_step: `train_steps.jit_eval_step`: `(state, batch) -> metric counts`.
      predict: `eval_pictures.jit_predict`: `(state, images) -> class indices`.
    """

    model: flax.linen.Module
    state: train_steps.StatePrograms
    train_step: Callable[..., tuple[train_steps.TrainState, dict]]
    eval_step: Callable[..., Mapping[str, jax.Array]]
    predict: Callable[[Any, jax.Array], jax.Array]


def build(config: ml_collections.ConfigDict, mesh: Mesh) -> RunPrograms:
    """Builds (without compiling) the model and programs of `config` over `mesh`."""
    model = models.build_model(config.model)
    state = train_steps.state_programs(config, model, mesh)
    return RunPrograms(
        model=model,
        state=state,
        train_step=train_steps.jit_train_step(config, model, state.tx, state.schedule, mesh),
        eval_step=train_steps.jit_eval_step(config, model, mesh),
        predict=eval_pictures.jit_predict(model, config, mesh),
    )


def reuse_key(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple:
    """What programs may be shared on: every config field but `seed`, and the mesh."""
    fields = config.copy_and_resolve_references()
    fields.seed = 0
    devices = tuple((d.platform, d.id) for d in mesh.devices.flat)
    return fields.to_json(sort_keys=True), devices, mesh.devices.shape, mesh.axis_names


# (reuse_key, RunPrograms) of the latest run inside `reuse_across_runs`; None outside it.
_latest: list[tuple[tuple, RunPrograms]] | None = None


@contextlib.contextmanager
def reuse_across_runs() -> Iterator[None]:
    """Within the block, runs of one config that differ only in `seed` share programs."""
    global _latest
    outer, _latest = _latest, []
    try:
        yield
    finally:
        _latest = outer


def programs_for(config: ml_collections.ConfigDict, mesh: Mesh) -> RunPrograms:
    """The programs of `config` over `mesh`: the previous run's inside `reuse_across_runs`
    when only the seed differs, else new ones."""
    if _latest is None:
        return build(config, mesh)
    key = reuse_key(config, mesh)
    if _latest and _latest[0][0] == key:
        return _latest[0][1]
    programs = build(config, mesh)
    _latest[:] = [(key, programs)]
    return programs
