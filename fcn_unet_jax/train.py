"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

One code path for 1 device, many devices and many processes: the jitted train and eval
steps run over `Mesh(devices, ('data',))` with the batch sharded on its leading axis and
the train state replicated. The global batch is `config.batch_size` whatever the number of
devices; each process feeds its own slice and `jax.make_array_from_process_local_data`
assembles the global batch. Under jit, means and BatchNorm statistics over the sharded batch
are global, so results do not depend on the device count.

Reproducibility: the input pipeline is a function of (seed, step) and dropout uses
`fold_in(key, step)`, so a run resumed from a checkpoint at step k ends with the same
parameters as an uninterrupted one. Rerunning the same command resumes from `workdir`.

The mesh and the moves between host and global arrays are in `sharding.py`, the run
directory's files in `workdir.py` (only process 0 writes them) and the checkpoints in
`checkpointing.py` (every process takes part, as orbax requires).
"""

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from fcn_unet_jax import checkpointing, inference, losses, metrics, models, optimizers, sharding
from fcn_unet_jax import workdir as workdir_files
from fcn_unet_jax.data import builders, input_pipeline

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


def initial_variables(
    model: flax.linen.Module, config: ml_collections.ConfigDict, rng: jax.Array
) -> dict:
    """Initialises the model's variables on a dummy crop-sized image."""
    height, width = config.input.crop_size
    images = jnp.zeros((1, height, width, config.model.input_channels), jnp.float32)
    return flax.core.unfreeze(model.init({'params': rng}, images, train=False))


