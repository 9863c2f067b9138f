"""Tests of run_programs.py: which runs share jitted programs, and that sharing changes nothing.

Inside `reuse_across_runs()` a config that differs from the previous run's only in `seed`
gets the previous run's programs; any other field, another mesh, or a call outside the
context builds new ones. Two tiny runs trained with shared programs end with exactly the
losses, parameters and scores of the same runs built separately.
"""

import jax
import numpy as np
import pytest

from fcn_unet_jax import checkpointing, run_programs, sharding, train
from fcn_unet_jax import workdir as workdir_files

pytestmark = pytest.mark.usefixtures('fast_compile')


@pytest.fixture
def count_builds(monkeypatch):
    """Counts `run_programs.build` calls (the configs it built for)."""
    built = []
    original = run_programs.build

    def counting(config, mesh):
        built.append(config)
        return original(config, mesh)

    monkeypatch.setattr(run_programs, 'build', counting)
    return built


def test_only_the_seed_may_differ(tiny_config, count_builds):
    mesh = sharding.create_mesh()
    with run_programs.reuse_across_runs():
        first = run_programs.programs_for(tiny_config(seed=0), mesh)
        assert run_programs.programs_for(tiny_config(seed=3), mesh) is first
        assert len(count_builds) == 1
        other_rate = run_programs.programs_for(
            tiny_config(**{'optimizer.learning_rate': 0.5}), mesh
        )
        assert other_rate is not first
        other_mesh = run_programs.programs_for(
            tiny_config(), sharding.create_mesh(jax.devices()[:1])
        )
        assert other_mesh is not other_rate
        # Only the latest config's programs are kept.
        assert run_programs.programs_for(tiny_config(seed=0), mesh) is not first
        assert len(count_builds) == 4
    outside = [run_programs.programs_for(tiny_config(), mesh) for _ in range(2)]
    assert outside[0] is not outside[1]


def test_a_nested_context_leaves_the_outer_ones_programs(tiny_config):
    mesh = sharding.create_mesh()
    with run_programs.reuse_across_runs():
        outer = run_programs.programs_for(tiny_config(), mesh)
        with run_programs.reuse_across_runs():
            assert run_programs.programs_for(tiny_config(), mesh) is not outer
        assert run_programs.programs_for(tiny_config(seed=1), mesh) is outer


def _losses(workdir) -> list[float]:
    return [r['train/loss'] for r in workdir_files.read_metrics_log(workdir) if 'train/loss' in r]


def test_runs_that_share_programs_train_exactly_as_separate_ones(
    tiny_config, tmp_path, count_builds
):
    def two_runs(root):
        return [
            train.train_and_evaluate(tiny_config(seed=seed), str(root / f'seed{seed}'))['eval']
            for seed in (0, 1)
        ]

    separate = two_runs(tmp_path / 'separate')
    assert len(count_builds) == 2
    with run_programs.reuse_across_runs():
        shared = two_runs(tmp_path / 'shared')
    assert len(count_builds) == 3  # The second seed took over the first one's programs.
    for seed in (0, 1):
        assert shared[seed]['mean_iou'] == separate[seed]['mean_iou']
        assert shared[seed]['confusion_matrix'] == separate[seed]['confusion_matrix']
        assert _losses(tmp_path / 'shared' / f'seed{seed}') == _losses(
            tmp_path / 'separate' / f'seed{seed}'
        )
        jax.tree_util.tree_map(
            np.testing.assert_array_equal,
            checkpointing.restore_variables(str(tmp_path / 'shared' / f'seed{seed}')),
            checkpointing.restore_variables(str(tmp_path / 'separate' / f'seed{seed}')),
        )
    # The seeds still differ: the seed reaches the shared programs as a value.
    assert _losses(tmp_path / 'shared' / 'seed0') != _losses(tmp_path / 'shared' / 'seed1')
