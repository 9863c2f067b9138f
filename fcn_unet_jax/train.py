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

A workdir is never harmed by a command that does not fit it: before any checkpoint is
touched, the config is compared with the workdir's config.json (`workdir.config_changes`),
and a change of a field that defines the run (the model, the optimiser's state tree, the
data) is refused with a `UserError` listing the fields; training with
`restart_from_scratch=True` moves the old run aside first (`workdir.move_run_aside`).
Evaluation only reads the workdir's checkpoints. A failed start leaves no new workdir
behind: the workdir is created only once the dataset, model and train state are built.

The train state and the pure train and eval steps are in `train_steps.py`, the mesh and
the moves between host and global arrays in `sharding.py`, the run
directory's files in `workdir.py` (only process 0 writes them) and the checkpoints in
`checkpointing.py` (every process takes part, as orbax requires).
"""

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from fcn_unet_jax import (
    checkpointing,
    console,
    errors,
    eval_pictures,
    metrics,
    run_programs,
    sharding,
    train_steps,
)
from fcn_unet_jax import workdir as workdir_files
from fcn_unet_jax.data import builders, input_pipeline

# The model's parameter table (name, shape, size, mean, std of every array), in the workdir.
MODEL_SUMMARY_FILE = 'model_summary.txt'


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
            raise errors.UserError(
                f'config.{name}={config[name]} must be divisible by the number of devices '
                f'({mesh.size}) and processes ({jax.process_count()}).',
                hint=f'set --config.{name} to a multiple of {mesh.size}',
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

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        devices: Sequence[jax.Device] | None,
        *,
        pretrained: bool = True,
    ):
        self.config = config
        self.pretrained = pretrained
        self.mesh = sharding.create_mesh(devices)
        _check_batch_sizes(config, self.mesh)  # Before the dataset is prepared: fail fast.
        prepare_dataset(config)
        self.info = input_pipeline.get_dataset_info(config)
        if config.model.num_classes != self.info.num_classes:
            raise errors.UserError(
                f'config.model.num_classes={config.model.num_classes} but dataset '
                f'{config.dataset.name} has {self.info.num_classes} classes.',
                hint=f'set --config.model.num_classes={self.info.num_classes}',
            )
        console.log_dataset(self.info, config)
        # The previous run's programs when a sweep reuses them (`run_programs`).
        programs = run_programs.programs_for(config, self.mesh)
        self.model = programs.model
        self._state_programs = programs.state
        self.replicated = sharding.replicated_sharding(self.mesh)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        # Made inside jit so the keys are global arrays, also across processes.
        self._init_rng, self.dropout_rng = jax.jit(
            lambda: tuple(jax.random.split(jax.random.key(config.seed))),
            out_shardings=self.replicated,
        )()
        logging.info('initialising the model ...')
        self.state, _, _ = train_steps.create_train_state(
            config,
            self.model,
            self.mesh,
            self._init_rng,
            pretrained=pretrained,
            programs=self._state_programs,
        )
        self.train_step = console.FirstCallLogger(programs.train_step, 'the train step')
        self.eval_step = console.FirstCallLogger(programs.eval_step, 'the eval step')
        self.pictures = eval_pictures.EvalPictures(self, programs.predict)

    def load_pretrained(self) -> None:
        """Re-initialises `state` with `config.init_from` (built without it)."""
        check_init_from(self.config)
        self.state, _, _ = train_steps.create_train_state(
            self.config, self.model, self.mesh, self._init_rng, programs=self._state_programs
        )
        self.pretrained = True

    def abstract_state(self) -> train_steps.TrainState:
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
        """Scores of the current state on a whole split (every example exactly once).

        Returns:
          `metrics.scores_from_counts` of the split (the FCN set, Dice, Boundary IoU and the
          trimap metrics) plus `confusion_matrix` (nested lists, rows ground truth).
        """
        totals = metrics.zero_counts(self.config.model.num_classes)
        iterable = input_pipeline.create_eval_iterable(
            self.config, split, process_index=jax.process_index(), process_count=jax.process_count()
        )
        for batch in console.progress(iterable, len(iterable), f'eval {iterable.split}'):
            batch = sharding.global_batch(batch, self.batch_sharding)
            counts = self.eval_step(self.state, batch)
            for key, value in counts.items():
                totals[key] += sharding.to_host(value)  # int64 on the host: no overflow.
        result = metrics.scores_from_counts(totals)
        result['confusion_matrix'] = totals['confusion'].tolist()
        return result

    def write_report(
        self, workdir: epath.Path, result: Mapping[str, Any], step: int, split: str
    ) -> dict[str, Any]:
        """Writes the evaluation report of `result` to the workdir and returns it."""
        report = workdir_files.eval_report(result, self.info.class_names, step, split)
        default_split = self.config.dataset.eval_split
        path = workdir_files.write_eval_results(workdir, report, default_split)
        usual = workdir_files.eval_results_file(split, default_split)
        if path.name != usual:
            logging.warning(
                '%s holds a later step than %d and stays; these scores are in %s.',
                usual,
                step,
                path,
            )
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

    def __init__(
        self, workdir: epath.Path, batch_size: int, step: int, *, total_steps: int | None = None
    ):
        self.writer = metric_writers.create_default_writer(
            workdir, just_logging=jax.process_index() != 0
        )
        self.train_loss: float | None = None
        self._json_log = workdir_files.MetricsLog(workdir, start_step=step)
        self._batch_size = batch_size
        self._total_steps = total_steps  # For the ETA of the progress lines.
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
        if self._total_steps is not None and jax.process_index() == 0:
            steps_per_sec = (step - self._last_step) / (now - self._last_time)
            console.log_train(step, self._total_steps, means, steps_per_sec)
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


def _report_eval(
    trainer: Trainer,
    reporter: _MetricsReporter,
    step: int,
    result: Mapping[str, Any],
    *,
    final: bool,
) -> None:
    """Writes an evaluation's scalars and pictures (TensorBoard) and logs its scores."""
    reporter.write_eval(step, result)
    trainer.pictures.write(reporter.writer, step, result)
    console.log_scores(
        result,
        trainer.info.class_names,
        step=step,
        split=trainer.config.dataset.eval_split,
        per_class=final,
    )


