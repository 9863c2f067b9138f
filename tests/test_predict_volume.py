"""Tests of volume prediction and per-volume evaluation on a 2-step run of a tiny U-Net.

A tiny `volumes` root (two axis-aligned NIfTI cases, one oblique NIfTI case stored in
another axis order and shape, one DICOM series) is built and trained on with
`configs/unet_nifti.py:runlocal`; then every case is segmented, written aligned with its
input and scored, a corrupt input is skipped, and the validation split is evaluated.
"""

import json
import os
import shutil

import numpy as np
import pytest

nibabel = pytest.importorskip('nibabel')
pytest.importorskip('pydicom')

from configs import unet_nifti  # noqa: E402
from fcn_unet_jax import metrics, predict_volume, train  # noqa: E402
from fcn_unet_jax import workdir as workdir_files  # noqa: E402
from fcn_unet_jax.data import builders, volume_io  # noqa: E402
from fcn_unet_jax.data.builders import volumes  # noqa: E402
from tests.data.test_volumes import _dicom_series, _save_nifti  # noqa: E402

pytestmark = pytest.mark.usefixtures('fast_compile')

NUM_CLASSES = 3
CASES = ('axial_a', 'axial_b', 'ct_dicom', 'oblique')


def _swapped_oblique_affine() -> np.ndarray:
    """Voxel axis 0 runs (mostly) posterior, axis 1 left: rotated 30 degrees about z."""
    angle = np.deg2rad(30)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.array([[0, -0.8, 0], [-0.9, 0, 0], [0, 0, -2.5]])
    affine[:3, 3] = [40.0, -12.5, 30.0]
    return affine


def _labels_of(raw: np.ndarray) -> np.ndarray:
    return (raw > 100).astype(np.uint8) + (raw > 200).astype(np.uint8)


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    """images/, labels/, classes.txt and splits/ (validation: `oblique`)."""
    root = tmp_path_factory.mktemp('scans')
    for sub in ('images', 'labels', 'splits'):
        (root / sub).mkdir()
    rng = np.random.default_rng(0)
    for seed, case in enumerate(('axial_a', 'axial_b')):
        raw = np.random.default_rng(seed).integers(0, 300, (16, 16, 6)).astype(np.int16)
        affine = np.diag([0.8, 0.9, 2.5, 1.0])
        _save_nifti(root / 'images' / f'{case}.nii.gz', raw, affine)
        _save_nifti(root / 'labels' / f'{case}.nii.gz', _labels_of(raw), affine)
    raw = rng.integers(0, 300, (16, 32, 6)).astype(np.int16)
    _save_nifti(root / 'images' / 'oblique.nii.gz', raw, _swapped_oblique_affine())
    _save_nifti(root / 'labels' / 'oblique.nii.gz', _labels_of(raw), _swapped_oblique_affine())
    raw = rng.integers(0, 300, (16, 16, 6)).astype(np.int16)
    _dicom_series(root / 'images' / 'ct_dicom', raw)
    image = volume_io.load_volume(str(root / 'images' / 'ct_dicom'))
    volume_io.write_label_volume(
        _labels_of(image.data), image, str(root / 'labels' / 'ct_dicom.nii.gz')
    )
    (root / 'classes.txt').write_text('background\nlow\nhigh\n')
    (root / 'splits' / 'train.txt').write_text('axial_a\naxial_b\nct_dicom\n')
    (root / 'splits' / 'val.txt').write_text('oblique\n')
    return root


@pytest.fixture(scope='module')
def workdir(root, tmp_path_factory) -> str:
    """A finished 2-step run of `configs/unet_nifti.py:runlocal`, shrunk further."""
    config = unet_nifti.get_config('runlocal')
    config.dataset.volume_root = str(root)
    config.dataset.data_dir = str(tmp_path_factory.mktemp('tfds'))
    config.model.num_classes = NUM_CLASSES
    config.model.width = 0.0625
    config.input.crop_size = (16, 16)
    config.batch_size = config.eval_batch_size = 4  # conftest forces 4 host devices.
    config.num_train_steps = 2
    path = str(tmp_path_factory.mktemp('run'))
    train.train_and_evaluate(config, path)  # Builds the dataset on its first run.
    return path


def _image_path(root, case: str) -> str:
    path = root / 'images' / (case if case == 'ct_dicom' else f'{case}.nii.gz')
    return str(path)


