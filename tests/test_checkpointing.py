"""Tests of the orbax CheckpointManager wrapper: keep-N, restore, damaged-step fallback."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest

from fcn_unet_jax import checkpointing


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
