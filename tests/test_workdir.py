"""Tests of the run-directory files and their readers (`workdir.py`), without training.

Also which config changes a workdir accepts, their history, and moving a run aside.
"""

import json

import jax
import numpy as np
import pytest

from configs import default
from fcn_unet_jax import errors
from fcn_unet_jax import workdir as workdir_files

CPU = {'platform': 'cpu', 'device_kind': 'cpu', 'device_count': 4, 'process_count': 1}


@pytest.fixture
def not_process_0(monkeypatch):
    """Makes this process look like process 1 of a multi-process run."""
    monkeypatch.setattr(jax, 'process_index', lambda: 1)


def test_write_json_is_valid_json_with_nan_as_null(tmp_path):
    path = tmp_path / 'result.json'
    content = {
        'b': float('nan'),
        'a': [np.float32(0.5), np.int64(3), (1, float('inf'))],
        'nested': {'x': np.float64(-np.inf), 'name': 'ok'},
    }
    workdir_files.write_json(path, content)
    text = path.read_text()
    assert 'NaN' not in text and 'Infinity' not in text  # Strict JSON parsers accept it.
    assert text.index('"a"') < text.index('"b"') and text.endswith('\n')
    assert json.loads(text) == {
        'a': [0.5, 3, [1, None]],
        'b': None,
        'nested': {'name': 'ok', 'x': None},
    }
    assert workdir_files.read_json(path) == json.loads(text)
    assert [p.name for p in tmp_path.iterdir()] == ['result.json']  # No temporary left.


def test_write_json_never_leaves_a_partly_written_file(tmp_path):
    path = tmp_path / 'run_info.json'
    workdir_files.write_json(path, {'step': 1})
    with pytest.raises(TypeError):
        workdir_files.write_json(path, {'step': 2, 'bad': object()})
    assert workdir_files.read_json(path) == {'step': 1}


def test_only_process_0_writes(tmp_path, not_process_0):
    workdir_files.write_json(tmp_path / 'a.json', {'x': 1})
    workdir_files.MetricsLog(tmp_path).write(1, {'train/loss': 0.5})
    assert not list(tmp_path.iterdir())


def test_read_config_gives_the_tuples_back(tmp_path):
    config = default.get_config()
    config.eval.window_size = (48, 64)
    workdir_files.write_config(tmp_path, config)
    written = json.loads((tmp_path / 'config.json').read_text())
    assert written['input']['crop_size'] == [128, 128]  # JSON has no tuples.
    restored = workdir_files.read_config(tmp_path)
    assert restored.input.crop_size == (128, 128)
    assert restored.eval.window_size == (48, 64) and restored.eval.scales == (1.0,)
    assert restored.model.decoder_channels == (256, 128, 64, 32, 16)
    assert restored.to_dict() == config.to_dict()
    restored.eval.mode = 'sliding'  # Unlocked: prediction flags override fields.


def test_eval_results_file_names():
    assert workdir_files.eval_results_file('validation', 'validation') == 'eval_results.json'
    assert workdir_files.eval_results_file('test', 'validation') == 'eval_results_test.json'
    name = workdir_files.eval_results_file('validation[:4]', 'validation')
    assert name == 'eval_results_validation_4.json'
    name = workdir_files.eval_results_file('train[10%:]+validation', 'validation')
    assert name == 'eval_results_train_10_validation.json'


def test_eval_report_names_classes_and_round_trips(tmp_path):
    result = {
        'mean_iou': 0.5,
        'per_class_iou': [1.0, float('nan')],
        'confusion_matrix': [[3, 0], [1, 0]],
    }
    report = workdir_files.eval_report(result, ['background', 'cell'], 7, 'validation[:4]')
    assert report['per_class_iou'] == {'background': 1.0, 'cell': None}
    assert report['step'] == 7 and report['class_names'] == ['background', 'cell']
    assert report['confusion_matrix'] == [[3, 0], [1, 0]]

    config = default.get_config()
    config.dataset.eval_split = 'validation'
    workdir_files.write_config(tmp_path, config)
    assert workdir_files.read_eval_results(tmp_path) is None
    workdir_files.write_eval_results(tmp_path, report, config.dataset.eval_split)
    assert (tmp_path / 'eval_results_validation_4.json').exists()
    assert workdir_files.read_eval_results(tmp_path) is None  # Not the run's eval split.
    assert workdir_files.read_eval_results(tmp_path, 'validation[:4]') == report
    final = dict(report, split='validation')
    workdir_files.write_eval_results(tmp_path, final, config.dataset.eval_split)
    assert workdir_files.read_eval_results(tmp_path) == final
    assert workdir_files.read_eval_results(tmp_path, 'validation') == final


