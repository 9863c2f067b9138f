"""End-to-end test of experiments/skip_ablation.py on a tiny `shapes` build.

The sweep runs in-process: 2 U-Net variants x 2 seeds, 2 steps each, on 32 px crops of a
few `shapes/small` images; then the results files are checked, and a rerun must reuse the
finished runs instead of training again.
"""

import json
import os

import pytest

from configs import skip_ablation_shapes
from experiments import skip_ablation
from fcn_unet_jax import train
from fcn_unet_jax import workdir as workdir_files

pytestmark = pytest.mark.usefixtures('fast_compile')


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


def test_sweep_writes_table_plot_and_reuses_runs(base_config, tmp_path, monkeypatch):
    output = str(tmp_path)
    results = skip_ablation.run_sweep(base_config, 'unet', [0, 1], output, ['full', 'none'])

    assert list(results['variants']) == ['full', 'none']
    for variant in results['variants'].values():
        assert set(variant['runs']) == {'0', '1'}
        assert 0.0 <= variant['mean']['mean_iou'] <= 1.0
        assert variant['std']['mean_iou'] >= 0.0
    for name, merge in (('full', 'concat'), ('none', 'none')):
        for seed in (0, 1):
            run_config = workdir_files.read_config(
                os.path.join(output, 'runs', f'{name}_seed{seed}')
            )
            assert run_config.seed == seed
            assert run_config.model.merge == merge

    with open(os.path.join(output, 'results.md')) as f:
        rows = [line for line in f.read().splitlines() if line.startswith('| ')]
    assert rows[0].startswith('| variant |') and 'mean IoU' in rows[0] and 'Dice' in rows[0]
    assert [row.split('|')[1].strip() for row in rows[1:]] == ['full', 'none']
    full = results['variants']['full']
    assert f'{full["mean"]["mean_iou"]:.4f} ± {full["std"]["mean_iou"]:.4f}' in rows[1]
    with open(os.path.join(output, 'results.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    with open(os.path.join(output, 'results.json')) as f:
        assert json.load(f) == results

    def no_training(*args, **kwargs):
        raise AssertionError('a finished run was trained again')

    monkeypatch.setattr(train, 'train_and_evaluate', no_training)
    rerun = skip_ablation.run_sweep(base_config, 'unet', [0, 1], output, ['full', 'none'])
    assert rerun['variants']['none']['mean'] == results['variants']['none']['mean']


def test_unknown_variant_is_refused(base_config, tmp_path):
    with pytest.raises(ValueError, match='Unknown variants'):
        skip_ablation.run_sweep(base_config, 'unet', [0], str(tmp_path), ['8s'])
