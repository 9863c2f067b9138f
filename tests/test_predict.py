"""Tests of the prediction CLI on the session's tiny run (conftest: a 4-step tiny U-Net).

Covered: odd-sized, grayscale and much-larger-than-training images, sliding windows and
flip TTA, unreadable files (reported and skipped), folder / file / glob inputs, the exit
status, and one run of `python -m fcn_unet_jax.predict`.
"""

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from fcn_unet_jax import inference, metrics, predict
from fcn_unet_jax import workdir as workdir_files

NUM_CLASSES = 4  # shapes: background, circle, rectangle, triangle.


pytestmark = pytest.mark.usefixtures('fast_compile')


@pytest.fixture(scope='module')
def workdir(tiny_trained_run) -> str:
    """The session's finished run of a width-1/16 U-Net on 32 px crops (read-only)."""
    return str(tiny_trained_run.workdir)


@pytest.fixture(scope='module')
def palette(workdir) -> np.ndarray:
    return predict.palette_of(workdir_files.read_config(workdir))


def _save(path, shape, mode='RGB', seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(path)
    return path


def _corrupt(path):
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\nthis is not an image')
    return path


def _check_outputs(output_dir, name, size, palette):
    """Asserts the three PNGs of `name` exist, match `size` and agree with each other."""
    with Image.open(os.path.join(output_dir, f'{name}.png')) as f:
        assert f.mode == 'L' and f.size == size[::-1]
        ids = np.asarray(f)
    assert ids.max() < NUM_CLASSES
    with Image.open(os.path.join(output_dir, f'{name}_color.png')) as f:
        colour = np.asarray(f.convert('RGB'))
    np.testing.assert_array_equal(colour, palette[ids])
    with Image.open(os.path.join(output_dir, f'{name}_overlay.png')) as f:
        # The image's size, plus the legend of the classes shown underneath.
        assert f.size[0] == size[1] and f.size[1] > size[0] and f.mode == 'RGB'


def test_folder_with_odd_grayscale_and_corrupt_files(workdir, palette, tmp_path, caplog):
    inputs = tmp_path / 'in'
    inputs.mkdir()
    _save(inputs / 'odd.png', (37, 53, 3))
    _save(inputs / 'gray.jpg', (37, 53), mode='L', seed=1)
    _save(inputs / 'small.png', (20, 31, 3), seed=2)
    broken = _corrupt(inputs / 'broken.png')
    (inputs / 'notes.txt').write_text('not an image extension: never read')
    output = tmp_path / 'out'
    paths = predict.find_inputs(str(inputs))
    assert [os.path.basename(p) for p in paths] == [
        'broken.png',
        'gray.jpg',
        'odd.png',
        'small.png',
    ]
    with caplog.at_level(logging.WARNING):
        result = predict.predict_paths(workdir, paths, str(output), flip=True, batch_size=4)
    assert [os.path.basename(p) for p in result.written] == ['gray.png', 'odd.png', 'small.png']
    assert [p for p, _ in result.failed] == [str(broken)]
    assert any(str(broken) in r.getMessage() for r in caplog.records)
    _check_outputs(output, 'odd', (37, 53), palette)
    _check_outputs(output, 'gray', (37, 53), palette)
    _check_outputs(output, 'small', (20, 31), palette)
    assert len(os.listdir(output)) == 9


def test_large_image_in_sliding_mode(workdir, palette, tmp_path):
    image = _save(tmp_path / 'large.png', (300, 260, 3))
    output = tmp_path / 'out'
    result = predict.predict_paths(
        workdir, [str(image)], str(output), mode='sliding', window_size=(32, 32), batch_size=2
    )
    assert len(result.written) == 1 and not result.failed
    _check_outputs(output, 'large', (300, 260), palette)


def test_run_config_is_restored_and_overridden(workdir):
    config = workdir_files.read_config(workdir)
    assert config.input.crop_size == (32, 32)  # JSON lists are tuples again.
    assert inference.InferenceSettings.from_config(config) == inference.InferenceSettings(
        windows_per_call=4
    )
    # Flag values arrive as strings (absl list flags).
    predict.override_eval(
        config,
        mode='sliding',
        window_size=['32', '48'],
        flip=True,
        scales=['0.75', '1'],
        batch_size=2,
    )
    assert inference.InferenceSettings.from_config(config) == inference.InferenceSettings(
        mode='sliding', window_size=(32, 48), flip=True, scales=(0.75, 1.0), windows_per_call=2
    )


def test_nothing_readable_gives_a_nonzero_status(workdir, tmp_path):
    _corrupt(tmp_path / 'broken.png')
    assert predict.run(workdir, str(tmp_path / '*.png'), str(tmp_path / 'out')) == 1
    assert not (tmp_path / 'out').exists()  # No empty output folder left behind.
    with pytest.raises(FileNotFoundError, match='No input images'):
        predict.find_inputs(str(tmp_path / 'missing' / '*.png'))


def test_command_line_with_a_glob(workdir, palette, tmp_path, subprocess_env, repo_root):
    _save(tmp_path / 'one.png', (40, 30, 3))
    _corrupt(tmp_path / 'two.png')
    _save(tmp_path / 'three.jpg', (40, 30, 3))  # Not matched by the glob.
    output = tmp_path / 'out'
    command = [
        sys.executable,
        '-m',
        'fcn_unet_jax.predict',
        f'--workdir={workdir}',
        f'--input={tmp_path}/*.png',
        f'--output={output}',
        '--mode=sliding',
        '--window_size=32,32',
        '--scales=0.75,1',
    ]
    process = subprocess.run(
        command, env=subprocess_env, cwd=repo_root, capture_output=True, text=True
    )
    assert process.returncode == 0, process.stderr
    assert 'two.png' in process.stderr
    assert sorted(os.listdir(output)) == ['one.png', 'one_color.png', 'one_overlay.png']
    _check_outputs(output, 'one', (40, 30), palette)


def test_inputs_sharing_a_stem_get_distinct_output_names():
    paths = ['x/a.png', 'x/a.JPG', 'y/a.png', 'x/b.png']
    names = predict.output_names(paths)
    assert names['x/b.png'] == 'b'
    assert names['x/a.JPG'] == 'a_jpg'
    assert {names['x/a.png'], names['y/a.png']} == {'a_png_1', 'a_png_2'}
    assert len(set(names.values())) == len(paths)


def test_labels_folder_scores_predictions_with_the_full_metric_set(workdir, tmp_path):
    inputs, labels, output = tmp_path / 'in', tmp_path / 'labels', tmp_path / 'out'
    inputs.mkdir()
    labels.mkdir()
    _save(inputs / 'a.jpg', (36, 44, 3))
    _save(inputs / 'b.png', (36, 44, 3), seed=1)
    _save(inputs / 'c.png', (20, 20, 3), seed=2)
    _save(inputs / 'd.png', (20, 20, 3), seed=3)
    truth = np.zeros((36, 44), np.uint8)
    truth[8:24, 10:30] = 1
    truth[0, :] = 255  # Ignored.
    Image.fromarray(truth).save(labels / 'a.png')  # Matched by stem: a.jpg -> a.png.
    Image.fromarray(np.zeros((36, 40), np.uint8)).save(labels / 'b.png')  # Wrong size.
    _save(labels / 'c.png', (20, 20, 3))  # RGB colours, not class ids.
    # d has no mask at all.
    paths = predict.find_inputs(str(inputs))
    result = predict.predict_paths(workdir, paths, str(output))
    report = predict.score_with_labels(workdir, str(inputs), result, str(labels), str(output))

    with open(output / predict.LABELS_FILE) as f:
        assert json.load(f) == report
    assert report['num_images'] == 1 and list(report['per_image']) == [str(inputs / 'a.jpg')]
    assert set(report['unscored']) == {str(inputs / n) for n in ('b.png', 'c.png', 'd.png')}
    with Image.open(output / 'a.png') as f:
        prediction = np.asarray(f, np.int32)
    count = jax.jit(metrics.segmentation_counts, static_argnums=(2, 3))
    counts = count(truth.astype(np.int32), prediction, NUM_CLASSES, 255)
    expected = metrics.scores_from_counts({k: np.asarray(v) for k, v in counts.items()})
    for key in ('mean_iou', 'pixel_accuracy', 'boundary_iou', 'trimap_accuracy_2px'):
        np.testing.assert_allclose(report[key], expected[key], err_msg=key)
    assert np.sum(report['confusion_matrix']) == 35 * 44  # Row 0 ignored.
    assert set(report['per_class_boundary_iou']) == set(report['class_names'])

    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='No prediction could be scored'):
        predict.score_with_labels(workdir, str(inputs), result, str(tmp_path / 'empty'), '')
