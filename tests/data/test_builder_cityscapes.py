"""Tests of `cityscapes_trainids` on tiny zips / folders in the official Cityscapes layout."""

import io
import os
import zipfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fcn_unet_jax.data import builders
from fcn_unet_jax.data.builders import cityscapes

_H, _W = 5, 7  # 35 pixels: room for every labelIds value 0..33 in one mask.
# The trainIds of cityscapesScripts' labels.py, written out independently of the builder.
EXPECTED = dict.fromkeys(range(-1, 34), 255) | {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
SPLITS = {'train': {'aachen': 2, 'bochum': 1}, 'val': {'frankfurt': 2}}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, 'PNG')
    return buffer.getvalue()


def label_ids(index: int) -> np.ndarray:
    """Every id 0..33 once, rolled per example, plus one pixel of 255."""
    values = np.roll(np.append(np.arange(34), 255), index).astype(np.uint8)
    return values.reshape(_H, _W)


def cityscapes_files() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Returns (leftImg8bit zip members, gtFine zip members), with README files beside."""
    images = {'README': b'readme', 'license.txt': b'license'}
    labels = {'README': b'readme', 'license.txt': b'license'}
    index = 0
    for split, cities in SPLITS.items():
        for city, count in cities.items():
            for frame in range(count):
                stem = f'{city}_{frame:06d}_000019'
                image = np.full((_H, _W, 3), index, np.uint8)
                images[f'leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png'] = _png(image)
                label_dir = f'gtFine/{split}/{city}/{stem}_gtFine_'
                labels[label_dir + 'labelIds.png'] = _png(label_ids(index))
                labels[label_dir + 'color.png'] = _png(image)
                labels[label_dir + 'polygons.json'] = b'{}'
                index += 1
    return images, labels


def _write_zip(path: str, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, 'w') as archive:
        for name, data in files.items():
            archive.writestr(name, data)


def _build(tmp_path, manual_dir) -> dict[str, dict[str, dict]]:
    builder = builders.prepare(
        ml_collections.ConfigDict(
            {
                'name': 'cityscapes_trainids',
                'data_dir': str(tmp_path / 'tfds'),
                'manual_dir': str(manual_dir),
            }
        )
    )
    assert len(builder.info.metadata['class_names']) == 19
    assert builder.info.metadata['palette'][0] == [128, 64, 128]
    return {
        split: {e['file_name'].decode(): e for e in builder.as_data_source(split)}
        for split in builder.info.splits
    }


def test_every_id_maps_to_its_train_id():
    assert cityscapes.ID_TO_TRAIN_ID.keys() == EXPECTED.keys()
    for label_id, train_id in EXPECTED.items():
        table = cityscapes.ID_TO_TRAIN_ID[label_id]
        assert (table if table >= 0 else 255) == train_id, label_id
        # -1 is stored as 255 in a uint8 image, where it must stay ignored.
        pixel = np.array([[label_id % 256]], np.uint8)
        assert cityscapes.to_train_ids(pixel)[0, 0] == train_id, label_id


def _check(examples: dict[str, dict[str, dict]]) -> None:
    assert {split: len(e) for split, e in examples.items()} == {'train': 3, 'validation': 2}
    for split_examples in examples.values():
        for example in split_examples.values():
            index = int(example['image'][0, 0, 0])
            expected = np.vectorize(lambda v: EXPECTED.get(v, 255))(label_ids(index))
            np.testing.assert_array_equal(example['segmentation_mask'][..., 0], expected)
    assert 'aachen_000001_000019' in examples['train']


def test_from_the_zips(tmp_path):
    manual_dir = tmp_path / 'manual'
    os.makedirs(manual_dir)
    images, labels = cityscapes_files()
    _write_zip(str(manual_dir / 'leftImg8bit_trainvaltest.zip'), images)
    _write_zip(str(manual_dir / 'gtFine_trainvaltest.zip'), labels)
    _check(_build(tmp_path, manual_dir))


def test_from_extracted_folders(tmp_path):
    manual_dir = tmp_path / 'manual'
    images, labels = cityscapes_files()
    for name, data in (images | labels).items():
        path = manual_dir / 'cityscapes' / name
        os.makedirs(path.parent, exist_ok=True)
        path.write_bytes(data)
    _check(_build(tmp_path, manual_dir))


def test_missing_zip_is_named(tmp_path):
    manual_dir = tmp_path / 'manual'
    os.makedirs(manual_dir)
    _write_zip(str(manual_dir / 'leftImg8bit_trainvaltest.zip'), cityscapes_files()[0])
    with pytest.raises(AssertionError, match='gtFine_trainvaltest.zip') as error:
        _build(tmp_path, manual_dir)
    assert str(manual_dir) in str(error.value)
    assert 'leftImg8bit_trainvaltest.zip,' not in str(error.value)
