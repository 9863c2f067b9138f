"""Tests of experiments/replicate.py and of the run_info.json that train.py writes.

Most tests write fake run directories with the files train.py writes (config.json from the
real recipe configs, with the paper's number in their `reported` section; eval_results.json
through `workdir_files.eval_report`; run_info.json from `workdir_files.run_info`), so no
training is needed; one tiny real run on `shapes/small` checks that `train_and_evaluate`
writes run_info.json, continues it when rerun, and that the table reads it.
"""

import json
import os

import jax
import numpy as np
import pytest
from etils import epath

from configs import default, fcn_resnet_voc, fcn_voc, shapes_unet
from experiments import replicate
from fcn_unet_jax import metrics, train
from fcn_unet_jax import workdir as workdir_files
from tests.test_configs import CASES, load


def _confusion(num_classes: int, correct: int, wrong: int) -> np.ndarray:
    """`correct` pixels on the diagonal and `wrong` off it in every row."""
    confusion = np.full((num_classes, num_classes), 0, np.int64)
    confusion[np.arange(num_classes), np.arange(num_classes)] = correct
    confusion[np.arange(num_classes), (np.arange(num_classes) + 1) % num_classes] = wrong
    return confusion


def write_run(
    path,
    config,
    *,
    correct: int = 9,
    wrong: int = 1,
    step: int | None = None,
    info: dict | None = None,
    files=('config', 'eval', 'run_info'),
    boundary: bool = True,
) -> dict:
    """A fake run directory with the files train.py writes; returns its eval report.

    `boundary=False` leaves out the boundary metrics, as in reports written before them.
    """
    workdir = epath.Path(path)
    workdir.mkdir(parents=True, exist_ok=True)
    step = config.num_train_steps if step is None else step
    confusion = _confusion(config.model.num_classes, correct, wrong)
    result = metrics.scores(confusion)
    if boundary:
        counts = metrics.zero_counts(config.model.num_classes)
        counts['boundary_intersection'] += correct // 2
        counts['boundary_union'] += correct + wrong
        counts['trimap_confusion'] += confusion
        result |= metrics.boundary_scores(counts)
    names = [f'class{i}' for i in range(config.model.num_classes)]
    report = workdir_files.eval_report(result, names, step, config.dataset.eval_split)
    if 'config' in files:
        workdir_files.write_json(workdir / workdir_files.CONFIG_FILE, config.to_dict())
    if 'eval' in files:
        workdir_files.write_json(workdir / workdir_files.EVAL_RESULTS_FILE, report)
    if 'run_info' in files:
        content = workdir_files.run_info(config) | {'start_step': 0, 'end_step': step}
        content |= {'wall_seconds': 7200.0} | (info or {})
        workdir_files.write_json(workdir / workdir_files.RUN_INFO_FILE, content)
    return report


TPU = {'platform': 'tpu', 'device_kind': 'TPU v4', 'device_count': 4, 'local_device_count': 4}


def test_match_recipe_uses_model_dataset_and_split():
    assert replicate.match_recipe(fcn_voc.get_config('32s').to_dict()) == 'configs/fcn_voc.py:32s'
    assert replicate.match_recipe(fcn_voc.get_config('16s').to_dict()) == 'configs/fcn_voc.py:16s'
    # A smoke run keeps the recipe's identity; the table notes its other schedule.
    smoke = fcn_voc.get_config('32s,runlocal').to_dict()
    assert replicate.match_recipe(smoke) == 'configs/fcn_voc.py:32s'
    other_split = fcn_voc.get_config('32s')
    other_split.dataset.eval_split = 'validation[:10]'
    assert replicate.match_recipe(other_split.to_dict()) is None
    assert replicate.changed_fields(other_split.to_dict()) == [
        ('dataset.eval_split', 'validation[:10]', 'validation')
    ]
    assert replicate.match_recipe(shapes_unet.get_config().to_dict()) is None
    assert replicate.match_recipe(default.get_config().to_dict()) is None
    # The recipe names the config that rebuilds it.
    assert replicate.recipe_config('configs/fcn_voc.py:8s').to_dict() == (
        fcn_voc.get_config('8s').to_dict()
    )


