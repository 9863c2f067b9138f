"""The train state and the pure, jittable train and eval steps of one run.

`train.Trainer` builds them for the loop; the benchmarks and the deviceless compile checks
(`aot.py`) build them the same way, so what they measure is what training runs.

`train_step` takes one optimiser step on a global batch: dropout keys are
`fold_in(key, step)`, so a resumed run ends where an uninterrupted one does, and under jit
means and BatchNorm statistics over the sharded batch are global. `eval_step` turns one
padded global eval batch into metric counts (confusion matrix, Boundary IoU and trimap
counts) summed over all devices.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from fcn_unet_jax import inference, losses, metrics, optimizers, sharding

# Variable collections the train step updates (other non-param collections, such as the
# FCN's fixed bilinear upsamplers in `frozen`, are carried along unchanged).
MUTABLE_COLLECTIONS = ('batch_stats',)


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds.

    Attributes:
      step: number of optimiser steps taken (the data position: the pipeline resumes from it).
      params: the learnable `params` collection.
      model_state: the other variable collections (`batch_stats`, `frozen`, ...).
      opt_state: the optax state.
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any

    def variables(self) -> dict:
        """The model's variables, ready for `model.apply`."""
        return {'params': self.params, **self.model_state}

    @classmethod
    def create(cls, variables: dict, tx: optax.GradientTransformation) -> 'TrainState':
        """The state at step 0 of the model's `variables` (its `init` output)."""
        variables = dict(variables)
        params = variables.pop('params')
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=variables,
            opt_state=tx.init(params),
        )


def initial_variables(
    model: flax.linen.Module, config: ml_collections.ConfigDict, rng: jax.Array
) -> dict:
    """Initialises the model's variables on a dummy crop-sized image."""
    height, width = config.input.crop_size
    images = jnp.zeros((1, height, width, config.model.input_channels), jnp.float32)
    return flax.core.unfreeze(model.init({'params': rng}, images, train=False))


@dataclasses.dataclass(frozen=True)
class StatePrograms:
    """The optimiser and the jitted functions that make a run's initial train state.

    Attributes:
      tx: the optax optimiser of `config.optimizer`.
      schedule: its learning-rate schedule.
      init_variables: `rng -> variables`, the model's initial variables, replicated.
      create_state: `variables -> TrainState` at step 0, replicated.
    """

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    init_variables: Callable[[jax.Array], dict]
    create_state: Callable[[dict], TrainState]


def state_programs(
    config: ml_collections.ConfigDict, model: flax.linen.Module, mesh: Mesh
) -> StatePrograms:
    """Builds the optimiser and the jitted initialisation of `model` over `mesh`."""
    replicated = sharding.replicated_sharding(mesh)
    key = jax.eval_shape(jax.random.key, 0)
    abstract = jax.eval_shape(lambda r: initial_variables(model, config, r), key)
    tx, schedule = optimizers.create_optimizer(config, abstract['params'])
    return StatePrograms(
        tx=tx,
        schedule=schedule,
        init_variables=jax.jit(
            lambda r: initial_variables(model, config, r), out_shardings=replicated
        ),
        create_state=jax.jit(lambda v: TrainState.create(v, tx), out_shardings=replicated),
    )