def test_an_older_step_never_replaces_the_report_of_a_later_one(tmp_path):
    # An evaluation that fell back to an older checkpoint keeps the run's final scores.
    def write(step):
        report = {'step': step, 'split': 'validation', 'mean_iou': step / 10}
        return workdir_files.write_eval_results(tmp_path, report, 'validation').name

    assert write(8) == 'eval_results.json'
    assert write(4) == 'eval_results_step4.json'
    assert workdir_files.read_eval_results(tmp_path)['step'] == 8
    assert json.loads((tmp_path / 'eval_results_step4.json').read_text())['step'] == 4
    assert write(8) == write(12) == 'eval_results.json'  # The same or a later step replaces.
    assert workdir_files.read_eval_results(tmp_path)['step'] == 12


def test_metrics_log_appends_records_in_order(tmp_path):
    log = workdir_files.MetricsLog(tmp_path)
    log.write(1, {'train/loss': np.float32(2.5)})
    log.write(2, {'train/loss': float('nan')})
    workdir_files.MetricsLog(tmp_path).write(2, {'eval/mean_iou': 0.25})  # A resumed run.
    assert workdir_files.read_metrics_log(tmp_path) == [
        {'step': 1, 'train/loss': 2.5},
        {'step': 2, 'train/loss': None},
        {'step': 2, 'eval/mean_iou': 0.25},
    ]
    assert len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 3


def test_run_info_describes_the_mesh():
    config = default.get_config()
    info = workdir_files.run_info(config, jax.devices()[:2])
    assert info['platform'] == 'cpu' and info['device_count'] == 2
    assert info['local_device_count'] == 2 and info['process_count'] == 1
    assert info['global_batch_size'] == config.batch_size
    assert workdir_files.run_info(config)['device_count'] == 4


def _previous(tmp_path, **fields):
    record = {**CPU, 'start_step': 0, 'end_step': 100, 'wall_seconds': 60.0, **fields}
    workdir_files.write_run_info(tmp_path, record)
    return record


def test_continue_run_info_without_a_record(tmp_path):
    assert workdir_files.read_run_info(tmp_path) is None
    info = workdir_files.continue_run_info(tmp_path, CPU, 100)
    assert info == {**CPU, 'start_step': 100, 'wall_seconds': 0.0}
    assert 'start_step' not in CPU  # The caller's dict is left alone.


def test_continue_run_info_continues_where_the_record_ended(tmp_path):
    _previous(tmp_path)
    info = workdir_files.continue_run_info(tmp_path, dict(CPU, local_device_count=4), 100)
    assert info['start_step'] == 0 and info['wall_seconds'] == 60.0
    assert info['local_device_count'] == 4


@pytest.mark.parametrize(
    ('start_step', 'changed'),
    [
        (80, {}),  # Resumed from an older checkpoint: the steps in between are unknown.
        (100, {'device_kind': 'TPU v4'}),  # Other hardware: its time does not add up.
        (100, {'device_count': 8}),
        (100, {'process_count': 2}),
    ],
)
def test_continue_run_info_restarts_the_record(tmp_path, start_step, changed):
    _previous(tmp_path)
    info = workdir_files.continue_run_info(tmp_path, dict(CPU, **changed), start_step)
    assert info['start_step'] == start_step and info['wall_seconds'] == 0.0


def test_a_new_run_ignores_an_old_record(tmp_path):
    _previous(tmp_path, end_step=0)
    info = workdir_files.continue_run_info(tmp_path, CPU, 0)
    assert info['start_step'] == 0 and info['wall_seconds'] == 0.0
    assert workdir_files.read_run_info(tmp_path)['wall_seconds'] == 60.0