def test_configs_hold_the_papers_numbers():
    reported = {stage: fcn_voc.get_config(stage).reported for stage in fcn_voc.STAGES}
    assert reported['32s'].mean_iou == 63.6
    assert reported['16s'].mean_iou == 65.0
    assert reported['8s'].mean_iou == 65.5
    assert reported['8s_atonce'].mean_iou is None
    assert '65.5 mean IU' in reported['8s_atonce'].caveat
    resnet = {depth: fcn_resnet_voc.get_config(depth).reported for depth in ('50', '101')}
    assert (resnet['50'].mean_iou, resnet['50'].pixel_accuracy) == (60.5, 91.4)
    assert (resnet['101'].mean_iou, resnet['101'].pixel_accuracy) == (63.7, 91.9)
    for depth in ('50', '101'):
        assert 'COCO' in resnet[depth].caveat
    # Every recipe is a config whose signature (the fields its number applies to) is unique.
    signatures = {}
    for name, arg in CASES:
        config = load(name, arg)
        if config.reported.recipe:
            signatures[config.reported.recipe] = config.reported.applies_to
    assert len(signatures) == 8
    assert len(set(signatures.values())) == len(signatures)


def test_rows_delta_hardware_batch_and_outputs(tmp_path):
    runs = tmp_path / 'workdirs'
    r32 = write_run(runs / 'fcn_voc_32s', fcn_voc.get_config('32s'), info=TPU)
    r16 = write_run(runs / 'fcn_voc_16s', fcn_voc.get_config('16s'), correct=19)
    resnet = fcn_resnet_voc.get_config('50')
    write_run(runs / 'fcn_resnet_voc_50', resnet, info=TPU | {'process_count': 2})
    custom = shapes_unet.get_config()
    write_run(runs / 'shapes_unet', custom, files=('config', 'eval'), boundary=False)

    paths = [str(runs / n) for n in ('fcn_voc_32s', 'fcn_voc_16s', 'fcn_resnet_voc_50')]
    results = replicate.collect(paths + [str(runs / 'shapes_unet')])
    rows = {os.path.basename(row['run']): row for row in results['rows']}
    assert list(rows) == ['fcn_voc_32s', 'fcn_voc_16s', 'fcn_resnet_voc_50', 'shapes_unet']

    row = rows['fcn_voc_32s']
    assert row['recipe'] == 'configs/fcn_voc.py:32s' and row['title'] == 'FCN-32s'
    assert row['mean_iou'] == pytest.approx(100 * r32['mean_iou'])
    assert row['delta'] == pytest.approx(100 * r32['mean_iou'] - 63.6)
    assert row['pixel_accuracy'] == pytest.approx(100 * r32['pixel_accuracy'])
    assert row['boundary_iou'] == pytest.approx(100 * r32['boundary_iou'])
    assert row['trimap_mean_iou'] == pytest.approx(100 * r32['trimap_mean_iou_4px'])
    assert row['hardware'] == '4 x TPU v4'
    assert row['global_batch_size'] == 1 and row['step'] == 100_000
    assert row['wall_seconds'] == 7200.0 and row['notes'] == []
    assert rows['fcn_voc_16s']['delta'] == pytest.approx(100 * r16['mean_iou'] - 65.0)
    assert rows['fcn_voc_16s']['hardware'] == f'{jax.device_count()} x cpu'
    assert rows['fcn_resnet_voc_50']['hardware'] == '4 x TPU v4 (2 hosts)'
    assert rows['fcn_resnet_voc_50']['global_batch_size'] == 32
    assert 'not comparable: COCO subset' in rows['fcn_resnet_voc_50']['notes']
    # No recipe and no run_info.json: listed anyway, hardware unknown, batch from config.
    unknown = rows['shapes_unet']
    assert unknown['recipe'] is None and unknown['delta'] is None
    assert unknown['reported_mean_iou'] is None
    assert unknown['hardware'] == 'unknown' and unknown['wall_seconds'] is None
    assert unknown['global_batch_size'] == custom.batch_size
    # The reported sections of the compared recipes, as their runs' config.json hold them.
    assert list(results['reported']) == [
        'configs/fcn_voc.py:32s',
        'configs/fcn_voc.py:16s',
        'configs/fcn_resnet_voc.py:50',
    ]
    assert results['reported']['configs/fcn_voc.py:32s']['mean_iou'] == 63.6

    table = replicate.markdown_table(results)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith('| recipe'))
    columns = ('reported', 'mean IoU (%)', 'delta', 'Boundary IoU (%)', 'trimap IoU 4 px (%)')
    for column in columns + ('global batch', 'hardware', 'wall time'):
        assert f'| {column} |' in header
    body = [line for line in lines if line.startswith('| ') and line != header]
    cells = [c.strip() for c in body[0].split('|')[1:-1]]
    assert cells[:4] == [
        'FCN-32s',
        'fcn32s_vgg16',
        'voc_segmentation/sbd_fcn / validation (seg11valid)',
        '63.6 mean IU',
    ]
    assert cells[4] == f'{100 * r32["mean_iou"]:.1f}'
    assert cells[5] == f'{100 * r32["mean_iou"] - 63.6:+.1f}'
    assert cells[7] == f'{100 * r32["boundary_iou"]:.1f}'
    assert cells[8] == f'{100 * r32["trimap_mean_iou_4px"]:.1f}'
    assert cells[9:13] == ['100,000', '1', '4 x TPU v4', '2.0 h']
    # A run evaluated before the boundary metrics existed: no reported number, no boundaries.
    old_run = [c.strip() for c in body[3].split('|')[1:-1]]
    assert (old_run[3], old_run[7], old_run[8]) == ('—', '—', '—')
    assert 'Caveats:' in table and 'COCO' in table and 'Sources:' in table
    assert '(`voc-fcn32s/`); configs/fcn_voc.py:32s' in table

    output = tmp_path / 'out'
    replicate.write_outputs(results, str(output))
    assert (output / 'replication.md').read_text() == table + '\n'
    assert json.loads((output / 'replication.json').read_text()) == results