def create_train_state(
    config: ml_collections.ConfigDict,
    model: flax.linen.Module,
    mesh: Mesh,
    rng: jax.Array,
    *,
    pretrained: bool = True,
    programs: StatePrograms | None = None,
) -> tuple[TrainState, optax.GradientTransformation, optax.Schedule]:
    """Initialises the replicated train state (and `config.init_from`, when set).

    Args:
      config: the full config.
      model: the model from `models.build_model(config.model)`.
      mesh: the data-parallel mesh.
      rng: key for parameter initialisation.
      pretrained: load `config.init_from`; False where a checkpoint replaces the state
        anyway (a resumed run, an evaluation), so its file need not exist any more.
      programs: `state_programs(config, model, mesh)` when already built (a run that
        reuses an earlier run's programs); built here when None.

    Returns:
      (state, optimiser, learning-rate schedule).
    """
    programs = programs or state_programs(config, model, mesh)
    variables = programs.init_variables(rng)
    if pretrained and config.init_from:
        from fcn_unet_jax import weights  # The weights importer; only needed here.

        host = jax.tree_util.tree_map(sharding.to_host, variables)
        merged = weights.initialize_from(config.init_from, host, config.model)
        variables = sharding.replicate(merged, sharding.replicated_sharding(mesh))
    state = programs.create_state(variables)
    return state, programs.tx, programs.schedule


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_config: ml_collections.ConfigDict,
    ignore_label: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on a global batch (pure; jitted by the caller).

    Args:
      state: the current train state.
      batch: `image` [B, H, W, C], `label` [B, H, W] and optionally `weight` [B, H, W].
      rng: base key; dropout uses `fold_in(rng, state.step)`.
      model: the Flax module.
      tx: the optimiser.
      schedule: learning-rate schedule (for logging only).
      loss_config: `config.loss`.
      ignore_label: label value that is ignored.

    Returns:
      (new state, float32 scalars: `loss` and its terms, `learning_rate`, `grad_norm`).
    """
    step_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        outputs, new_model_state = model.apply(
            {'params': params, **state.model_state},
            batch['image'],
            train=True,
            rngs={'dropout': step_rng},
            mutable=list(MUTABLE_COLLECTIONS),
        )
        labels, weights = losses.crop_to_output(
            inference.main_logits(outputs), batch['label'], batch.get('weight')
        )
        loss, terms = losses.total_loss(
            outputs, labels, loss_config, ignore_label=ignore_label, pixel_weights=weights
        )
        return loss, (terms, new_model_state)

    grads, (terms, new_model_state) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        model_state={**state.model_state, **new_model_state},
        opt_state=opt_state,
    )
    summary = dict(terms, learning_rate=schedule(state.step), grad_norm=optax.global_norm(grads))
    return new_state, summary


def bind_train_step(
    config: ml_collections.ConfigDict,
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> Callable[[TrainState, Mapping[str, jax.Array], jax.Array], tuple[TrainState, dict]]:
    """`train_step` with the model, optimiser and the config's loss settings bound.

    Returns:
      `step(state, batch, rng) -> (state, summary)`, ready for `jax.jit`.
    """
    return functools.partial(
        train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        loss_config=config.loss,
        ignore_label=config.dataset.ignore_label,
    )


def jit_train_step(
    config: ml_collections.ConfigDict,
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
) -> Callable[[TrainState, Mapping[str, jax.Array], jax.Array], tuple[TrainState, dict]]:
    """The train step as the trainer runs it (and the benchmarks measure it).

    Returns:
      `bind_train_step(config, model, tx, schedule)` jitted over `mesh`: the batch sharded,
      the state and key replicated, the input state donated. It is traced under the mesh,
      which per-device BatchNorm statistics read (`ops.batch_norm.statistics_groups`).
    """
    replicated = sharding.replicated_sharding(mesh)
    bound = bind_train_step(config, model, tx, schedule)

    def step(state, batch, rng):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return bound(state, batch, rng)

    return jax.jit(
        step,
        in_shardings=(replicated, sharding.batch_sharding(mesh), replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )


def eval_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    predict_fn: Callable[[Any, jax.Array], jax.Array],
    num_classes: int,
    ignore_label: int,
    dilation_ratio: float = metrics.BOUNDARY_DILATION_RATIO,
    trimap_widths: Sequence[int] = metrics.TRIMAP_WIDTHS,
) -> dict[str, jax.Array]:
    """The metric counts of one padded global eval batch (summed over all devices).

    Args:
      state: the train state to evaluate.
      batch: `image` [B, H, W, C], `label` [B, H, W] and optionally `mask` [B, H, W].
      predict_fn: `inference.make_predict_fn(...)`: `(variables, images) -> probabilities`
        at the images' full size (whole-image or sliding-window, with test-time views).
      num_classes: number of classes.
      ignore_label: label value that is not scored.
      dilation_ratio: Boundary IoU's band width as a fraction of each image's diagonal.
      trimap_widths: trimap band half-widths in pixels.

    Returns:
      `metrics.segmentation_counts` of the batch: the confusion matrix (rows ground truth),
      Boundary IoU intersections and unions per class and the trimap confusion matrices,
      all from the same predictions, so the boundary bands cost no second forward pass.
    """
    preds = jnp.argmax(predict_fn(state.variables(), batch['image']), axis=-1)
    return metrics.segmentation_counts(
        batch['label'],
        preds,
        num_classes,
        ignore_label,
        batch.get('mask'),
        dilation_ratio=dilation_ratio,
        trimap_widths=trimap_widths,
    )


def jit_eval_step(
    config: ml_collections.ConfigDict, model: flax.linen.Module, mesh: Mesh
) -> Callable[[TrainState, Mapping[str, jax.Array]], dict[str, jax.Array]]:
    """The eval step as the trainer runs it (and the compile checks build it).

    Returns:
      `eval_step` jitted over `mesh` with the config's inference (whole-image or
      sliding-window, each group of windows split over the mesh's devices): `(state, batch)
      -> metric counts`, the batch sharded and the state replicated.
    """
    replicated = sharding.replicated_sharding(mesh)
    return jax.jit(
        functools.partial(
            eval_step,
            predict_fn=inference.make_predict_fn(model, config, mesh),
            num_classes=config.model.num_classes,
            ignore_label=config.dataset.ignore_label,
        ),
        in_shardings=(replicated, sharding.batch_sharding(mesh)),
        out_shardings=replicated,
    )
