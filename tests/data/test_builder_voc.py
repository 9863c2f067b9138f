"""Tests of `voc_segmentation` on tiny archives in the official VOC2012, VOC2011 and SBD layouts.

Synthetic ids: VOC2012 seg train a1..a3, val v1..v4; VOC2011 seg val v1..v3; SBD train
s1, s2, a1, v1 and SBD val s3, v2, a2. So seg11valid = {v2, v3} and train_aug =
{s1, s2, s3, a1, a2, a3}, with a1..a3 labelled from the VOC PNGs.
"""

import io
import os
import tarfile

import ml_collections
import numpy as np
import pytest
import scipy.io
from PIL import Image

from fcn_unet_jax.data import builders
from fcn_unet_jax.data.builders import common, voc_segmentation

_H, _W = 6, 10
VOC_TRAIN = ['a1', 'a2', 'a3']
VOC_VAL = ['v1', 'v2', 'v3', 'v4']
VOC2011_VAL = ['v1', 'v2', 'v3']
SBD_TRAIN = ['s1', 's2', 'a1', 'v1']
SBD_VAL = ['s3', 'v2', 'a2']


def _seed(image_id: str) -> int:
    return sum(ord(c) * 31**i for i, c in enumerate(image_id))


def voc_mask(image_id: str) -> np.ndarray:
    """The VOC PNG label of an id: random classes with a 255 boundary row."""
    rng = np.random.default_rng(_seed(image_id))
    mask = rng.integers(0, 21, size=(_H, _W), dtype=np.uint8)
    mask[2] = common.IGNORE_LABEL
    return mask


def sbd_mask(image_id: str) -> np.ndarray:
    """The SBD label of an id: differs from its VOC label (no 255; SBD has no boundary)."""
    return np.full((_H, _W), 1 + _seed(image_id) % 20, dtype=np.uint8)


def _jpeg(image_id: str) -> bytes:
    rng = np.random.default_rng(_seed(image_id) + 1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (_H, _W, 3), dtype=np.uint8)).save(buffer, 'JPEG')
    return buffer.getvalue()


def _palette_png(mask: np.ndarray) -> bytes:
    image = Image.fromarray(mask, mode='P')
    image.putpalette(np.asarray(common.voc_palette(256), np.uint8).ravel().tolist())
    buffer = io.BytesIO()
    image.save(buffer, 'PNG')
    return buffer.getvalue()


