"""The accelerator throughput benchmark (`benchmarks/device_throughput.py`), run on the CPU.

The script is run as a user runs it (a fresh interpreter: its absl flags would clash with
the programs' flags here), on a tiny config, and its JSON rows and table are checked.
"""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_rows_carry_model_flops_and_a_batch_override(tmp_path):
    output = tmp_path / 'results' / 'device'  # A folder the script makes.
    # One CPU device, whatever the suite's XLA_FLAGS force: the batches split over all.
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    subprocess.run(
        [
            sys.executable,
            '-m',
            'benchmarks.device_throughput',
            # A comma in the config's argument and a batch override.
            '--config=skip_ablation_shapes:unet,runlocal@2',
            '--dtypes=float32',
            '--steps=1',
            '--matmul_size=256',
            f'--output={output}',
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    rows = [
        json.loads(line)
        for line in (tmp_path / 'results' / 'device.jsonl').read_text().splitlines()
    ]
    assert [(r['model'], r['batch_size']) for r in rows] == [('unet', 2)]
    for row in rows:
        # The step as written: forward and backward of every conv, so well above zero.
        assert row['tflop_per_step'] > 0
        assert row['images_per_second'] == row['batch_size'] / row['step_seconds']
        assert row['step_gib'] > 0
        assert row['mfu_datasheet'] is None  # No datasheet rate for a CPU.
    table = (tmp_path / 'results' / 'device.md').read_text()
    assert '| skip_ablation_shapes:unet,runlocal@2 | unet | float32 | 2 |' in table
