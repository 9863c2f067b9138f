"""Tests of experiments/skip_ablation.py: statistics and collapse flags on hand-made numbers,
and one end-to-end sweep on a tiny `shapes` build.

The sweep runs in-process: 2 U-Net variants x 2 seeds, 2 steps each, on 32 px crops of a
few `shapes/small` images; then the results files are checked, and a rerun must reuse the
finished runs instead of training again. Two-step runs learn nothing, so the sweep also
shows how collapsed runs are flagged and left out.
"""

import json
import math
import os

import numpy as np
import pytest

from configs import default, skip_ablation_shapes
from experiments import skip_ablation
from fcn_unet_jax import run_programs, train
from fcn_unet_jax import workdir as workdir_files

pytestmark = pytest.mark.usefixtures('fast_compile')

CLASSES = ('background', 'a', 'b')


@pytest.fixture(scope='module')
def base_config(shrink_to_tiny):
    """The sweep's U-Net base config at runlocal size on 16 train / 4 validation images."""
    return shrink_to_tiny(
        skip_ablation_shapes.get_config('unet,runlocal'),
        **{'dataset.train_split': 'train[:16]', 'dataset.eval_split': 'validation[:4]'},
        num_train_steps=2,
    )


def test_family_variants():
    fcn = skip_ablation.family_variants('fcn', 'fcn8s_vgg16')
    assert fcn['32s'] == ((), 'sum')
    assert fcn['8s'] == ((16, 8), 'sum')
    assert fcn['8s_concat'] == ((16, 8), 'concat')
    unet = skip_ablation.family_variants('unet', 'unet')
    assert list(unet) == ['full', 'no_s1', 'no_s2', 'no_s4', 'no_s8', 'none']
    assert unet['no_s4'] == ((1, 2, 8), 'concat')
    assert unet['none'] == ((), 'none')
    with pytest.raises(ValueError, match='family'):
        skip_ablation.family_variants('fcn', 'unet')


def test_interval_is_the_student_t_interval():
    # Mean 3, sample std sqrt(2.5), t(0.975, 4 dof) = 2.776445: half-width 1.963243.
    got = skip_ablation.interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (got['n'], got['mean']) == (5, 3.0)
    np.testing.assert_allclose(got['std'], math.sqrt(2.5))
    np.testing.assert_allclose(got['ci'], 2.776445 * math.sqrt(2.5 / 5), rtol=1e-6)
    one = skip_ablation.interval([0.5])
    assert one['mean'] == 0.5 and math.isnan(one['std']) and math.isnan(one['ci'])
    assert skip_ablation.interval([])['n'] == 0


def test_collapse_check():
    # Ground truth 80 / 10 / 10 pixels: prior entropy 0.639 nats.
    only_background = [[80, 0, 0], [10, 0, 0], [10, 0, 0]]
    np.testing.assert_allclose(
        skip_ablation.prior_entropy(only_background), -(0.8 * np.log(0.8) + 0.2 * np.log(0.1))
    )
    reason, never = skip_ablation.collapse_check(only_background, 0.2, CLASSES)
    assert reason == 'predicts a single class' and never == ['a', 'b']
    learned = [[78, 2, 0], [3, 7, 0], [6, 4, 0]]  # Never predicts b, but learned a.
    assert skip_ablation.collapse_check(learned, 0.3, CLASSES) == (None, ['b'])
    reason, _ = skip_ablation.collapse_check(learned, 0.6, CLASSES)  # >= 0.9 x 0.639.
    assert reason.startswith('train loss 0.600 >= 0.9 x class-prior entropy 0.639')


def test_only_a_plain_cross_entropy_is_compared_with_the_prior_entropy():
    config = default.get_config()
    assert skip_ablation.loss_is_plain_cross_entropy(config)
    for field, value in [
        ('input.border_weights', True),  # the U-Net weight map: another scale
        ('loss.class_weights', (0.1, 1.0, 2.0)),
        ('loss.name', 'cross_entropy+dice'),
        ('loss.normalization', 'sum'),
        ('model.aux_head', True),
    ]:
        changed = default.get_config()
        section, key = field.split('.')
        changed[section][key] = value
        assert not skip_ablation.loss_is_plain_cross_entropy(changed), field
    # The shapes_fine U-Net recipe trains on the border map, its FCN on cross-entropy.
    assert not skip_ablation.loss_is_plain_cross_entropy(skip_ablation_shapes.get_config('unet'))
    assert skip_ablation.loss_is_plain_cross_entropy(skip_ablation_shapes.get_config('fcn'))