def test_every_case_written_aligned_and_scored_corrupt_skipped(root, workdir, tmp_path):
    broken = tmp_path / 'broken.nii.gz'
    broken.write_bytes(b'\x1f\x8bnot a gzip stream')
    cases = [(_image_path(root, c), str(root / 'labels' / f'{c}.nii.gz')) for c in CASES]
    cases.insert(1, (str(broken), str(root / 'labels' / 'axial_a.nii.gz')))
    output = tmp_path / 'out'
    result = predict_volume.predict_volumes(workdir, cases, str(output), batch_size=4)

    assert [path for path, _ in result.failed] == [str(broken)]
    assert sorted(result.written) == sorted(CASES)
    for case in CASES:
        written = nibabel.load(str(output / f'{case}_labels.nii.gz'))
        image = volume_io.load_volume(_image_path(root, case))
        if case == 'ct_dicom':
            # The affine built from the series (to a NIfTI header's float32 precision).
            np.testing.assert_allclose(written.affine, image.native_affine, atol=1e-5)
            assert written.shape == (16, 16, 6)
        else:
            source = nibabel.load(_image_path(root, case))
            np.testing.assert_array_equal(written.affine, source.affine)
            assert written.shape == source.shape
        ids = np.asanyarray(written.dataobj)
        assert ids.dtype == np.uint8 and ids.max() < NUM_CLASSES
        volume_io.check_aligned(image, volume_io.load_volume(str(output / f'{case}_labels.nii.gz')))
    assert nibabel.load(str(output / 'oblique_labels.nii.gz')).shape == (16, 32, 6)

    with open(output / predict_volume.METRICS_FILE) as f:
        saved = json.load(f)
    assert sorted(saved['cases']) == sorted(CASES)
    for scores in [*saved['cases'].values(), saved[predict_volume.OVERALL]]:
        assert len(scores['per_class_dice']) == NUM_CLASSES
        values = [*scores['per_class_dice'], scores['mean_iou']]
        assert all(0.0 <= v <= 1.0 for v in values if v is not None)
    assert saved[predict_volume.OVERALL]['mean_iou'] == pytest.approx(
        result.scores[predict_volume.OVERALL]['mean_iou']
    )


def test_same_slices_as_training(root, workdir):
    config = workdir_files.read_config(workdir)
    builder = builders.get_builder(config.dataset)
    example = next(e for e in builder.as_data_source('validation') if e['slice_index'] == 3)
    image = volume_io.load_volume(_image_path(root, 'oblique'))
    settings = predict_volume.slice_settings(config.dataset)
    quantised, low, high = volumes.quantize_volume(image.data, settings)
    np.testing.assert_array_equal(
        volume_io.slice_image(quantised, settings.slice_axis, 3), example['image'][..., 0]
    )
    assert low == pytest.approx(example['intensity_offset'])


def test_validation_split_from_the_command_line_entry(root, workdir, tmp_path, capsys):
    output = tmp_path / 'val'
    assert predict_volume.run(workdir, None, str(output), split='validation') == 0
    assert sorted(os.listdir(output)) == ['oblique_labels.nii.gz', 'volume_metrics.json']
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == '| case | Dice background | Dice low | Dice high | mean IoU |'
    assert [row.split(' | ')[0] for row in table[2:]] == ['| oblique', '| overall']

    # A folder of cases with a label folder lacking one case: that case is skipped.
    inputs, labels = tmp_path / 'in', tmp_path / 'labels'
    inputs.mkdir()
    labels.mkdir()
    shutil.copy(_image_path(root, 'axial_a'), inputs)
    shutil.copytree(_image_path(root, 'ct_dicom'), inputs / 'ct_dicom')
    shutil.copy(root / 'labels' / 'axial_a.nii.gz', labels)
    assert predict_volume.find_volumes(str(inputs / 'ct_dicom')) == [str(inputs / 'ct_dicom')]
    output = tmp_path / 'folder'
    assert predict_volume.run(workdir, str(inputs), str(output), labels_dir=str(labels)) == 0
    with open(output / predict_volume.METRICS_FILE) as f:
        assert list(json.load(f)['cases']) == ['axial_a']
    assert not (output / 'ct_dicom_labels.nii.gz').exists()


def test_per_volume_scores_are_metrics_scores_of_each_volume_and_of_the_sum():
    rng = np.random.default_rng(3)
    truth = {case: rng.integers(0, 3, (8, 8, 4)) for case in ('a', 'b')}
    truth['a'][0, 0, 0] = 255  # Ignored, whatever is predicted there.
    predicted = {
        'a': np.where(truth['a'] == 255, 1, truth['a']),
        'b': rng.integers(0, 3, (8, 8, 4)),
    }
    confusions = {
        case: predict_volume.volume_confusion(truth[case], predicted[case], 3, 255)
        for case in truth
    }
    summary = predict_volume.summarize(confusions)
    assert list(summary) == ['a', 'b', predict_volume.OVERALL]
    for case in truth:
        expected = np.zeros((3, 3), np.int64)
        valid = truth[case] != 255
        np.add.at(expected, (truth[case][valid], predicted[case][valid]), 1)
        np.testing.assert_array_equal(confusions[case], expected)
        assert summary[case] == metrics.scores(expected)
    assert summary[predict_volume.OVERALL] == metrics.scores(confusions['a'] + confusions['b'])
    # A perfect prediction: Dice 1 for every present class, undefined for an absent one.
    assert summary['a']['per_class_dice'] == [1.0, 1.0, 1.0]
    assert summary['a']['mean_iou'] == 1.0
    absent = predict_volume.summarize(
        {'c': predict_volume.volume_confusion(np.zeros(5), np.zeros(5), 2, 255)}
    )
    assert absent['c']['per_class_dice'][0] == 1.0 and np.isnan(absent['c']['per_class_dice'][1])
    assert '| c | 1.0000 | - | 1.0000 |' in predict_volume.markdown_table(absent, ['bg', 'fg'])