def test_departures_from_the_recipe_are_noted(tmp_path):
    smoke = fcn_voc.get_config('8s_atonce,runlocal')
    write_run(tmp_path / 'smoke', smoke, step=2, info={'start_step': 0, 'end_step': 2})
    resumed = fcn_voc.get_config('32s')
    write_run(tmp_path / 'resumed', resumed, info={'start_step': 40_000})
    notes = replicate.replication_row(str(tmp_path / 'smoke'))['notes']
    assert 'no separate number: compare with staged FCN-8s' in notes
    assert 'evaluated at step 2 of 4' in notes
    assert 'recipe: 100,000 steps at batch 1' in notes
    row = replicate.replication_row(str(tmp_path / 'resumed'))
    assert row['wall_seconds'] is None and row['notes'] == ['resumed at step 40,000']


def test_the_number_comes_from_the_runs_config_json(tmp_path):
    # A config the table knows nothing about: its run's config.json alone carries the number.
    config = shapes_unet.get_config()
    default.set_reported(
        config,
        recipe='configs/shapes_unet.py',
        title='Shapes U-Net',
        split_label='shapes val',
        metric='mean IoU',
        mean_iou=42.5,
        pixel_accuracy=88.0,
        source='a test',
        flag='made up',
        caveat='Not a paper.',
    )
    report = write_run(tmp_path / 'run', config, info=TPU)
    results = replicate.collect([str(tmp_path / 'run')])
    row = results['rows'][0]
    assert row['recipe'] == 'configs/shapes_unet.py' and row['title'] == 'Shapes U-Net'
    assert row['reported_mean_iou'] == 42.5 and row['reported_pixel_accuracy'] == 88.0
    assert row['delta'] == pytest.approx(100 * report['mean_iou'] - 42.5)
    assert row['split_label'] == 'shapes val' and row['reported_metric'] == 'mean IoU'
    # The recipe's schedule is shapes_unet.py's: this run keeps it.
    assert row['notes'] == ['made up']
    table = replicate.markdown_table(results)
    assert '| Shapes U-Net | unet | shapes/small / validation (shapes val) | 42.5 mean IoU |' in (
        table
    )
    assert '- Shapes U-Net: Not a paper.' in table
    assert '- Shapes U-Net: a test; configs/shapes_unet.py' in table


