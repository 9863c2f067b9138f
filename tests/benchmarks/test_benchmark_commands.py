"""The benchmark programs as commands: help exits 0, bad input is one `error:` line.

Each runs in a fresh interpreter, since the programs' absl flags would clash in this one.
"""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Each benchmark program and one of its own flags, which its help must list.
PROGRAMS = {
    'aot_compile': '--target',
    'conv_benchmark': '--table',
    'device_throughput': '--dtypes',
    'input_pipeline_benchmark': '--steps',
    'metrics_benchmark': '--num_classes',
    'model_benchmark': '--models',
    'profile_train_step': '--timed_steps',
}


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, '-m', f'benchmarks.{module}', *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('module', sorted(PROGRAMS))
def test_asking_a_benchmark_for_help_succeeds(module):
    # absl exits 1 after printing the help it was asked for.
    process = _run(module, '--help')
    assert process.returncode == 0, process.stderr
    assert PROGRAMS[module] in process.stdout


@pytest.mark.parametrize(
    'module, args, message',
    [
        ('aot_compile', [], 'error: --config is required (or --table).'),
        ('conv_benchmark', ['--tabel=winograd'], "error: Unknown command line flag 'tabel'"),
        ('model_benchmark', ['--models=fcn99'], "error: Unknown --models ['fcn99']"),
        ('metrics_benchmark', ['--num_classes=1'], 'error: --num_classes=1: expected at least 2'),
    ],
)
def test_bad_benchmark_input_is_one_error_line(module, args, message):
    process = _run(module, *args)
    assert process.returncode == 1
    assert 'Traceback' not in process.stderr
    error_lines = [line for line in process.stderr.splitlines() if line.startswith('error: ')]
    assert len(error_lines) == 1 and error_lines[0].startswith(message), process.stderr


def test_the_metrics_benchmark_times_both_boundary_forms():
    process = _run(
        'metrics_benchmark', '--batch_size=2', '--size=24', '--num_classes=3', '--repeats=1'
    )
    assert process.returncode == 0, process.stderr
    rows = [line for line in process.stdout.splitlines() if line.startswith('| ')]
    assert [row.split('|')[1].strip() for row in rows[2:]] == [
        'all counts (segmentation_counts)',
        'Boundary IoU, window extremes (CPU)',
        'Boundary IoU, box sums (elsewhere)',
        'trimap bands',
        'confusion matrix',
    ]
    assert all(float(row.split('|')[2]) >= 0 for row in rows[2:])


def test_the_pipeline_benchmark_times_a_configs_own_pipeline(shapes_small_data_dir):
    process = _run(
        'input_pipeline_benchmark',
        f'--config={ROOT}/configs/default.py',
        '--config.dataset.name=shapes/small',
        f'--config.dataset.data_dir={shapes_small_data_dir}',
        '--config.dataset.train_split=train[:16]',
        '--config.input.crop_size=(32, 32)',
        '--config.input.border_weights=True',
        '--config.input.cache_decoded=True',
        '--config.batch_size=4',
        '--steps=3',
    )
    assert process.returncode == 0, process.stderr
    rows = [line for line in process.stdout.splitlines() if line.startswith('| ')]
    assert len(rows) == 3  # Header, rule and the config's row.
    crop, weights, cache, rate, cpu = (cell.strip() for cell in rows[2].strip('|').split('|'))
    assert (crop, weights, cache) == ('32x32', 'True', 'yes')
    assert float(rate) > 0 and float(cpu) >= 0
