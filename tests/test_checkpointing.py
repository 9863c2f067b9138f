"""Tests of the orbax CheckpointManager wrapper: keep-N, restore, damaged-step fallback.

Also: a checkpoint of another model is a user error that moves nothing, the damage warning
is one line, and a read-only (evaluation) manager never moves a damaged step.
"""

import asyncio
import functools
import gc
import os
import pathlib
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest

from fcn_unet_jax import checkpointing, errors


def _state(value: float):
    params = {'conv': {'kernel': jnp.full((3, 3), value), 'bias': jnp.full((3,), value)}}
    return {
        'step': jnp.asarray(int(value), jnp.int32),
        'params': params,
        'model_state': {'batch_stats': {'mean': jnp.full((3,), -value)}},
        'opt_state': optax.sgd(0.1, momentum=0.9).init(params),
    }


def _abstract(state):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _damage(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), 'wb') as f:
                f.write(b'not a checkpoint')


@pytest.fixture
def manager(tmp_path):
    manager = checkpointing.CheckpointManager(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        manager.save(step, _state(step))
    manager.wait_until_finished()
    yield manager
    manager.close()


def test_keep_n_and_restore_latest(manager):
    assert manager.all_steps() == [2, 3]
    state, step = manager.restore_latest(_abstract(_state(0)))
    assert step == 3
    np.testing.assert_array_equal(state['params']['conv']['kernel'], 3.0)
    np.testing.assert_array_equal(state['model_state']['batch_stats']['mean'], -3.0)
    assert isinstance(state['opt_state'], tuple)


def test_saving_an_existing_step_is_a_no_op(manager):
    manager.save(3, _state(9))
    manager.wait_until_finished()
    state, _ = manager.restore_latest(_abstract(_state(0)))
    np.testing.assert_array_equal(state['params']['conv']['kernel'], 3.0)


def test_damaged_latest_falls_back_with_warning(manager, tmp_path):
    _damage(manager.directory / '3')
    with absltest.mock.patch.object(checkpointing.logging, 'warning') as warning:
        state, step = manager.restore_latest(_abstract(_state(0)))
    assert step == 2
    np.testing.assert_array_equal(state['params']['conv']['kernel'], 2.0)
    message = warning.call_args[0][0] % warning.call_args[0][1:]
    assert 'step 3' in message and 'could not be restored' in message
    # The damaged step is set aside, so saving step 3 again works and keep-N counts the
    # good steps only.
    assert manager.all_steps() == [2]
    assert (tmp_path / checkpointing.DAMAGED_SUBDIR / '3').exists()
    manager.save(3, _state(3))
    manager.save(4, _state(4))
    manager.wait_until_finished()
    assert manager.all_steps() == [3, 4]
    # Step 4 damaged too and step 3 again: the earlier damaged copy of 3 is kept beside.
    _damage(manager.directory / '4')
    _damage(manager.directory / '3')
    with absltest.mock.patch.object(checkpointing.logging, 'warning') as warning:
        assert manager.restore_latest(_abstract(_state(0)))[1] is None
    damaged = tmp_path / checkpointing.DAMAGED_SUBDIR
    assert sorted(p.name for p in damaged.iterdir()) == ['3', '3.1', '4']
    message = warning.call_args[0][0] % warning.call_args[0][1:]
    assert f'moved to {damaged}/3.1;' in message


def test_all_damaged_restores_nothing(manager):
    for step in manager.all_steps():
        _damage(manager.directory / str(step))
    assert manager.restore_latest(_abstract(_state(0))) == (None, None)


def test_restore_variables_of_a_workdir(manager, tmp_path):
    variables = checkpointing.restore_variables(str(tmp_path))
    assert set(variables) == {'params', 'batch_stats'}
    np.testing.assert_array_equal(variables['params']['conv']['bias'], 3.0)
    with pytest.raises(FileNotFoundError):
        checkpointing.restore_variables(str(tmp_path / 'missing'))


def test_relative_workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manager = checkpointing.CheckpointManager('relative/workdir', keep=1)
    manager.save(5, _state(5))
    manager.close()
    assert (tmp_path / 'relative/workdir/checkpoints/5').is_dir()
    variables = checkpointing.restore_variables('relative/workdir')
    np.testing.assert_array_equal(variables['params']['conv']['kernel'], 5.0)


def _files(directory) -> dict[str, int]:
    """Every file and folder under `directory`, with file sizes (-1 for folders)."""
    return {
        str(p.relative_to(directory)): p.stat().st_size if p.is_file() else -1
        for p in sorted(pathlib.Path(directory).rglob('*'))
    }


def test_a_shape_mismatch_is_a_user_error_and_moves_nothing(tmp_path):
    fields = {'model.name': 'unet', 'model.width': 0.125}
    manager = checkpointing.CheckpointManager(str(tmp_path), keep=2, run_fields=fields)
    manager.save(1, _state(1))
    manager.close()
    before = _files(tmp_path)
    asked = dict(fields, **{'model.width': 0.25})
    other = checkpointing.CheckpointManager(str(tmp_path), keep=2, run_fields=asked)
    wider = _state(0)
    wider['params']['conv']['kernel'] = jnp.zeros((3, 6))
    with pytest.raises(checkpointing.CheckpointMismatchError) as error:
        other.restore_latest(_abstract(wider))
    other.close()
    assert 'Checkpoint step 1' in str(error.value)
    assert 'trained -> asked: model.width 0.125 -> 0.25' in str(error.value)
    assert _files(tmp_path) == before
    # Without recorded fields (an older checkpoint) the differing arrays are named.
    differences = checkpointing.shape_differences(
        checkpointing.leaf_shapes(_state(1)), checkpointing.leaf_shapes(wider)
    )
    error = checkpointing.mismatch_error('Checkpoint step 1', differences, None, None)
    assert 'params/conv/kernel: stored (3, 3), expected (3, 6)' in str(error)


def test_a_truncated_step_is_damaged_and_the_warning_is_one_line(manager, tmp_path, monkeypatch):
    reported = []  # What reaches the interpreter's hook for exceptions nobody can catch.
    monkeypatch.setattr(sys, 'unraisablehook', reported.append)
    for path in pathlib.Path(manager.directory / '3').rglob('*'):
        if path.is_file() and path.parent.name == 'd':
            os.truncate(path, path.stat().st_size // 2)
    with absltest.mock.patch.object(checkpointing.logging, 'warning') as warning:
        _, step = manager.restore_latest(_abstract(_state(0)))
    assert step == 2
    message = warning.call_args[0][0] % warning.call_args[0][1:]
    assert '\n' not in message and 'tensorstore_spec' not in message
    assert 'See full TensorStore' not in message
    # The innermost cause: TensorStore's own, naming the array and the reason.
    assert 'OUT_OF_RANGE' in message and 'Requested byte range' in message
    assert f'{manager.directory}/3' in message and 'moved to' in message
    assert (tmp_path / checkpointing.DAMAGED_SUBDIR / '3').exists()
    # The step's other reads, abandoned by orbax, report nothing (once collected).
    time.sleep(0.5)
    gc.collect()
    assert not reported


def _unraisable_from(call):
    """What the interpreter hands its unraisable hook when `call()` raises in a callback."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the exception is the value under test.
        return types.SimpleNamespace(
            exc_type=type(error),
            exc_value=error,
            exc_traceback=error.__traceback__,
            err_msg=None,
            object=call,
        )
    raise AssertionError(f'{call} did not raise')


@pytest.mark.parametrize('through_a_wrapper', [False, True])
def test_late_reads_on_the_closed_loop_are_dropped_however_they_get_there(
    monkeypatch, through_a_wrapper
):
    reported = []
    monkeypatch.setattr(sys, 'unraisablehook', reported.append)
    loop = asyncio.new_event_loop()
    loop.close()
    direct = functools.partial(loop.call_soon_threadsafe, print)
    call = (lambda: direct()) if through_a_wrapper else direct  # noqa: PLW0108
    checkpointing._quiet_abandoned_reads()
    sys.unraisablehook(_unraisable_from(call))
    assert not reported
    # Anything else still reaches the previous hook, a closed loop's message included.
    unrelated = _unraisable_from(
        lambda: (_ for _ in ()).throw(RuntimeError('Event loop is closed'))
    )
    sys.unraisablehook(unrelated)
    assert reported == [unrelated]


def test_reads_that_report_before_the_failure_arrives_are_dropped_too(manager, monkeypatch):
    # A read in flight can find orbax's loop closed before the failed read's exception
    # has reached `restore_latest`: the hook must already be in place when reads start.
    reported = []
    monkeypatch.setattr(sys, 'unraisablehook', reported.append)
    loop = asyncio.new_event_loop()
    loop.close()
    late_read = _unraisable_from(functools.partial(loop.call_soon_threadsafe, print))
    orbax_restore = manager._manager.restore

    def restore_with_an_early_report(step, args):
        if step == 3:
            sys.unraisablehook(late_read)
            raise ValueError('Encountered error while reading array index 0')
        return orbax_restore(step, args=args)

    monkeypatch.setattr(manager._manager, 'restore', restore_with_an_early_report)
    with absltest.mock.patch.object(checkpointing.logging, 'warning'):
        _, step = manager.restore_latest(_abstract(_state(0)))
    assert step == 2
    assert not reported


def test_a_read_only_manager_leaves_damaged_steps_in_place(manager, tmp_path):
    _damage(manager.directory / '3')
    before = _files(tmp_path)
    reader = checkpointing.CheckpointManager(str(tmp_path), keep=2, read_only=True)
    with absltest.mock.patch.object(checkpointing.logging, 'warning') as warning:
        _, step = reader.restore_latest(_abstract(_state(0)))
    reader.close()
    assert step == 2 and 'left in place' in warning.call_args[0][0] % warning.call_args[0][1:]
    assert _files(tmp_path) == before
    checkpointing.CheckpointManager(str(tmp_path / 'missing'), keep=2, read_only=True).close()
    assert not (tmp_path / 'missing').exists()


def test_readers_say_nothing_about_being_read_only(manager, tmp_path, caplog):
    # orbax's 'Given directory is read only' would come with every evaluation and prediction.
    with caplog.at_level('WARNING'):
        checkpointing.CheckpointManager(str(tmp_path), keep=2, read_only=True).close()
        checkpointing.restore_variables(str(tmp_path))
    assert not [r for r in caplog.records if 'read only' in r.getMessage()], caplog.text


def test_restore_variables_checks_them_against_the_model(manager, tmp_path):
    expected = {'params': {'conv': {'kernel': np.zeros((3, 4)), 'bias': np.zeros(3)}}}
    expected['batch_stats'] = {'mean': np.zeros(3)}
    with pytest.raises(checkpointing.CheckpointMismatchError, match=r'kernel: stored \(3, 3\)'):
        checkpointing.restore_variables(str(tmp_path), expected=expected)
    with pytest.raises(errors.MissingInputError, match='No checkpoint directory'):
        checkpointing.restore_variables(str(tmp_path / 'missing'))