def resolve_config(config: ml_collections.ConfigDict) -> None:
    """Fills in what a config leaves to the data and normalises what the command line gives.

    * `init_from` given as `None` or empty on the command line (the string 'None' or '')
      means from scratch: it becomes None.
    * An unset `model.num_classes` (None) becomes the dataset's class count, from its
      metadata (classes.txt of a `folder` dataset, the builder's class names); the dataset
      is prepared first. A count that is set is kept; `Trainer` refuses it when it
      differs from the dataset's.

    Raises:
      UserError: `input.border_weights` with a loss that has no cross-entropy term, the
        only term the border weight map weights (the map would be computed and ignored).
    """
    if config.input.get('border_weights') and 'cross_entropy' not in config.loss.name:
        raise errors.UserError(
            f'config.input.border_weights=True weights the cross-entropy term, and '
            f'config.loss.name={config.loss.name!r} has none.',
            hint="use loss 'cross_entropy' or 'cross_entropy+dice', or border_weights=False",
        )
    if config.init_from in ('None', 'none', ''):
        config.init_from = None
    if config.model.num_classes is not None:
        return
    prepare_dataset(config)
    info = input_pipeline.get_dataset_info(config)
    config.model.num_classes = info.num_classes
    logging.info('config.model.num_classes=%d (dataset %s)', info.num_classes, config.dataset.name)


def check_init_from(config: ml_collections.ConfigDict) -> None:
    """Raises a MissingInputError, saying how to make it, when `init_from` does not exist."""
    if config.init_from and not epath.Path(config.init_from).exists():
        from fcn_unet_jax.weights.init_from import missing_weights_error

        raise missing_weights_error(config.init_from, config.model.name)


def _resume(trainer: Trainer, manager: checkpointing.CheckpointManager, workdir: epath.Path) -> int:
    """Restores the workdir's newest checkpoint, if any; returns the step to start from.

    A trainer built without its pretrained weights (a checkpoint was expected) loads them
    when no checkpoint can be read, so a fresh start always starts from `init_from`.
    """
    step = trainer.restore(manager)
    if step is not None:
        logging.info('Resumed from the checkpoint at step %d in %s.', step, workdir)
    elif not trainer.pretrained and trainer.config.init_from:
        trainer.load_pretrained()
    if jax.process_index() == 0:
        params = jax.tree_util.tree_map(sharding.to_host, trainer.state.params)
        summary = workdir / MODEL_SUMMARY_FILE
        summary.write_text(parameter_overview.get_parameter_overview(params) + '\n')
        logging.info(
            'model %s: %s parameters (table in %s)',
            trainer.config.model.name,
            f'{parameter_overview.count_parameters(params):,}',
            summary,
        )
    return int(sharding.to_host(trainer.state.step))


