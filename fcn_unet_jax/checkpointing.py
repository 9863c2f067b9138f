"""Train-state checkpoints: an orbax `CheckpointManager` wrapper with resume and fallback.

Checkpoints live in `WORKDIR/checkpoints/<step>/`. orbax writes each one to a temporary
directory and renames it when complete, so a crash mid-save never leaves a half-written
step that looks finished. Each step also records, as orbax custom metadata, the config
fields that define the run (`run_fields`, e.g. the model and the data), so that a
checkpoint can say what it was trained with.

On restore the newest step is tried first and three outcomes are kept apart:

* the step's structure or shapes differ from what is asked for (another model, class
  count, optimiser, ...): a `CheckpointMismatchError` (a `UserError`) naming the step, what
  it holds and what was asked for. Nothing is moved: the checkpoint is fine, the command is
  not;
* the step cannot be read (I/O or checksum error, truncated or garbled files): it is
  damaged. A one-line warning names it and the cause; in a training run the step is moved
  to `WORKDIR/checkpoints_damaged/` (so a later save of the same step cannot collide with
  it and keep-N cannot count it as good), in a read-only manager (evaluation) it stays
  where it is. The next older step is tried;
* the step restores: done.

Every process must call `save` and `restore` (orbax coordinates the processes); only the
primary process writes files.
"""

import functools
import logging as std_logging
import os
import re
import shutil
import signal
import sys
import traceback
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from fcn_unet_jax import errors, models
from fcn_unet_jax import workdir as workdir_files

CHECKPOINT_SUBDIR = 'checkpoints'
DAMAGED_SUBDIR = 'checkpoints_damaged'
# Differences listed in a mismatch error (the rest are counted).
_MAX_LISTED = 3
# Characters of an error kept in the one-line damage warning.
_MAX_CAUSE = 200
# orbax's warning on opening any read-only manager (see `_reader`).
_READ_ONLY_NOTICE = 'Given directory is read only=%s'


def has_checkpoints(workdir: str | os.PathLike) -> bool:
    """Whether `workdir` holds a checkpoint folder (readable or not)."""
    checkpoints = epath.Path(workdir) / CHECKPOINT_SUBDIR
    return checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())


class CheckpointMismatchError(errors.UserError):
    """A readable checkpoint whose structure or shapes differ from the ones asked for."""