def _run(mean_iou, boundary_iou, collapsed=None, never=()):
    metrics = dict.fromkeys(skip_ablation.COLUMNS, 0.5)
    return metrics | {
        'mean_iou': mean_iou,
        'boundary_iou': boundary_iou,
        'seconds': 10.0,
        'train_loss': 0.1,
        'collapsed': collapsed,
        'never_predicted': list(never),
    }


def test_a_class_missed_by_one_seed_only_is_a_collapse():
    # Seed 4 never predicts `b`, which the 4 other seeds predict: `b` failed to train there.
    lone = {str(k): _run(0.9, 0.8) for k in range(4)} | {'4': _run(0.7, 0.6, never=['b'])}
    # Three of five seeds never predict `b`: the variant cannot, which is a result.
    most = {str(k): _run(0.6, 0.3, never=['b']) for k in range(3)}
    most |= {'3': _run(0.7, 0.4), '4': _run(0.7, 0.4)}
    results = {
        'family': 'unet',
        'model': 'unet',
        'dataset': 'shapes_fine',
        'seeds': [0, 1, 2, 3, 4],
        'num_train_steps': 10,
        'reference': 'full',
        'confidence': 0.95,
        'variants': {
            'full': {'skip_strides': [1], 'merge': 'concat', 'runs': lone},
            'none': {'skip_strides': [], 'merge': 'none', 'runs': most},
        },
    }
    skip_ablation.summarize(results)
    assert lone['4']['collapsed'] == 'never predicts b, which 4 of the other 4 seeds predict'
    assert not any(lone[str(k)]['collapsed'] for k in range(4))
    assert not any(run['collapsed'] for run in most.values())
    full, none = results['variants']['full'], results['variants']['none']
    assert full['stats']['mean_iou']['n'] == 4 and full['mean']['mean_iou'] == 0.9
    assert none['stats']['mean_iou']['n'] == 5
    assert none['paired']['mean_iou']['n'] == 4  # Seed 4 of `full` is out of the pairs.
    table = skip_ablation.markdown_table(results)
    row = [line for line in table.splitlines() if line.startswith('| full | 4 |')][0]
    assert row.count('never predicts b') == 1  # Named once, in the collapse reason.
    assert sum('never predicts b |' in line for line in table.splitlines()) == 3


def test_paired_differences_leave_out_collapsed_runs():
    results = {
        'family': 'fcn',
        'model': 'fcn8s_vgg16',
        'dataset': 'shapes_fine',
        'seeds': [0, 1, 2],
        'num_train_steps': 10,
        'reference': '8s',
        'confidence': 0.95,
        'variants': {
            '32s': {
                'skip_strides': [],
                'merge': 'sum',
                'runs': {
                    '0': _run(0.50, 0.20),
                    '1': _run(0.21, 0.05, collapsed='predicts a single class'),
                    '2': _run(0.56, 0.24),
                },
            },
            '8s': {
                'skip_strides': [16, 8],
                'merge': 'sum',
                'runs': {'0': _run(0.60, 0.40), '1': _run(0.62, 0.41), '2': _run(0.64, 0.42)},
            },
        },
    }
    skip_ablation.summarize(results)
    coarse, full = results['variants']['32s'], results['variants']['8s']
    assert coarse['stats']['mean_iou']['n'] == 2  # The collapsed seed 1 is left out.
    np.testing.assert_allclose(coarse['mean']['mean_iou'], 0.53)
    # Seeds 0 and 2: differences -0.10 and -0.08; t(0.975, 1 dof) = 12.706.
    paired = coarse['paired']['mean_iou']
    assert paired['n'] == 2
    np.testing.assert_allclose(paired['mean'], -0.09)
    np.testing.assert_allclose(paired['ci'], 12.7062 * 0.01, 1e-4)  # std 0.01 sqrt(2).
    assert full['paired']['mean_iou']['mean'] == 0.0

    table = skip_ablation.markdown_table(results)
    rows = [line for line in table.splitlines() if line.startswith('| 32s |')]
    headline = [c.strip() for c in rows[0].split('|')[1:-1]]
    assert headline[:5] == ['32s', '-', 'sum', '2 of 3*', '0.5300 ± 0.0424']
    assert headline[6].startswith('-0.0900 [')
    assert '32s seed 1 collapsed (predicts a single class): left out.' in table
    assert 'Δ vs 8s' in table and 'Boundary IoU' in table and 'trimap IoU 4 px' in table
    per_run = [r for r in rows if '| 1 |' in r]
    assert 'collapsed: predicts a single class' in per_run[0]


