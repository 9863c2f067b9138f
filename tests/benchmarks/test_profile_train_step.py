"""The train-step profile of a config (`benchmarks/profile_train_step.py --config`).

The benchmark's absl flags would clash with the programs' flags in this process, so it runs
in a fresh interpreter.
"""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_a_configs_own_step_is_timed_and_profiled():
    # The U-Net of the skip ablation trains on a border weight map: the profiled batch must
    # carry one, or the step would not run.
    out = subprocess.run(
        [
            sys.executable,
            '-m',
            'benchmarks.profile_train_step',
            '--config=configs/skip_ablation_shapes.py:unet,runlocal',
            '--config.batch_size=4',
            '--steps=1',
            '--timed_steps=2',
            '--top=3',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # The config's model and batch, not the --model / --batch_size defaults.
    header = re.search(r'^unet train, 64 px, batch 4: (\d+) ms per step untraced', out, re.M)
    assert header and int(header.group(1)) > 0, out
    assert re.search(r'^\| conv 3x3 \| \d+ \| [\d.]+% \|$', out, re.M), out
    assert out.count('\n| ') >= 3 + 3, out  # Group rows and the 3 slowest operations.