def create_train_state(
    config: ml_collections.ConfigDict,
    model: flax.linen.Module,
    mesh: Mesh,
    rng: jax.Array,
) -> tuple[TrainState, optax.GradientTransformation, optax.Schedule]:
    """Initialises the replicated train state (and `config.init_from`, when set).

    Args:
      config: the full config.
      model: the model from `models.build_model(config.model)`.
      mesh: the data-parallel mesh.
      rng: key for parameter initialisation.

    Returns:
      (state, optimiser, learning-rate schedule).
    """
    replicated = sharding.replicated_sharding(mesh)
    abstract = jax.eval_shape(lambda r: initial_variables(model, config, r), rng)
    tx, schedule = optimizers.create_optimizer(config, abstract['params'])

    def init(variables):
        params = variables.pop('params')
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=variables,
            opt_state=tx.init(params),
        )

    variables = jax.jit(lambda r: initial_variables(model, config, r), out_shardings=replicated)(
        rng
    )
    if config.init_from:
        from fcn_unet_jax import weights  # The weights importer; only needed here.

        host = jax.tree_util.tree_map(sharding.to_host, variables)
        merged = weights.initialize_from(config.init_from, host, config.model)
        variables = sharding.replicate(merged, replicated)
    state = jax.jit(init, out_shardings=replicated)(variables)
    return state, tx, schedule


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
      the state and key replicated, the input state donated.
    """
    replicated = sharding.replicated_sharding(mesh)
    return jax.jit(
        bind_train_step(config, model, tx, schedule),
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
) -> jax.Array:
    """Confusion matrix of one padded global eval batch (summed over all devices).

    Args:
      state: the train state to evaluate.
      batch: `image` [B, H, W, C], `label` [B, H, W] and optionally `mask` [B, H, W].
      predict_fn: `inference.make_predict_fn(...)`: `(variables, images) -> probabilities`
        at the images' full size (whole-image or sliding-window, with test-time views).
      num_classes: number of classes.
      ignore_label: label value that is not scored.

    Returns:
      int confusion matrix [num_classes, num_classes] (rows ground truth).
    """
    preds = jnp.argmax(predict_fn(state.variables(), batch['image']), axis=-1)
    return metrics.confusion_matrix(
        batch['label'], preds, num_classes, ignore_label, batch.get('mask')
    )


def prepare_dataset(config: ml_collections.ConfigDict) -> None:
    """Builds the tfds dataset if needed: process 0 first, so processes never race on it."""
    if jax.process_index() == 0:
        builders.prepare(config.dataset)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices('prepare_dataset')
        builders.prepare(config.dataset)


def _check_batch_sizes(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    for name in ('batch_size', 'eval_batch_size'):
        if config[name] % mesh.size or config[name] % jax.process_count():
            raise ValueError(
                f'config.{name}={config[name]} must be divisible by the number of devices '
                f'({mesh.size}) and processes ({jax.process_count()}).'
            )


class Trainer:
    """The model, mesh, train state and compiled steps of one run.

    Attributes:
      config: the full config.
      mesh: the data-parallel mesh (see `sharding.py`).
      info: the dataset's `input_pipeline.DatasetInfo` (classes, palette).
      model: the Flax module.
      state: the replicated `TrainState`; `train_step` replaces it.
      dropout_rng: the replicated base key of the dropout masks.
      train_step: `jit_train_step(...)`: `(state, batch, rng) -> (state, summary)`.
      eval_step: jitted `eval_step`: `(state, batch) -> confusion matrix`.
    """

    def __init__(self, config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None):
        self.config = config
        self.mesh = sharding.create_mesh(devices)
        _check_batch_sizes(config, self.mesh)  # Before the dataset is prepared: fail fast.
        prepare_dataset(config)
        self.info = input_pipeline.get_dataset_info(config)
        if config.model.num_classes != self.info.num_classes:
            raise ValueError(
                f'config.model.num_classes={config.model.num_classes} but dataset '
                f'{config.dataset.name} has {self.info.num_classes} classes.'
            )
        self.model = models.build_model(config.model)
        self.replicated = sharding.replicated_sharding(self.mesh)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        # Made inside jit so the keys are global arrays, also across processes.
        init_rng, self.dropout_rng = jax.jit(
            lambda: tuple(jax.random.split(jax.random.key(config.seed))),
            out_shardings=self.replicated,
        )()
        self.state, tx, schedule = create_train_state(config, self.model, self.mesh, init_rng)
        self.train_step = jit_train_step(config, self.model, tx, schedule, self.mesh)
        self.eval_step = jax.jit(
            functools.partial(
                eval_step,
                # Sharded inference: each group of windows is split over the mesh's devices.
                predict_fn=inference.make_predict_fn(self.model, config, self.mesh),
                num_classes=config.model.num_classes,
                ignore_label=config.dataset.ignore_label,
            ),
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=self.replicated,
        )

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state (the restore target)."""
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state
        )

    def restore(self, manager: checkpointing.CheckpointManager) -> int | None:
        """Loads the newest usable checkpoint of `manager` into `state`.

        Returns:
          The checkpoint's step, or None (and `state` unchanged) when there is none.
        """
        state, step = manager.restore_latest(self.abstract_state())
        if state is not None:
            self.state = state
        return step

    def train_batches(self, start_step: int):
        """Global train batches from `start_step` on (the pipeline starts at the first one)."""
        iterator = input_pipeline.create_train_iterator(
            self.config,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        for batch in iterator:
            yield sharding.global_batch(batch, self.batch_sharding)

    def evaluate(self, split: str | None = None) -> dict[str, Any]:
        """Scores of the current state on a whole split (every example exactly once)."""
        confusion = np.zeros((self.config.model.num_classes,) * 2, np.int64)
        iterable = input_pipeline.create_eval_iterable(
            self.config, split, process_index=jax.process_index(), process_count=jax.process_count()
        )
        for batch in iterable:
            batch = sharding.global_batch(batch, self.batch_sharding)
            confusion += sharding.to_host(self.eval_step(self.state, batch))
        result = metrics.scores(confusion)
        result['confusion_matrix'] = confusion.tolist()
        return result

    def write_report(
        self, workdir: epath.Path, result: Mapping[str, Any], step: int, split: str
    ) -> dict[str, Any]:
        """Writes the evaluation report of `result` to the workdir and returns it."""
        report = workdir_files.eval_report(result, self.info.class_names, step, split)
        workdir_files.write_eval_results(workdir, report, self.config.dataset.eval_split)
        return report


def _scalar_summaries(result: Mapping[str, Any], prefix: str) -> dict[str, float]:
    return {f'{prefix}{k}': v for k, v in result.items() if isinstance(v, float)}


def _check_finite(step: int, summary: Mapping[str, jax.Array]) -> dict[str, float]:
    values = {k: float(sharding.to_host(v)) for k, v in summary.items()}
    if not np.isfinite(values['loss']):
        raise FloatingPointError(f'Non-finite loss {values["loss"]} at step {step}.')
    return values


class _MetricsReporter:
    """Writes train means per logging interval and eval scores to CLU and metrics.jsonl.

    A step's summary is fetched (and its loss checked) only once the next step has been
    dispatched, or before a checkpoint: the host never waits for the step in flight.

    Attributes:
      writer: the CLU writer (TensorBoard and log on process 0, log only elsewhere).
      train_loss: the mean loss of the last interval written, None before the first.
    """

    def __init__(self, workdir: epath.Path, batch_size: int, step: int):
        self.writer = metric_writers.create_default_writer(
            workdir, just_logging=jax.process_index() != 0
        )
        self.train_loss: float | None = None
        self._json_log = workdir_files.MetricsLog(workdir)
        self._batch_size = batch_size
        self._pending: tuple[int, Mapping[str, jax.Array]] | None = None
        self._interval: list[dict[str, float]] = []
        self._last_step, self._last_time = step, time.time()

    def add(self, step: int, summary: Mapping[str, jax.Array]) -> None:
        """Queues the device summary of `step`, checking the one queued before it."""
        self.check()
        self._pending = (step, summary)

    def check(self) -> None:
        """Checks the queued summary.

        Raises:
          FloatingPointError: on a NaN/Inf loss, naming the step.
        """
        if self._pending is not None:
            self._interval.append(_check_finite(*self._pending))
            self._pending = None

    def write_train(self, step: int) -> None:
        """Writes the means of the steps since the last write (nothing when there are none)."""
        self.check()
        if not self._interval:
            return
        means = {
            f'train/{k}': float(np.mean([s[k] for s in self._interval])) for k in self._interval[0]
        }
        # Includes eval and checkpoint time in the interval: the user-visible throughput.
        now = time.time()
        examples = (step - self._last_step) * self._batch_size
        means['train/examples_per_sec'] = examples / (now - self._last_time)
        self._last_step, self._last_time = step, now
        self._write(step, means)
        self.train_loss = means['train/loss']
        self._interval.clear()

    def write_eval(self, step: int, result: Mapping[str, Any]) -> None:
        """Writes the float scores of an evaluation result as `eval/...`."""
        self._write(step, _scalar_summaries(result, 'eval/'))

    def _write(self, step: int, scalars: Mapping[str, float]) -> None:
        self.writer.write_scalars(step, scalars)
        self._json_log.write(step, scalars)


def _resume(trainer: Trainer, manager: checkpointing.CheckpointManager, workdir: epath.Path) -> int:
    """Restores the workdir's newest checkpoint, if any; returns the step to start from."""
    step = trainer.restore(manager)
    if step is not None:
        logging.info('Resumed from the checkpoint at step %d in %s.', step, workdir)
    parameter_overview.log_parameter_overview(
        jax.tree_util.tree_map(sharding.to_host, trainer.state.params), jax_logging_process=0
    )
    return int(sharding.to_host(trainer.state.step))


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming from its checkpoints) and evaluates it.

    Args:
      config: the full config (see configs/default.py).
      workdir: directory for checkpoints, logs, the resolved config and eval results.
      devices: devices of the data-parallel mesh; default all devices of all processes.

    Returns:
      Summaries: `step`, `train_loss` (mean over the last logging interval), `eval` (the
      final evaluation report, as written to eval_results.json), `preempted` (True when a
      SIGTERM stopped training early; no final evaluation is then run), `run_info` (as
      written to run_info.json: `run_info(config, devices)` plus `end_step` and the
      `wall_seconds` from `start_step` on, compilation, evaluation and checkpoints
      included; a call that resumes where the previous one ended on the same hardware
      adds to its record, otherwise `start_step` is where this call resumed).

    Raises:
      FloatingPointError: on a NaN/Inf loss, naming the step.
    """
    began = time.time()
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, devices)
    workdir_files.write_config(workdir, config)
    manager = checkpointing.CheckpointManager(workdir, keep=config.keep_checkpoints)
    start_step = _resume(trainer, manager, workdir)
    info = workdir_files.continue_run_info(
        workdir, workdir_files.run_info(config, trainer.mesh.devices.flat), start_step
    )
    workdir_files.write_run_info(workdir, info)  # Now: a run that crashes still records it.

    total_steps = config.num_train_steps
    reporter = _MetricsReporter(workdir, config.batch_size, start_step)
    hooks = []
    if jax.process_index() == 0:
        progress = periodic_actions.ReportProgress(
            num_train_steps=total_steps, writer=reporter.writer, every_steps=config.log_every_steps
        )
        hooks.append(progress)
    step, preempted, report = start_step, False, None
    with checkpointing.SigtermFlag() as sigterm, metric_writers.ensure_flushes(reporter.writer):
        batches = trainer.train_batches(start_step)  # A generator: nothing starts if done.
        for step in range(start_step + 1, total_steps + 1):
            with jax.profiler.StepTraceAnnotation('train', step_num=step):
                batch = next(batches)
                trainer.state, summary = trainer.train_step(
                    trainer.state, batch, trainer.dropout_rng
                )
            reporter.add(step, summary)
            for hook in hooks:
                hook(step)
            if step % config.log_every_steps == 0 or step == total_steps:
                reporter.write_train(step)
            if step % config.eval_every_steps == 0 and step != total_steps:
                reporter.write_eval(step, trainer.evaluate())
            preempted = sigterm.any_process()
            if step % config.checkpoint_every_steps == 0 or step == total_steps or preempted:
                reporter.check()  # Never checkpoint a state whose loss was not finite.
                manager.save(step, trainer.state)
            if preempted:
                logging.warning('Stopped by SIGTERM after saving the checkpoint of step %d.', step)
                break
        reporter.write_train(step)
        manager.wait_until_finished()
        if not preempted:
            split = config.dataset.eval_split
            result = trainer.evaluate()
            reporter.write_eval(step, result)
            report = trainer.write_report(workdir, result, step, split)
            scores = _scalar_summaries(result, '')
            logging.info('Final evaluation on %s at step %d: %s', split, step, scores)
    manager.close()
    info.update(end_step=step, wall_seconds=info['wall_seconds'] + time.time() - began)
    workdir_files.write_run_info(workdir, info)
    summaries = {'step': step, 'preempted': preempted, 'run_info': info}
    if reporter.train_loss is not None:
        summaries['train_loss'] = reporter.train_loss
    if report is not None:
        summaries['eval'] = report
    return summaries


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    split: str | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Evaluates the latest checkpoint of `workdir` and writes `eval_results[_SPLIT].json`.

    Args:
      config: the run's config.
      workdir: the run's workdir (must hold a checkpoint).
      split: dataset split; default `config.dataset.eval_split`.
      devices: devices of the data-parallel mesh; default all.

    Returns:
      The evaluation report (also written to the workdir).

    Raises:
      FileNotFoundError: when the workdir holds no usable checkpoint.
    """
    workdir = epath.Path(workdir)
    split = split or config.dataset.eval_split
    trainer = Trainer(config, devices)
    manager = checkpointing.CheckpointManager(workdir, keep=config.keep_checkpoints)
    step = trainer.restore(manager)
    manager.close()
    if step is None:
        raise FileNotFoundError(f'No usable checkpoint in {workdir}.')
    start = time.time()
    result = trainer.evaluate(split)
    report = trainer.write_report(workdir, result, step, split)
    scores = _scalar_summaries(result, '')
    logging.info('Evaluated step %d on %s in %.1f s: %s', step, split, time.time() - start, scores)
    return report