def test_config_changes_tell_run_defining_fields_from_safe_ones(tmp_path):
    config = default.get_config()
    workdir_files.write_config(tmp_path, config)
    assert workdir_files.config_changes(tmp_path, config) == []
    assert workdir_files.config_changes(tmp_path / 'new', config) == []
    changed = default.get_config()
    changed.model.width = 0.5
    changed.num_train_steps = 10
    changed.dataset.data_dir = '/elsewhere'
    changed.input.crop_size = (64, 64)
    changed.optimizer.grad_clip_norm = 1.0  # Adds an optimiser state: None -> a value.
    changes = workdir_files.config_changes(tmp_path, changed)
    assert [str(c) for c in changes] == [
        "dataset.data_dir None -> '/elsewhere'",
        'input.crop_size [128, 128] -> [64, 64]',
        'model.width 1.0 -> 0.5',
        'num_train_steps 1000 -> 10',
        'optimizer.grad_clip_norm None -> 1.0',
    ]
    defining = [c.field for c in changes if workdir_files.is_run_defining(c)]
    assert defining == ['model.width', 'optimizer.grad_clip_norm']
    clip = workdir_files.ConfigChange('optimizer.grad_clip_norm', 1.0, 2.0)
    assert not workdir_files.is_run_defining(clip)
    # A model field added later is run-defining without being listed.
    assert workdir_files.is_run_defining(workdir_files.ConfigChange('model.new_field', 1, 2))
    fields = workdir_files.run_fields(config)
    assert fields['model.name'] == 'unet' and 'num_train_steps' not in fields
    error = workdir_files.config_mismatch_error(tmp_path, changes[2:3], hint='do this')
    assert 'model.width 1.0 -> 0.5' in str(error) and error.hint == 'do this'


def test_record_config_keeps_a_history_of_safe_changes(tmp_path):
    config = default.get_config()
    workdir_files.record_config(tmp_path, config, [], 0)
    assert workdir_files.read_config_history(tmp_path) == []
    config.num_train_steps = 2000
    changes = workdir_files.config_changes(tmp_path, config)
    workdir_files.record_config(tmp_path, config, changes, 1000)
    (record,) = workdir_files.read_config_history(tmp_path)
    assert record['step'] == 1000 and record['changes'] == {'num_train_steps': [1000, 2000]}
    assert workdir_files.read_config(tmp_path).num_train_steps == 2000


def test_move_run_aside_keeps_every_file(tmp_path):
    assert workdir_files.move_run_aside(tmp_path / 'missing') is None
    (tmp_path / 'checkpoints' / '4').mkdir(parents=True)
    (tmp_path / 'checkpoints' / '4' / 'data').write_bytes(b'12345')
    (tmp_path / 'config.json').write_text('{}')
    first = workdir_files.move_run_aside(tmp_path)
    assert first == tmp_path / 'previous_runs' / '1'
    assert (first / 'checkpoints' / '4' / 'data').read_bytes() == b'12345'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['previous_runs']
    (tmp_path / 'config.json').write_text('{"second": 1}')
    assert workdir_files.move_run_aside(tmp_path) == tmp_path / 'previous_runs' / '2'
    assert (first / 'config.json').read_text() == '{}'


def test_metrics_log_of_a_resumed_run_has_each_step_once(tmp_path):
    log = workdir_files.MetricsLog(tmp_path, start_step=0)
    for step in (1, 2, 3):
        log.write(step, {'train/loss': float(step)})
    log.write(2, {'eval/mean_iou': 0.5})
    # Resumed from the checkpoint of step 2: step 3 is trained again, and the evaluation of
    # step 2 (a finished run evaluated again) replaces the earlier one.
    log = workdir_files.MetricsLog(tmp_path, start_step=2)
    log.write(2, {'eval/mean_iou': 0.75})
    log.write(3, {'train/loss': 3.5})
    assert workdir_files.read_metrics_log(tmp_path) == [
        {'step': 1, 'train/loss': 1.0},
        {'step': 2, 'train/loss': 2.0},
        {'step': 2, 'eval/mean_iou': 0.75},
        {'step': 3, 'train/loss': 3.5},
    ]


def test_reading_the_config_of_a_folder_that_is_no_workdir(tmp_path):
    with pytest.raises(errors.MissingInputError, match='holds no config.json'):
        workdir_files.read_config(tmp_path)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        workdir_files.read_config(tmp_path / 'missing')
