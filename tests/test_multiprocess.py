"""Two processes on 127.0.0.1 (gloo CPU collectives) train exactly like one process.

Both processes run `python -m fcn_unet_jax.main` with explicit `--coordinator_address
--num_processes --process_id` flags, one simulated device each, into one shared workdir;
the reference is a single in-process run of the same config on 4 devices.
"""

import os
import socket
import subprocess

import jax
import numpy as np
import pytest

from fcn_unet_jax import checkpointing, train
from fcn_unet_jax import workdir as workdir_files
from tests import test_train

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_config, tiny_main_command, repo_root, tmp_path):
    workdir = tmp_path / 'two_processes'
    env = dict(
        os.environ,
        PYTHONPATH=repo_root,
        XLA_FLAGS='--xla_force_host_platform_device_count=1',
        JAX_DISABLE_MOST_OPTIMIZATIONS='1',
    )
    command = tiny_main_command(
        workdir,
        f'--coordinator_address=127.0.0.1:{_free_port()}',
        '--num_processes=2',
        num_train_steps=STEPS,
    )
    processes = [
        subprocess.Popen(
            [*command, f'--process_id={i}'],
            env=env,
            cwd=repo_root,
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
        train.train_and_evaluate(tiny_config(num_train_steps=STEPS), str(reference))
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
    assert len(workdir_files.read_metrics_log(workdir)) == len(
        workdir_files.read_metrics_log(reference)
    )
    assert workdir_files.read_eval_results(workdir) is not None