def _key_name(key: Any) -> str:
    for attribute in ('key', 'name', 'idx'):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'/'-joined path -> shape of each array leaf of a state, abstract state or metadata tree.

    Dataclass fields, named-tuple fields, dict keys and sequence indices all become plain
    names, so a restore target and orbax's metadata of the saved tree give the same paths.
    """
    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, 'shape', None)
        if shape is not None:
            shapes['/'.join(_key_name(k) for k in path)] = tuple(int(d) for d in shape)
    return shapes


def shape_differences(
    stored: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """Human-readable differences between two `leaf_shapes` maps (empty when they agree)."""
    lines = [
        f'{path}: stored {stored[path]}, expected {expected[path]}'
        for path in sorted(stored.keys() & expected.keys())
        if stored[path] != expected[path]
    ]
    lines += [f'{path}: expected, not stored' for path in sorted(expected.keys() - stored.keys())]
    lines += [f'{path}: stored, not expected' for path in sorted(stored.keys() - expected.keys())]
    return lines


def describe_run_fields(fields: Mapping[str, Any] | None) -> str:
    """`model.name='unet', model.num_classes=4, ...` for the model fields of `run_fields`."""
    if not fields:
        return 'an unrecorded config'
    keys = [k for k in fields if k.startswith('model.')] or list(fields)
    return ', '.join(f'{k}={fields[k]!r}' for k in keys)


def mismatch_error(
    what: str,
    differences: list[str],
    stored_fields: Mapping[str, Any] | None,
    asked_fields: Mapping[str, Any] | None,
    hint: str | None = None,
) -> CheckpointMismatchError:
    """The error for a checkpoint that does not fit: what differs, trained with vs asked for.

    Args:
      what: the checkpoint, e.g. 'checkpoint step 4 in DIR'.
      differences: `shape_differences(...)`.
      stored_fields: the run fields the checkpoint recorded, or None (an older checkpoint).
      asked_fields: the run fields of the config asking for it, or None.
      hint: what to do; default: use the config the run was trained with.
    """
    changed = []
    if stored_fields and asked_fields:
        changed = [
            f'{k} {stored_fields[k]!r} -> {asked_fields[k]!r}'
            for k in sorted(stored_fields.keys() & asked_fields.keys())
            if stored_fields[k] != asked_fields[k]
        ]
    if changed:
        detail = 'trained -> asked: ' + ', '.join(changed)
    else:
        listed = differences[:_MAX_LISTED]
        if len(differences) > _MAX_LISTED:
            listed.append(f'and {len(differences) - _MAX_LISTED} more')
        detail = '; '.join(listed)
        if stored_fields:
            detail = f'trained with {describe_run_fields(stored_fields)}; {detail}'
    return CheckpointMismatchError(
        f'{what} does not fit this config ({detail}).',
        hint=hint or 'use the config the run was trained with, or another --workdir',
    )


def one_line_cause(error: BaseException) -> str:
    """`Type: first line` of the innermost cause (the why), without TensorStore's spec dump.

    orbax wraps a read failure ("Encountered error while reading array index ...") around
    TensorStore's own, which names the array and the reason (`OUT_OF_RANGE: Error reading
    "params.conv1.kernel/0.0.0.0" ...: Requested byte range ... is not valid`).
    """
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()[0] if str(error).strip() else ''
    text = re.sub(r'\s*(\[tensorstore_spec=|See full TensorStore details).*', '', text)
    if len(text) > _MAX_CAUSE:
        text = f'{text[: _MAX_CAUSE // 3]} ... {text[-(_MAX_CAUSE - _MAX_CAUSE // 3 - 5) :]}'
    return f'{type(error).__name__}: {text}' if text else type(error).__name__


def _is_abandoned_read(unraisable) -> bool:
    """Whether an unraisable exception is a read of a failed restore, reported late.

    When one read of a restore fails, orbax closes its event loop while the other reads of
    the step are still in flight: each then reports the same failure ("Exception ignored
    in <coroutine ...>", orbax's coroutine) or finds the loop closed (`RuntimeError: Event
    loop is closed` in `call_soon_threadsafe`). Hundreds of tracebacks about one damaged
    step, which the one warning line already names.
    """
    code = getattr(unraisable.object, 'cr_code', None)
    if code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename:
        return True
    # The closed-loop report is recognised by where it is raised (asyncio's own check),
    # not by who called it: a read's completion reaches `call_soon_threadsafe` directly
    # or through a wrapper, depending on how far the read had got when the loop closed.
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return (
        unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == 'Event loop is closed'
        and bool(frames)
        and frames[-1].name == '_check_closed'
        and frames[-1].filename.endswith(os.path.join('asyncio', 'base_events.py'))
    )


def _quiet_abandoned_reads() -> None:
    """Installs (once) an unraisable hook that drops `_is_abandoned_read` reports."""
    if getattr(sys.unraisablehook, 'drops_abandoned_reads', False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_abandoned_read(unraisable):
            previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook


class _DropNotice(std_logging.Filter):
    """Drops log records whose unformatted message is `message`."""

    def __init__(self, message: str):
        super().__init__()
        self._message = message

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.msg != self._message


def _reader(directory: epath.Path) -> ocp.CheckpointManager:
    """An orbax manager that only reads `directory`: creates, saves and deletes nothing."""
    # orbax warns 'Given directory is read only' for every reader: on every evaluation and
    # prediction, about nothing the user did. That one record is dropped.
    notice = _DropNotice(_READ_ONLY_NOTICE)
    absl_logger = std_logging.getLogger('absl')
    absl_logger.addFilter(notice)
    try:
        return ocp.CheckpointManager(
            directory,
            # keep-N and the save interval mean nothing to a reader (orbax warns otherwise).
            options=ocp.CheckpointManagerOptions(
                read_only=True, create=False, save_interval_steps=0
            ),
            item_handlers=ocp.StandardCheckpointHandler(),
        )
    finally:
        absl_logger.removeFilter(notice)


class CheckpointManager:
    """Saves and restores the train state (any pytree) of one workdir.

    Attributes:
      directory: where the steps are written.
      read_only: whether the manager only reads (evaluation): it creates no directory and
        never moves a damaged step.
    """

    def __init__(
        self,
        workdir: str,
        *,
        keep: int | None,
        run_fields: Mapping[str, Any] | None = None,
        read_only: bool = False,
    ):
        """Opens (creating it if needed, unless `read_only`) the checkpoint directory.

        Args:
          workdir: the run's working directory.
          keep: number of most recent checkpoints to keep; None keeps all.
          run_fields: the config fields that define the run (JSON values), recorded with
            every step saved and compared with a step's own on restore.
          read_only: only read: nothing is created, saved or moved.
        """
        # orbax (tensorstore) requires absolute paths.
        workdir = epath.Path(os.path.abspath(workdir))
        self.directory = workdir / CHECKPOINT_SUBDIR
        self.read_only = read_only
        self._damaged_dir = workdir / DAMAGED_SUBDIR
        self._run_fields = dict(run_fields) if run_fields is not None else None
        if read_only:
            self._manager = _reader(self.directory)
        else:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
                item_handlers=ocp.StandardCheckpointHandler(),
            )

    def all_steps(self) -> list[int]:
        """Steps with a finished checkpoint, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finished step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state) -> None:
        """Starts an (asynchronous) save of `state` at `step`; a step already saved is skipped.

        Args:
          step: training step the state corresponds to.
          state: pytree of arrays (global `jax.Array`s are fine).
        """
        if step in self._manager.all_steps():
            return
        metadata = {'run_fields': self._run_fields} if self._run_fields is not None else None
        self._manager.save(
            step, args=ocp.args.StandardSave(state), force=True, custom_metadata=metadata
        )

    def step_run_fields(self, step: int) -> dict[str, Any] | None:
        """The run fields recorded with `step`, or None (not recorded, or unreadable)."""
        try:
            custom = self._manager.metadata(step).custom_metadata or {}
        except Exception:  # A damaged step's metadata: the restore reports it.
            return None
        return custom.get('run_fields')

    def _check_fits(self, step: int, abstract_state) -> None:
        """Raises CheckpointMismatchError when `step` holds another tree than asked for.

        Raises:
          CheckpointMismatchError: the step's metadata reads and differs.
          Exception: whatever reading the metadata raises (the step is damaged).
        """
        stored = leaf_shapes(self._manager.item_metadata(step).tree)
        differences = shape_differences(stored, leaf_shapes(abstract_state))
        if differences:
            raise mismatch_error(
                f'Checkpoint step {step} in {self.directory}',
                differences,
                self.step_run_fields(step),
                self._run_fields,
            )

    def restore_latest(self, abstract_state):
        """Restores the newest checkpoint that can be read, falling back to older ones.

        Args:
          abstract_state: pytree of `jax.ShapeDtypeStruct` (with shardings) or arrays giving
            the structure, dtypes and shardings to restore into.

        Returns:
          (state, step), or (None, None) when there is no usable checkpoint.

        Raises:
          CheckpointMismatchError: the newest readable step holds another structure or other
            shapes than `abstract_state` (nothing is moved).
        """
        # Installed before any read starts: orbax closes its loop as soon as one read
        # fails, and the reads still in flight can report before the failure reaches us.
        _quiet_abandoned_reads()
        for step in reversed(self.all_steps()):
            try:
                self._check_fits(step, abstract_state)
                state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
            except CheckpointMismatchError:
                raise
            except Exception as error:  # Any read failure of a fitting step means "damaged".
                self._report_damaged(step, error)
                continue
            return state, step
        return None, None

    def _report_damaged(self, step: int, error: BaseException) -> None:
        path = self.directory / str(step)
        if self.read_only:
            action = 'left in place; trying the previous checkpoint'
        else:
            action = f'moved to {self._damaged_target(step)}; trying the previous checkpoint'
        logging.warning(
            'Checkpoint step %d at %s could not be restored (%s); %s.',
            step,
            path,
            one_line_cause(error),
            action,
        )
        if not self.read_only:
            self._set_aside(step)

    def _damaged_target(self, step: int) -> epath.Path:
        """Where a damaged step goes: `<step>`, or `<step>.<n>` beside an earlier one."""
        target, n = self._damaged_dir / str(step), 0
        while target.exists():  # An earlier damaged copy of the step stays as it is.
            n += 1
            target = self._damaged_dir / f'{step}.{n}'
        return target

    def _set_aside(self, step: int) -> None:
        """Moves a damaged step out of the managed directory (process 0 only)."""
        if jax.process_index() == 0:
            self._damaged_dir.mkdir(parents=True, exist_ok=True)
            target = self._damaged_target(step)
            shutil.move(os.fspath(self.directory / str(step)), os.fspath(target))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f'set_aside_checkpoint_{step}')
        self._manager.reload()

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves are written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's resources."""
        self._manager.close()


class SigtermFlag:
    """Records SIGTERM so the loop can save at the next step boundary and stop."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # Not the main thread: leave signals to the caller.
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning('SIGTERM received: saving a checkpoint at the next step boundary.')
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def any_process(self) -> bool:
        """Whether any process was signalled (all processes must agree to stop together)."""
        if jax.process_count() == 1:
            return self.received
        flags = multihost_utils.process_allgather(np.asarray(self.received, np.int32))
        return bool(np.any(flags))


def restore_variables(
    workdir: str,
    *,
    expected: Any = None,
    run_fields: Mapping[str, Any] | None = None,
    hint: str | None = None,
) -> dict:
    """Model variables of the newest checkpoint in a previous run's `workdir`.

    Used for `config.init_from` (FCN staging 32s -> 16s -> 8s) and by prediction. Restores
    without a target, as host numpy arrays, so the previous run's optimiser, model and
    devices may differ from this run's.

    Args:
      workdir: a workdir written by `train.train_and_evaluate`.
      expected: the variables (or their `jax.eval_shape`) of the model that will use them;
        when given, a checkpoint with other variables or shapes is an error.
      run_fields: the run fields of the config asking (`workdir.run_fields`), named in that
        error next to those the checkpoint was trained with.
      hint: the hint of that error.

    Returns:
      Dict of variable collections (`params`, and `batch_stats` etc. when saved).

    Raises:
      MissingInputError: when the workdir holds no checkpoint (a FileNotFoundError).
      CheckpointMismatchError: the variables do not fit `expected`.
    """
    directory = epath.Path(os.path.abspath(workdir)) / CHECKPOINT_SUBDIR
    if not directory.exists():
        raise errors.MissingInputError(
            f'No checkpoint directory {directory}.',
            hint='pass the --workdir of a run that saved a checkpoint',
        )
    manager = _reader(directory)
    try:
        step = manager.latest_step()
        if step is None:
            raise errors.MissingInputError(
                f'No checkpoint in {directory}.',
                hint='train until the first checkpoint is saved (config.checkpoint_every_steps)',
            )
        try:
            stored_fields = (manager.metadata(step).custom_metadata or {}).get('run_fields')
        except Exception:  # Older or damaged metadata: the restore below reports damage.
            stored_fields = None
        path = directory / str(step) / 'default'
        checkpointer = ocp.PyTreeCheckpointer()
        # Host numpy arrays: the saving run's devices and shardings need not exist here.
        as_numpy = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
            checkpointer.metadata(path).item_metadata.tree,
        )
        state = checkpointer.restore(path, restore_args=as_numpy)
    finally:
        manager.close()
    logging.info('Loaded variables of step %d from %s.', step, path)
    variables = {'params': state['params'], **state.get('model_state', {})}
    if expected is not None:
        differences = shape_differences(leaf_shapes(variables), leaf_shapes(expected))
        if differences:
            raise mismatch_error(
                f'The checkpoint of step {step} in {workdir}',
                differences,
                stored_fields,
                run_fields,
                hint,
            )
    return variables


def restore_model(
    workdir: str, config: ml_collections.ConfigDict
) -> tuple[flax.linen.Module, dict]:
    """The model of a run's config and the variables of its newest checkpoint, checked.

    Args:
      workdir: a training workdir.
      config: its config (`workdir.read_config`).

    Returns:
      (model, variables).

    Raises:
      MissingInputError: the workdir holds no checkpoint.
      CheckpointMismatchError: the checkpoint does not fit the model that `config`
        describes (the message says what it was trained with and what is asked for).
    """
    model = models.build_model(config.model)
    expected = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct(models.example_input_shape(config.model), jnp.float32),
    )
    variables = restore_variables(
        workdir,
        expected=expected,
        run_fields=workdir_files.run_fields(config),
        hint=f'{workdir}/config.json must be the config its checkpoints were trained with',
    )
    return model, variables
