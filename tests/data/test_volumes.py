"""Tests of medical volume I/O (NIfTI, DICOM series), intensity handling and `volumes`."""

import os
import sys
import warnings

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

nibabel = pytest.importorskip('nibabel')
pydicom = pytest.importorskip('pydicom')

from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from configs import default  # noqa: E402
from fcn_unet_jax import errors  # noqa: E402
from fcn_unet_jax.data import builders, volume_io  # noqa: E402
from fcn_unet_jax.data.builders import folder, volumes  # noqa: E402

_SHAPE = (16, 16, 6)


def _oblique_affine() -> np.ndarray:
    """A scan stored LPI-ish, rotated 30 degrees about z, with anisotropic voxels."""
    angle = np.deg2rad(30)
    rotation = np.array(
        [
            [np.cos(angle), -np.sin(angle), 0.0],
            [np.sin(angle), np.cos(angle), 0.0],
            [0.0, 0.0, 1.0],
        ]
    )
    affine = np.eye(4)
    # Voxel axes: -x, -y (LP like DICOM), -z, scaled 0.8 / 0.9 / 2.5 mm.
    affine[:3, :3] = rotation @ np.diag([-0.8, -0.9, -2.5])
    affine[:3, 3] = [40.0, -12.5, 30.0]
    return affine


def _save_nifti(path, data: np.ndarray, affine: np.ndarray) -> None:
    image = nibabel.Nifti1Image(data, affine)
    image.set_qform(affine, code='scanner')
    image.set_sform(affine, code='scanner')
    nibabel.save(image, str(path))