def _check_workdir_for_training(
    config: ml_collections.ConfigDict, workdir: epath.Path, restart_from_scratch: bool
) -> list[workdir_files.ConfigChange]:
    """Refuses a config that does not fit the run in `workdir` (unless it restarts).

    Returns:
      The safe changes against the workdir's config.json (recorded once the run resumes);
      none when `restart_from_scratch`.

    Raises:
      UserError: a run-defining field differs and `restart_from_scratch` is False.
    """
    if restart_from_scratch:
        return []
    changes = workdir_files.check_config_fits(
        workdir,
        config,
        hint=(
            'use another --workdir, or add --restart_from_scratch to move that run to '
            f'{workdir_files.next_previous_run_dir(workdir)} and start afresh (nothing '
            'is deleted)'
        ),
    )
    for change in changes:
        logging.info('Config change on resume (recorded in config_history.jsonl): %s', change)
    return changes


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    devices: Sequence[jax.Device] | None = None,
    restart_from_scratch: bool = False,
) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming from its checkpoints) and evaluates it.

    Args:
      config: the full config (see configs/default.py).
      workdir: directory for checkpoints, logs, the resolved config and eval results.
      devices: devices of the data-parallel mesh; default all devices of all processes.
      restart_from_scratch: move a run already in `workdir` to
        `workdir/previous_runs/<n>/` (nothing is deleted) and start at step 0.

    Returns:
      Summaries: `step`, `train_loss` (mean over the last logging interval), `eval` (the
      final evaluation report, as written to eval_results.json), `preempted` (True when a
      SIGTERM stopped training early; no final evaluation is then run), `run_info` (as
      written to run_info.json: `run_info(config, devices)` plus `end_step` and the
      `wall_seconds` from `start_step` on, compilation, evaluation and checkpoints
      included; a call that resumes where the previous one ended on the same hardware
      adds to its record, otherwise `start_step` is where this call resumed).

    Raises:
      UserError: `config` differs from the workdir's run in a run-defining field (see
        `workdir.RUN_DEFINING_FIELDS`), or its checkpoints do not fit the model; nothing in
        the workdir is changed.
      FloatingPointError: on a NaN/Inf loss, naming the step.
    """
    began = time.time()
    workdir = epath.Path(workdir)
    resolve_config(config)
    console.log_config(config, str(workdir))
    changes = _check_workdir_for_training(config, workdir, restart_from_scratch)
    # A resumed run's state comes from its checkpoint: its pretrained file is not read (it
    # may have moved since); a fresh one checks it now, before the dataset is built.
    resuming = not restart_from_scratch and checkpointing.has_checkpoints(workdir)
    if not resuming:
        check_init_from(config)
    trainer = Trainer(config, devices, pretrained=not resuming)
    if restart_from_scratch:
        moved = workdir_files.move_run_aside(workdir)
        if moved is not None:
            logging.warning('--restart_from_scratch: moved the previous run to %s.', moved)
    workdir.mkdir(parents=True, exist_ok=True)
    manager = checkpointing.CheckpointManager(
        workdir, keep=config.keep_checkpoints, run_fields=workdir_files.run_fields(config)
    )
    try:
        start_step = _resume(trainer, manager, workdir)
    except errors.UserError:
        manager.close()
        raise
    workdir_files.record_config(workdir, config, changes, start_step)
    info = workdir_files.continue_run_info(
        workdir, workdir_files.run_info(config, trainer.mesh.devices.flat), start_step
    )
    workdir_files.write_run_info(workdir, info)  # Now: a run that crashes still records it.
    total_steps = config.num_train_steps
    reporter = _MetricsReporter(workdir, config.batch_size, start_step, total_steps=total_steps)
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
                _report_eval(trainer, reporter, step, trainer.evaluate(), final=False)
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
            _report_eval(trainer, reporter, step, result, final=True)
            report = trainer.write_report(workdir, result, step, split)
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

    Only reads the checkpoints: a damaged step is reported and skipped, never moved.

    Args:
      config: the run's config.
      workdir: the run's workdir (must hold a checkpoint).
      split: dataset split; default `config.dataset.eval_split`.
      devices: devices of the data-parallel mesh; default all.

    Returns:
      The evaluation report (also written to the workdir).

    Raises:
      MissingInputError: when the workdir holds no checkpoint (a FileNotFoundError).
      UserError: `config` differs from the run's config.json in a run-defining field, the
        checkpoints do not fit the model, or none of them can be read.
    """
    workdir = epath.Path(workdir)
    split = split or config.dataset.eval_split
    checkpoints = workdir / checkpointing.CHECKPOINT_SUBDIR
    if not checkpointing.has_checkpoints(workdir):
        raise errors.MissingInputError(
            f'No checkpoint in {checkpoints}: there is nothing to evaluate.',
            hint=f'train first: fcn-unet train --config=... --workdir={workdir}',
        )
    resolve_config(config)
    workdir_files.check_config_fits(
        workdir,
        config,
        hint='evaluate with the config the run was trained with (its config.json), '
        'without these overrides',
    )
    trainer = Trainer(config, devices, pretrained=False)  # The checkpoint replaces it.
    input_pipeline.num_split_examples(config, split, '--split')  # Before any restore.
    manager = checkpointing.CheckpointManager(
        workdir,
        keep=config.keep_checkpoints,
        run_fields=workdir_files.run_fields(config),
        read_only=True,
    )
    try:
        step = trainer.restore(manager)
    finally:
        manager.close()
    if step is None:
        raise errors.UserError(
            f'No checkpoint in {checkpoints} could be read (see the warnings above).',
            hint='train again to write a new checkpoint; the damaged ones are left in place',
        )
    start = time.time()
    result = trainer.evaluate(split)
    report = trainer.write_report(workdir, result, step, split)
    logging.info('evaluated step %d in %s', step, console.duration(time.time() - start))
    console.log_scores(result, trainer.info.class_names, step=step, split=split, per_class=True)
    return report