def _mat(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    gt = {'Segmentation': mask, 'Boundaries': np.zeros(1), 'CategoriesPresent': np.ones(1)}
    scipy.io.savemat(buffer, {'GTcls': gt})
    return buffer.getvalue()


def _ids(ids: list[str]) -> bytes:
    return ''.join(f'{i}\n' for i in ids).encode()


def voc2012_files() -> dict[str, bytes]:
    root = 'VOCdevkit/VOC2012/'
    files = {
        root + 'ImageSets/Segmentation/train.txt': _ids(VOC_TRAIN),
        root + 'ImageSets/Segmentation/val.txt': _ids(VOC_VAL),
        root + 'ImageSets/Segmentation/trainval.txt': _ids(VOC_TRAIN + VOC_VAL),
        root + 'JPEGImages/2008_999999.jpg': _jpeg('detection only'),
    }
    for i in VOC_TRAIN + VOC_VAL:
        files[root + f'JPEGImages/{i}.jpg'] = _jpeg(i)
        files[root + f'SegmentationClass/{i}.png'] = _palette_png(voc_mask(i))
    return files


def voc2011_files() -> dict[str, bytes]:
    root = 'TrainVal/VOCdevkit/VOC2011/'
    return {
        root + 'ImageSets/Main/val.txt': _ids(['unrelated']),
        root + 'ImageSets/Segmentation/val.txt': _ids(VOC2011_VAL),
        root + 'JPEGImages/v1.jpg': _jpeg('v1'),
    }


def sbd_files() -> dict[str, bytes]:
    root = 'benchmark_RELEASE/dataset/'
    files = {root + 'train.txt': _ids(SBD_TRAIN), root + 'val.txt': _ids(SBD_VAL)}
    for i in SBD_TRAIN + SBD_VAL:
        files[root + f'img/{i}.jpg'] = _jpeg(i)
        files[root + f'cls/{i}.mat'] = _mat(sbd_mask(i))
    return files


def write_tar(path: str, files: dict[str, bytes], mode: str = 'w') -> None:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_tree(root: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data)


def _archives(manual_dir) -> None:
    os.makedirs(manual_dir, exist_ok=True)
    write_tar(os.path.join(manual_dir, 'VOCtrainval_11-May-2012.tar'), voc2012_files())
    write_tar(os.path.join(manual_dir, 'VOCtrainval_25-May-2011.tar'), voc2011_files())
    write_tar(os.path.join(manual_dir, 'benchmark.tgz'), sbd_files(), mode='w:gz')


def _build(config: str, tmp_path, manual_dir) -> dict[str, dict[str, dict]]:
    builder = builders.prepare(
        ml_collections.ConfigDict(
            {
                'name': f'voc_segmentation/{config}',
                'data_dir': str(tmp_path / 'tfds'),
                'manual_dir': str(manual_dir),
            }
        )
    )
    assert builder.info.metadata['class_names'][15] == 'person'
    assert len(builder.info.metadata['palette']) == 21
    return {
        split: {e['file_name'].decode(): e for e in builder.as_data_source(split)}
        for split in builder.info.splits
    }


def test_split_derivations():
    assert voc_segmentation.seg11valid_ids(VOC_VAL, VOC2011_VAL, SBD_TRAIN) == ['v2', 'v3']
    assert voc_segmentation.train_aug_ids(SBD_TRAIN, SBD_VAL, VOC_TRAIN, VOC_VAL) == [
        'a1',
        'a2',
        'a3',
        's1',
        's2',
        's3',
    ]


def test_voc2012_from_the_tar(tmp_path):
    _archives(tmp_path / 'manual')
    examples = _build('voc2012', tmp_path, tmp_path / 'manual')
    assert sorted(examples['train']) == VOC_TRAIN
    assert sorted(examples['validation']) == VOC_VAL
    for split_examples in examples.values():
        for image_id, example in split_examples.items():
            np.testing.assert_array_equal(example['segmentation_mask'][..., 0], voc_mask(image_id))
            assert example['image'].shape == (_H, _W, 3)
    assert (examples['train']['a1']['segmentation_mask'] == 255).sum() == _W


@pytest.mark.parametrize('voc2011', ['archive', 'list_only_folder'])
def test_sbd_fcn(tmp_path, voc2011):
    manual_dir = tmp_path / 'manual'
    _archives(manual_dir)
    if voc2011 == 'list_only_folder':
        # Only the list is read from VOC2011, so its extracted val.txt alone is enough.
        os.remove(manual_dir / 'VOCtrainval_25-May-2011.tar')
        name = 'TrainVal/VOCdevkit/VOC2011/ImageSets/Segmentation/val.txt'
        write_tree(str(manual_dir), {name: voc2011_files()[name]})
    examples = _build('sbd_fcn', tmp_path, manual_dir)
    assert sorted(examples['train']) == sorted(SBD_TRAIN)
    assert sorted(examples['validation']) == ['v2', 'v3']
    for image_id, example in examples['train'].items():
        np.testing.assert_array_equal(example['segmentation_mask'][..., 0], sbd_mask(image_id))
    for image_id, example in examples['validation'].items():
        np.testing.assert_array_equal(example['segmentation_mask'][..., 0], voc_mask(image_id))


def test_train_aug_from_extracted_folders(tmp_path):
    manual_dir = tmp_path / 'manual'
    write_tree(str(manual_dir), voc2012_files())
    # SBD one level deeper, as left by extracting benchmark.tgz into a folder of its own.
    write_tree(str(manual_dir / 'benchmark'), sbd_files())
    examples = _build('train_aug', tmp_path, manual_dir)
    assert sorted(examples['train']) == ['a1', 'a2', 'a3', 's1', 's2', 's3']
    assert sorted(examples['validation']) == VOC_VAL
    for image_id, example in examples['train'].items():
        expected = voc_mask(image_id) if image_id in VOC_TRAIN else sbd_mask(image_id)
        np.testing.assert_array_equal(example['segmentation_mask'][..., 0], expected)


def test_missing_archives_name_the_files_and_the_manual_dir(tmp_path):
    manual_dir = tmp_path / 'manual'
    os.makedirs(manual_dir)
    write_tar(str(manual_dir / 'VOCtrainval_11-May-2012.tar'), voc2012_files())
    with pytest.raises(AssertionError) as error:
        _build('sbd_fcn', tmp_path, manual_dir)
    message = str(error.value)
    assert str(manual_dir) in message
    assert 'benchmark.tgz' in message and 'VOCtrainval_25-May-2011.tar' in message
    assert 'Missing in the manual dir' in message


def test_empty_manual_dir_gives_the_instructions(tmp_path):
    with pytest.raises(AssertionError, match='VOCtrainval_11-May-2012.tar'):
        _build('voc2012', tmp_path, tmp_path / 'nothing_here')