def _write_dicom(
    path,
    pixels: np.ndarray,
    position,
    instance: int,
    series_uid: str,
    slope: float = 2.0,
    intercept: float = -1024.0,
    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    with_pixels: bool = True,
) -> None:
    """Writes one CT Image Storage slice (explicit VR little endian, signed 16 bit)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b'\0' * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = 'CT'
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = 'MONOCHROME2'
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [0.7, 0.6]
    ds.SliceThickness = 2.5
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if with_pixels:
        ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def _dicom_series(folder_path, raw: np.ndarray, seed: int = 0) -> tuple[str, list[float]]:
    """Writes `raw` (rows, columns, slices) as an axial series, out of order on disk.

    Slice k lies at z = 10 + 2.5 k; file names and InstanceNumbers are two unrelated
    shufflings of k. Returns the series UID and the z of each slice k.
    """
    os.makedirs(folder_path)
    uid = generate_uid()
    rng = np.random.default_rng(seed)
    names, instances = rng.permutation(raw.shape[2]), rng.permutation(raw.shape[2])
    z = [10.0 + 2.5 * k for k in range(raw.shape[2])]
    for k in range(raw.shape[2]):
        _write_dicom(
            folder_path / f'IM{names[k]:03d}.dcm',
            raw[:, :, k],
            (-5.0, 7.0, z[k]),
            int(instances[k]) + 1,
            uid,
        )
    return uid, z


def test_normalize_intensity_modes_and_errors():
    ct = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    np.testing.assert_allclose(
        volume_io.normalize_intensity(ct, 'ct_window', level=40, width=400),
        [0.0, 0.0, 0.5, 1.0, 1.0],
    )
    mri = np.random.default_rng(0).normal(100.0, 10.0, size=(16, 16, 6)).astype(np.float32)
    mri[0, 0, 0] = 1e6  # One bright artefact must not squash the rest.
    z = volume_io.normalize_intensity(mri, 'percentile_zscore', percentiles=(0.5, 99.5))
    assert z.dtype == np.float32
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3
    assert z.max() < 4 and z[0, 0, 0] == z.max()
    np.testing.assert_array_equal(volume_io.normalize_intensity(mri, 'none'), mri)
    assert not volume_io.normalize_intensity(np.full(4, 7.0), 'percentile_zscore').any()
    with pytest.raises(ValueError, match='Unknown intensity mode'):
        volume_io.normalize_intensity(ct, 'minmax')
    with pytest.raises(ValueError, match='width'):
        volume_io.normalize_intensity(ct, 'ct_window', level=40, width=0)
    with pytest.raises(ValueError, match='no parameter'):
        volume_io.normalize_intensity(ct, 'none', level=40)


def test_slice_image_is_upright_and_inverted_by_insert_slice():
    data = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    image = volume_io.slice_image(data, 2, 1)
    # Axial slice of RAS data: columns follow x (R), rows go down from the most anterior y.
    assert image.shape == (3, 2)
    assert image[0, 0] == data[0, 2, 1] and image[2, 1] == data[1, 0, 1]
    for axis in range(3):
        rebuilt = np.zeros_like(data)
        for index in range(data.shape[axis]):
            volume_io.insert_slice(rebuilt, axis, index, volume_io.slice_image(data, axis, index))
        np.testing.assert_array_equal(rebuilt, data)


def test_oblique_nifti_canonical_order_and_exact_label_round_trip(tmp_path):
    affine = _oblique_affine()
    native = np.random.default_rng(1).permutation(np.prod(_SHAPE)).reshape(_SHAPE)
    _save_nifti(tmp_path / 'ct.nii.gz', native.astype(np.int32), affine)
    volume = volume_io.load_volume(str(tmp_path / 'ct.nii.gz'))
    assert nibabel.aff2axcodes(volume.affine) == ('R', 'A', 'S')
    assert volume.axcodes == nibabel.aff2axcodes(affine)
    # Every voxel keeps its world position: find each canonical voxel's value in the file.
    where = np.argsort(native.ravel())
    canonical_index = np.indices(volume.data.shape).reshape(3, -1)
    native_index = np.stack(np.unravel_index(where[volume.data.ravel()], _SHAPE))
    homogeneous = np.ones((1, canonical_index.shape[1]))
    np.testing.assert_allclose(
        volume.affine @ np.vstack([canonical_index, homogeneous]),
        affine @ np.vstack([native_index, homogeneous]),
        atol=1e-4,
    )

    labels = (volume.data % 3).astype(np.uint8)
    volume_io.write_label_volume(labels, volume, str(tmp_path / 'ct_seg.nii.gz'))
    written = nibabel.load(str(tmp_path / 'ct_seg.nii.gz'))
    # Same grid as the image file, bit for bit, and the labels in the file's voxel order.
    np.testing.assert_array_equal(written.affine, nibabel.load(tmp_path / 'ct.nii.gz').affine)
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), native % 3)
    reread = volume_io.load_volume(str(tmp_path / 'ct_seg.nii.gz'))
    np.testing.assert_array_equal(reread.data, labels)
    np.testing.assert_array_equal(reread.affine, volume.affine)
    volume_io.check_aligned(volume, reread)


def test_label_in_another_voxel_order_stays_aligned(tmp_path):
    affine = _oblique_affine()
    native = np.random.default_rng(2).integers(-100, 100, size=_SHAPE).astype(np.int16)
    _save_nifti(tmp_path / 'image.nii.gz', native, affine)
    # The same grid stored with axis 0 reversed: the affine moves its origin to the far end.
    flipped_affine = affine @ np.array(
        [[-1, 0, 0, _SHAPE[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float
    )
    _save_nifti(tmp_path / 'label.nii.gz', (native[::-1] > 0).astype(np.uint8), flipped_affine)
    image = volume_io.load_volume(str(tmp_path / 'image.nii.gz'))
    label = volume_io.load_volume(str(tmp_path / 'label.nii.gz'))
    assert image.axcodes != label.axcodes
    volume_io.check_aligned(image, label)
    np.testing.assert_array_equal(label.data, image.data > 0)

    # A tool that dropped the rotation and origin: same shape, another place in the world.
    lost = np.diag([0.8, 0.9, 2.5, 1.0])
    _save_nifti(tmp_path / 'wrong.nii.gz', (native > 0).astype(np.uint8), lost)
    wrong = volume_io.load_volume(str(tmp_path / 'wrong.nii.gz'))
    with pytest.raises(ValueError, match='affine') as error:
        volume_io.check_aligned(image, wrong)
    assert 'wrong.nii.gz' in str(error.value) and 'image.nii.gz' in str(error.value)
    _save_nifti(tmp_path / 'small.nii.gz', np.zeros((16, 16, 5), np.uint8), affine)
    with pytest.raises(ValueError, match='shape') as error:
        volume_io.check_aligned(image, volume_io.load_volume(str(tmp_path / 'small.nii.gz')))
    assert 'small.nii.gz' in str(error.value) and 'image.nii.gz' in str(error.value)


def test_dicom_series_sorted_by_position_rescaled_and_placed(tmp_path):
    raw = np.random.default_rng(3).integers(0, 2000, size=(10, 12, 5)).astype(np.int16)
    _, z = _dicom_series(tmp_path / 'series', raw)
    volume = volume_io.load_volume(str(tmp_path / 'series'))
    assert volume.data.dtype == np.float32
    order = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in volume.header['files']]
    assert order == sorted(order, reverse=True) or order == sorted(order)
    assert nibabel.aff2axcodes(volume.affine) == ('R', 'A', 'S')
    # Independent geometry: RAS (x, y, z) -> LPS -> (row, column, slice) of `raw`.
    index = np.indices(volume.data.shape).reshape(3, -1)
    world = (volume.affine @ np.vstack([index, np.ones((1, index.shape[1]))]))[:3]
    lps = world * np.array([[-1.0], [-1.0], [1.0]])
    column = np.round((lps[0] + 5.0) / 0.6).astype(int)
    row = np.round((lps[1] - 7.0) / 0.7).astype(int)
    slice_ = np.round((lps[2] - z[0]) / 2.5).astype(int)
    expected = raw[row, column, slice_].astype(np.float32) * 2.0 - 1024.0
    np.testing.assert_array_equal(volume.data.ravel(), expected)
    # nibabel's own DICOM wrapper agrees on the in-plane axes and the first voxel (in LPS).
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)  # nibabel calls its DICOM code unstable.
        from nibabel.nicom import dicomwrappers
    wrapper = dicomwrappers.wrapper_from_file(volume.header['files'][0])
    np.testing.assert_allclose(
        np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.native_affine[:, [0, 1, 3]],
        wrapper.affine[:, [0, 1, 3]],
        atol=1e-6,
    )

    labels = (volume.data > 0).astype(np.uint8)
    volume_io.write_label_volume(labels, volume, str(tmp_path / 'seg.nii'))
    reread = volume_io.load_volume(str(tmp_path / 'seg.nii'))
    volume_io.check_aligned(volume, reread)
    np.testing.assert_array_equal(reread.data, labels)


def test_dicom_errors_name_the_folder_or_file(tmp_path):
    pixels = np.zeros((4, 4), np.int16)
    uids = [generate_uid(), generate_uid()]
    os.makedirs(tmp_path / 'mixed')
    for k, uid in enumerate(uids):
        _write_dicom(tmp_path / 'mixed' / f'{k}.dcm', pixels, (0, 0, k), k + 1, uid)
    with pytest.raises(ValueError, match='2 series') as error:
        volume_io.load_volume(str(tmp_path / 'mixed'))
    assert str(tmp_path / 'mixed') in str(error.value)
    assert all(uid in str(error.value) for uid in uids)

    os.makedirs(tmp_path / 'nopixels')
    _write_dicom(tmp_path / 'nopixels' / 'a.dcm', pixels, (0, 0, 0), 1, uids[0])
    _write_dicom(tmp_path / 'nopixels' / 'b.dcm', pixels, (0, 0, 1), 2, uids[0], with_pixels=False)
    with pytest.raises(ValueError, match='no pixel data') as error:
        volume_io.load_volume(str(tmp_path / 'nopixels'))
    assert str(tmp_path / 'nopixels' / 'b.dcm') in str(error.value)

    os.makedirs(tmp_path / 'gap')
    for k, z in enumerate([0.0, 2.5, 7.5]):  # The slice at 5.0 is missing.
        _write_dicom(tmp_path / 'gap' / f'{k}.dcm', pixels, (0, 0, z), k + 1, uids[0])
    with pytest.raises(ValueError, match='irregular slice spacing') as error:
        volume_io.load_volume(str(tmp_path / 'gap'))
    assert str(tmp_path / 'gap') in str(error.value)

    (tmp_path / 'nopixels' / 'b.dcm').write_bytes(b'not a dicom file')
    with pytest.raises(ValueError, match='Cannot read DICOM') as error:
        volume_io.load_volume(str(tmp_path / 'nopixels'))
    assert str(tmp_path / 'nopixels' / 'b.dcm') in str(error.value)
    (tmp_path / 'broken.nii.gz').write_bytes(b'garbage')
    with pytest.raises(ValueError, match='Cannot read NIfTI') as error:
        volume_io.load_volume(str(tmp_path / 'broken.nii.gz'))
    assert 'broken.nii.gz' in str(error.value)


def test_missing_extra_names_it(tmp_path, monkeypatch):
    _save_nifti(tmp_path / 'a.nii', np.zeros((2, 2, 2), np.uint8), np.eye(4))
    monkeypatch.setitem(sys.modules, 'nibabel', None)  # Makes `import nibabel` fail.
    with pytest.raises(ImportError, match=r"pip install -e '\.\[medical\]'"):
        volume_io.load_volume(str(tmp_path / 'a.nii'))


def _foreground_labels(seed: int, shape=_SHAPE) -> np.ndarray:
    """Labels in {0, 1, 2} on slices z >= 2 only, with some ignore voxels."""
    labels = np.zeros(shape, np.uint8)
    rng = np.random.default_rng(seed)
    labels[4:12, 3:10, 2:] = rng.integers(1, 3, size=(8, 7, shape[2] - 2))
    labels[0, 0, 0] = 255  # Ignore alone does not make a slice non-empty.
    return labels


def _volume_root(root) -> dict[str, tuple[volume_io.Volume, np.ndarray]]:
    """Writes 5 NIfTI cases and 1 DICOM case; returns case -> (image volume, labels)."""
    os.makedirs(root / 'images')
    os.makedirs(root / 'labels')
    cases = {}
    for i in range(5):
        case = f'case{i}'
        data = np.random.default_rng(i).normal(0.0, 100.0, size=_SHAPE).astype(np.float32)
        _save_nifti(root / 'images' / f'{case}.nii.gz', data, _oblique_affine())
        image = volume_io.load_volume(str(root / 'images' / f'{case}.nii.gz'))
        labels = _foreground_labels(i)
        volume_io.write_label_volume(labels, image, str(root / 'labels' / f'{case}.nii.gz'))
        cases[case] = image, labels
    raw = np.random.default_rng(9).integers(0, 2000, size=(16, 16, 6)).astype(np.int16)
    _dicom_series(root / 'images' / 'dicom', raw)
    image = volume_io.load_volume(str(root / 'images' / 'dicom'))
    labels = _foreground_labels(9, image.data.shape)
    volume_io.write_label_volume(labels, image, str(root / 'labels' / 'dicom.nii.gz'))
    cases['dicom'] = image, labels
    return cases


def _dataset_config(root, data_dir, **fields) -> ml_collections.ConfigDict:
    dataset = default.get_config().dataset
    dataset.update({'name': 'volumes', 'data_dir': str(data_dir), 'volume_root': str(root)})
    dataset.update(fields)
    return dataset


def test_builder_slices_by_volume_skips_empty_slices_and_recovers_intensities(tmp_path):
    root = tmp_path / 'scans'
    cases = _volume_root(root)
    config = _dataset_config(
        root, tmp_path / 'tfds', volume_val_fraction=0.5, skip_empty_slices=True, intensity='none'
    )
    builder = builders.prepare(config)
    examples = {split: list(builder.as_data_source(split)) for split in builder.info.splits}
    expected_val = {c for c in cases if folder.stem_fraction(c) < 0.5}
    assert 0 < len(expected_val) < len(cases)  # Both splits are exercised.
    ids = {split: {e['volume_id'].decode() for e in items} for split, items in examples.items()}
    assert ids['validation'] == expected_val
    assert ids['train'] == set(cases) - expected_val
    # Slices 0 and 1 of every volume have no foreground (only the ignore voxel).
    assert sum(len(items) for items in examples.values()) == len(cases) * (_SHAPE[2] - 2)
    for example in examples['train'] + examples['validation']:
        case, index = example['volume_id'].decode(), int(example['slice_index'])
        assert example['file_name'].decode() == f'{case}_{index:04d}'
        assert index >= 2
        image, labels = cases[case]
        np.testing.assert_array_equal(
            example['segmentation_mask'][..., 0], volume_io.slice_image(labels, 2, index)
        )
        assert example['image'].shape == (*labels.shape[1::-1], 3)
        assert (example['image'] == example['image'][..., :1]).all()
        # 'none' quantises the raw range; offset + scale * pixel gives the raw value back.
        restored = example['intensity_offset'] + example['intensity_scale'] * example['image'][
            ..., 0
        ].astype(np.float32)
        np.testing.assert_allclose(
            restored,
            volume_io.slice_image(image.data, 2, index),
            atol=example['intensity_scale'] / 2 + 1e-3,
        )
    metadata = builder.info.metadata
    assert metadata['class_names'] == ['class_0', 'class_1', 'class_2']
    assert metadata['ignore_label'] == 255
    assert metadata['slice_axis'] == 2 and metadata['intensity'] == 'none'
    assert metadata['skip_empty_slices'] is True
    assert builder.builder_config.name.startswith('scans_')
    other = volumes.config_from_dataset(
        ml_collections.ConfigDict(config.to_dict() | {'slice_axis': 0})
    )
    assert other.name != builder.builder_config.name


def test_split_lists_and_data_errors(tmp_path):
    root = tmp_path / 'root'
    cases = _volume_root(root)
    os.makedirs(root / 'splits')
    (root / 'splits' / 'train.txt').write_text('case0\ncase1\ndicom\n')
    (root / 'splits' / 'val.txt').write_text('case2\n')
    plan = volumes.plan_splits(str(root), 0.5)
    assert [c for c, _, _ in plan['train']] == ['case0', 'case1', 'dicom']
    assert [c for c, _, _ in plan['validation']] == ['case2']
    (root / 'splits' / 'val.txt').write_text('case2\ncase1\n')
    with pytest.raises(ValueError, match="'case1' is listed in both"):
        volumes.plan_splits(str(root), 0.5)
    os.remove(root / 'splits' / 'val.txt')
    with pytest.raises(ValueError, match='both train.txt and val.txt'):
        volumes.plan_splits(str(root), 0.5)
    os.remove(root / 'splits' / 'train.txt')

    os.remove(root / 'labels' / 'case3.nii.gz')
    with pytest.raises(ValueError, match='without a matching') as error:
        volumes.plan_splits(str(root), 0.5)
    assert str(root / 'images' / 'case3.nii.gz') in str(error.value)
    os.remove(root / 'images' / 'case3.nii.gz')

    (root / 'classes.txt').write_text('background\nliver\n')  # Labels go up to 2.
    with pytest.raises(ValueError, match=r'label\(s\) \[2\]'):
        builders.prepare(_dataset_config(root, tmp_path / 'tfds'))
    os.remove(root / 'classes.txt')
    image, _ = cases['case4']
    _save_nifti(root / 'labels' / 'case4.nii.gz', np.zeros((16, 16, 5), np.uint8), np.eye(4))
    with pytest.raises(ValueError, match='does not match the shape') as error:
        builders.prepare(_dataset_config(root, tmp_path / 'tfds'))
    assert 'case4.nii.gz' in str(error.value) and image.source in str(error.value)
    with pytest.raises(ValueError, match='slice_axis'):
        builders.get_builder(_dataset_config(root, tmp_path / 'tfds', slice_axis=3))
    with pytest.raises(ValueError, match='volume_root'):
        builders.get_builder(_dataset_config(root, tmp_path / 'tfds', volume_root=None))
    assert isinstance(
        builders.get_builder(_dataset_config(root, tmp_path)), tfds.core.DatasetBuilder
    )


def test_a_volume_split_without_cases_is_an_error_with_the_fix(tmp_path):
    root = tmp_path / 'root'
    for sub in ('images', 'labels'):
        os.makedirs(root / sub)
        (root / sub / 'only.nii.gz').touch()  # Splitting reads no volume.
    # Case 'only' hashes to 0.97: the default fraction leaves validation empty, 0.99 train.
    for fraction, split in ((0.2, 'validation'), (0.99, 'train')):
        with pytest.raises(errors.UserError, match=f"split '{split}' would have no case") as error:
            volumes.plan_splits(str(root), fraction)
    assert 'one case cannot make two splits' in error.value.hint
    assert set(volumes.plan_splits(str(root), 0.0)) == {'train'}  # 0: no validation split.