@pytest.mark.parametrize(
    ('name', 'arg', 'field', 'value'),
    [
        ('fcn_voc', '32s', 'model.name', 'fcn16s_vgg16'),
        ('fcn_resnet_voc', '50', 'dataset.name', 'voc_segmentation/sbd_fcn'),
        ('unet_paper', None, 'model.padding', 'SAME'),
    ],
)
def test_a_run_that_changes_what_the_number_applies_to_is_not_compared(
    name, arg, field, value, tmp_path
):
    # Launched with a replication config but another model, data or padding: the run's
    # config.json still carries the recipe's number, which must not be compared with it.
    config = load(name, arg)
    recipe_value = dict(config.reported.applies_to)[field]
    section, key = field.split('.')
    config[section][key] = value
    write_run(tmp_path / 'run', config)
    results = replicate.collect([str(tmp_path / 'run')])
    row = results['rows'][0]
    assert row['recipe'] is None and row['title'] is None
    assert row['reported_mean_iou'] is None and row['delta'] is None
    assert row['notes'][0] == (
        f'not compared with {config.reported.recipe}: {field} {value} (recipe: {recipe_value})'
    )
    assert results['reported'] == {}
    table = replicate.markdown_table(results)
    cells = [c.strip() for c in table.splitlines()[4].split('|')[1:-1]]
    assert (cells[0], cells[3], cells[5]) == ('—', '—', '—')
    assert 'Sources:' not in table and 'Caveats:' not in table


def _replication_cases():
    return [(n, a) for n, a in CASES if load(n, a).reported.recipe]


@pytest.mark.parametrize(('name', 'arg'), _replication_cases())
def test_every_replication_config_reaches_the_table(name, arg, tmp_path):
    config = load(name, arg)
    reported = config.reported
    report = write_run(tmp_path / 'run', config, info=TPU)
    results = replicate.collect([str(tmp_path / 'run')])
    row = results['rows'][0]
    assert row['recipe'] == reported.recipe and row['title'] == reported.title
    assert row['reported_mean_iou'] == reported.mean_iou
    assert row['reported_pixel_accuracy'] == reported.pixel_accuracy
    table = replicate.markdown_table(results)
    cells = [c.strip() for c in table.splitlines()[4].split('|')[1:-1]]
    assert cells[0] == reported.title
    assert cells[2].endswith(f'({reported.split_label})')
    if reported.mean_iou is None:
        assert cells[3] == '—' and cells[5] == '—'
    else:
        assert cells[3] == f'{reported.mean_iou:.1f} {reported.metric}'
        assert cells[5] == f'{100 * report["mean_iou"] - reported.mean_iou:+.1f}'
    if reported.flag:
        assert reported.flag in cells[13]
    if reported.caveat:
        assert f'- {reported.title}: {reported.caveat}' in table
    assert f'- {reported.title}: {reported.source}; {reported.recipe}' in table
    saved = json.loads((tmp_path / 'run' / workdir_files.CONFIG_FILE).read_text())
    assert results['reported'] == {reported.recipe: saved['reported']}


