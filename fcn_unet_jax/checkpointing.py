"""Train-state checkpoints: an orbax `CheckpointManager` wrapper with resume and fallback.

Checkpoints live in `WORKDIR/checkpoints/<step>/`. orbax writes each one to a temporary
directory and renames it when complete, so a crash mid-save never leaves a half-written
step that looks finished. On restore the newest step is tried first; a step that fails to
restore (damaged files) is reported with a warning naming the step and the error, moved to
`WORKDIR/checkpoints_damaged/` (so a later save of the same step cannot collide with it and
keep-N cannot count it as good), and the next older step is tried.

Every process must call `save` and `restore` (orbax coordinates the processes); only the
primary process writes files.
"""

import os
import shutil
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

CHECKPOINT_SUBDIR = 'checkpoints'
DAMAGED_SUBDIR = 'checkpoints_damaged'


class CheckpointManager:
    """Saves and restores the train state (any pytree) of one workdir.

    Attributes:
      directory: where the steps are written.
    """

    def __init__(self, workdir: str, *, keep: int | None):
        """Opens (creating if needed) the checkpoint directory of `workdir`.

        Args:
          workdir: the run's working directory.
          keep: number of most recent checkpoints to keep; None keeps all.
        """
        # orbax (tensorstore) requires absolute paths.
        workdir = epath.Path(os.path.abspath(workdir))
        self.directory = workdir / CHECKPOINT_SUBDIR
        self._damaged_dir = workdir / DAMAGED_SUBDIR
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
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
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore_latest(self, abstract_state):
        """Restores the newest checkpoint that can be read, falling back to older ones.

        Args:
          abstract_state: pytree of `jax.ShapeDtypeStruct` (with shardings) or arrays giving
            the structure, dtypes and shardings to restore into.

        Returns:
          (state, step), or (None, None) when there is no usable checkpoint.
        """
        for step in reversed(self.all_steps()):
            try:
                state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
            except Exception as error:  # Any read failure means "damaged".
                logging.warning(
                    'Checkpoint at step %d in %s could not be restored (%s: %s); '
                    'falling back to the previous checkpoint.',
                    step,
                    self.directory,
                    type(error).__name__,
                    error,
                )
                self._set_aside(step)
                continue
            return state, step
        return None, None

    def _set_aside(self, step: int) -> None:
        """Moves a damaged step out of the managed directory (process 0 only)."""
        if jax.process_index() == 0:
            self._damaged_dir.mkdir(parents=True, exist_ok=True)
            target = self._damaged_dir / str(step)
            if target.exists():
                shutil.rmtree(os.fspath(target))
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


def restore_variables(workdir: str) -> dict:
    """Model variables of the newest checkpoint in a previous run's `workdir`.

    Used for `config.init_from` (FCN staging 32s -> 16s -> 8s). Restores without a target,
    as host numpy arrays, so the previous run's optimiser, model and devices may differ
    from this run's.

    Args:
      workdir: a workdir written by `train.train_and_evaluate`.

    Returns:
      Dict of variable collections (`params`, and `batch_stats` etc. when saved).

    Raises:
      FileNotFoundError: when the workdir holds no checkpoint.
    """
    directory = epath.Path(os.path.abspath(workdir)) / CHECKPOINT_SUBDIR
    if not directory.exists():
        raise FileNotFoundError(f'No checkpoint directory {directory}.')
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f'No checkpoint in {directory}.')
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
    return {'params': state['params'], **state.get('model_state', {})}
