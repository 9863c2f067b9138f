"""Two processes on 127.0.0.1 (gloo CPU collectives) train exactly like one process.

Both processes run `python -m fcn_unet_jax.main` with explicit `--coordinator_address
--num_processes --process_id` flags, one simulated device each, into one shared workdir;
the reference is a single in-process run of the same config on 4 devices.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fcn_unet_jax import checkpointing, train
from fcn_unet_jax import workdir as workdir_files
from fcn_unet_jax.data import builders
from tests import test_train

OVERRIDES = {
    'dataset.name': 'shapes/small',
    'dataset.train_split': 'train[:64]',
    'dataset.eval_split': 'validation[:8]',
    'input.crop_size': (32, 32),
    'input.eval_pad_size': (64, 64),
    'model.width': 0.0625,
    'model.batch_norm': True,
    'batch_size': 4,
    'eval_batch_size': 4,
    'optimizer.name': 'sgd',
    'optimizer.learning_rate': 0.05,
    'optimizer.schedule': 'constant',
    'num_train_steps': 3,
    'log_every_steps': 1,
    'eval_every_steps': 100,
    'checkpoint_every_steps': 100,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp('tfds'))
    config = test_train.tiny_config(path)
    builders.get_builder(config.dataset).download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    return path


@pytest.mark.slow
def test_two_processes_match_one_process(data_dir, tmp_path):
    overrides = dict(OVERRIDES, **{'dataset.data_dir': data_dir})
    workdir = tmp_path / 'two_processes'
    port = _free_port()
    env = dict(
        os.environ,
        PYTHONPATH=test_train.REPO,
        XLA_FLAGS='--xla_force_host_platform_device_count=1',
        JAX_DISABLE_MOST_OPTIMIZATIONS='1',
    )
    command = [
        sys.executable,
        '-m',
        'fcn_unet_jax.main',
        f'--config={test_train.REPO}/configs/default.py',
        f'--workdir={workdir}',
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        *[f'--config.{key}={value}' for key, value in overrides.items()],
    ]
    processes = [
        subprocess.Popen(
            [*command, f'--process_id={i}'],
            env=env,
            cwd=test_train.REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in processes]
    for process, stderr in zip(processes, errors, strict=True):
        assert process.returncode == 0, stderr[-5000:]
    assert 'Process 1 of 2' in errors[1]

    reference = tmp_path / 'one_process'
    previous = jax.config.values['jax_disable_most_optimizations']
    jax.config.update('jax_disable_most_optimizations', True)  # Same setting as the processes.
    try:
        train.train_and_evaluate(test_train.tiny_config(data_dir, **overrides), str(reference))
    finally:
        jax.config.update('jax_disable_most_optimizations', previous)

    np.testing.assert_allclose(
        test_train.train_losses(workdir), test_train.train_losses(reference), rtol=1e-4
    )
    test_train.assert_trees_close(
        checkpointing.restore_variables(str(workdir))['params'],
        checkpointing.restore_variables(str(reference))['params'],
        rtol=1e-4,
        atol=1e-5,
    )
    # Only process 0 writes logs and results.
    assert len(test_train.read_log(workdir)) == len(test_train.read_log(reference))
    assert (workdir / workdir_files.EVAL_RESULTS_FILE).exists()