def test_incomplete_runs_are_skipped_or_refused(tmp_path):
    write_run(tmp_path / 'done', fcn_voc.get_config('32s'))
    write_run(tmp_path / 'training', fcn_voc.get_config('16s'), files=('config', 'run_info'))
    (tmp_path / 'empty').mkdir()
    runs = replicate.expand_runs([str(tmp_path / '*')])
    assert runs == [str(tmp_path / n) for n in ('done', 'empty', 'training')]

    results = replicate.collect(runs)
    assert [row['run'] for row in results['rows']] == [str(tmp_path / 'done')]
    reasons = {s['run']: s['reason'] for s in results['skipped']}
    eval_path = os.path.join(tmp_path / 'training', 'eval_results.json')
    assert eval_path in reasons[str(tmp_path / 'training')]
    assert 'final evaluation' in reasons[str(tmp_path / 'training')]
    assert os.path.join(tmp_path / 'empty', 'config.json') in reasons[str(tmp_path / 'empty')]
    table = replicate.markdown_table(results)
    assert 'Skipped (not in the table):' in table and eval_path in table

    with pytest.raises(replicate.IncompleteRunError, match='eval_results.json'):
        replicate.collect([str(tmp_path / 'done'), str(tmp_path / 'training')], strict=True)
    with pytest.raises(replicate.IncompleteRunError, match='No finished run'):
        replicate.collect([str(tmp_path / 'training')])
    with pytest.raises(FileNotFoundError, match='does not exist'):
        replicate.expand_runs([str(tmp_path / 'typo')])
    with pytest.raises(FileNotFoundError, match='matches no directory'):
        replicate.expand_runs([str(tmp_path / 'nothing*')])


def test_run_info_describes_the_mesh():
    config = default.get_config()
    info = workdir_files.run_info(config, jax.devices()[:2])
    assert info['platform'] == 'cpu' and info['device_kind'] == 'cpu'
    assert info['device_count'] == 2 and info['local_device_count'] == 2
    assert info['process_count'] == 1
    assert info['global_batch_size'] == config.batch_size
    assert info['jax_version'] == jax.__version__ and info['flax_version']
    assert workdir_files.run_info(config)['device_count'] == jax.device_count()


@pytest.mark.usefixtures('fast_compile')
def test_train_and_evaluate_writes_run_info(shapes_small_data_dir, tmp_path):
    config = default.get_config()
    config.dataset.name = 'shapes/small'
    config.dataset.data_dir = shapes_small_data_dir
    config.dataset.train_split = 'train[:8]'
    config.dataset.eval_split = 'validation[:2]'
    config.model.width = 0.0625
    config.input.crop_size = (32, 32)
    config.input.eval_pad_size = (64, 64)
    config.batch_size = 2
    config.eval_batch_size = 2
    config.num_train_steps = 1
    config.eval.tensorboard_images = 0  # Pictures are tests/test_console_logs.py's.
    workdir = tmp_path / 'run'
    summaries = train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:2])

    info = json.loads((workdir / workdir_files.RUN_INFO_FILE).read_text())
    assert info == summaries['run_info']
    assert info['device_count'] == 2 and info['global_batch_size'] == 2
    assert info['start_step'] == 0 and info['end_step'] == 1 and info['wall_seconds'] > 0
    row = replicate.replication_row(str(workdir))
    assert row['hardware'] == '2 x cpu' and row['global_batch_size'] == 2
    assert row['wall_seconds'] == info['wall_seconds']
    assert row['mean_iou'] == pytest.approx(100 * summaries['eval']['mean_iou'])

    # Rerunning a finished run only re-evaluates it: the record goes on from step 0.
    again = train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:2])['run_info']
    assert again['start_step'] == 0 and again['end_step'] == 1
    assert again['wall_seconds'] > info['wall_seconds']
    # Other hardware than the record's: the time before cannot be added, the record restarts.
    (workdir / workdir_files.RUN_INFO_FILE).write_text(
        json.dumps(again | {'device_kind': 'TPU v4'})
    )
    other = train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:2])['run_info']
    assert other['start_step'] == 1 and other['wall_seconds'] < again['wall_seconds']
    assert replicate.replication_row(str(workdir))['notes'] == ['resumed at step 1']