def test_a_variant_trains_for_its_own_budget(tmp_path, monkeypatch):
    """`config.variant_train_steps` gives one variant a longer run; the tables say so."""
    config = skip_ablation_shapes.get_config('unet,runlocal')
    config.num_train_steps = 3
    config.variant_train_steps = {'none': 7}
    assert skip_ablation.variant_train_steps(config, 'none') == 7
    assert skip_ablation.variant_train_steps(config, 'full') == 3
    trained = {}

    def fake_training(run_config, workdir):
        trained[os.path.basename(workdir)] = run_config.num_train_steps
        os.makedirs(workdir)
        with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
            f.write(json.dumps({'step': 1, 'train/loss': 0.25}) + '\n')
        report = dict.fromkeys(skip_ablation.COLUMNS, 0.5)
        confusion = [[5, 1, 0, 0], [1, 5, 0, 0], [0, 0, 5, 1], [0, 0, 1, 5]]
        return {'eval': report | {'confusion_matrix': confusion, 'class_names': list('abcd')}}

    monkeypatch.setattr(train, 'train_and_evaluate', fake_training)
    results = skip_ablation.run_sweep(config, 'unet', [0], str(tmp_path), ['full', 'none'])
    assert trained == {'full_seed0': 3, 'none_seed0': 7}
    assert results['num_train_steps'] == 3
    assert [v['num_train_steps'] for v in results['variants'].values()] == [3, 7]
    with open(os.path.join(tmp_path, 'results.md')) as f:
        assert f.readline().startswith('unet on shapes_fine, 3 steps (none: 7), seeds 0:')
    # The runlocal smoke config trains every variant for its few steps.
    assert not skip_ablation_shapes.get_config('unet,runlocal').variant_train_steps
    # Every FCN variant trains the same budget, scored at a third, two thirds and the end.
    fcn = skip_ablation_shapes.get_config('fcn')
    assert fcn.num_train_steps == 1200 and not fcn.variant_train_steps
    assert fcn.eval_every_steps == 400


@pytest.mark.slow
def test_sweep_writes_tables_plot_and_reuses_runs(base_config, tmp_path, monkeypatch):
    output = str(tmp_path)
    built = []
    build = run_programs.build
    monkeypatch.setattr(run_programs, 'build', lambda *args: built.append(args) or build(*args))
    results = skip_ablation.run_sweep(base_config, 'unet', [0, 1], output, ['full', 'none'])
    assert len(built) == 2  # Per variant: its second seed takes over the first's programs.

    assert list(results['variants']) == ['full', 'none'] and results['reference'] == 'full'
    for variant in results['variants'].values():
        assert set(variant['runs']) == {'0', '1'}
        for run in variant['runs'].values():
            assert 0.0 <= run['mean_iou'] <= 1.0 and 0.0 <= run['boundary_iou'] <= 1.0
            assert run['train_loss'] > 0 and run['seconds'] > 0
        kept = [r for r in variant['runs'].values() if not r['collapsed']]
        assert variant['stats']['mean_iou']['n'] == len(kept)
        assert set(variant['paired']) == set(skip_ablation.HEADLINE)
    for name, merge in (('full', 'concat'), ('none', 'none')):
        for seed in (0, 1):
            run_config = workdir_files.read_config(
                os.path.join(output, 'runs', f'{name}_seed{seed}')
            )
            assert run_config.seed == seed
            assert run_config.model.merge == merge

    with open(os.path.join(output, 'results.md')) as f:
        table = f.read()
    rows = [line for line in table.splitlines() if line.startswith('| ')]
    assert rows[0].startswith('| variant |') and 'mean IoU' in rows[0] and '95% CI' in rows[0]
    assert [row.split('|')[1].strip() for row in rows[1:3]] == ['full', 'none']
    assert 'Runs (4; their wall times add up to' in table
    with open(os.path.join(output, 'results.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    with open(os.path.join(output, 'results.json')) as f:
        assert json.load(f) == results

    def no_training(*args, **kwargs):
        raise AssertionError('a finished run was trained again')

    monkeypatch.setattr(train, 'train_and_evaluate', no_training)
    rerun = skip_ablation.run_sweep(base_config, 'unet', [0, 1], output, ['full', 'none'])
    assert rerun['variants']['none']['runs'] == results['variants']['none']['runs']


def test_unknown_variant_is_refused(base_config, tmp_path):
    with pytest.raises(ValueError, match='Unknown variants'):
        skip_ablation.run_sweep(base_config, 'unet', [0], str(tmp_path), ['8s'])
