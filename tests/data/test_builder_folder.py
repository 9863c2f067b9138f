"""Tests of the `folder` builder: both layouts, splits, class files and every data error.

Also: a split without examples is a build error, and without classes.txt the labels found
are reported and a far one flagged.
"""

import os
import re

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from fcn_unet_jax import errors
from fcn_unet_jax.data import builders
from fcn_unet_jax.data.builders import common, folder

RAW_BYTES = tfds.decode.DeserializeMethod.RAW_BYTES

_H, _W = 6, 8


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(_H, _W, 3), dtype=np.uint8)


def _mask(seed: int, num_classes: int) -> np.ndarray:
    mask = np.random.default_rng(seed).integers(0, num_classes, size=(_H, _W), dtype=np.uint8)
    mask[0, :2] = common.IGNORE_LABEL
    mask[1, 0] = num_classes - 1  # Every mask holds the largest label.
    return mask


def _save_palette_png(path: str, mask: np.ndarray) -> None:
    image = Image.fromarray(mask, mode='P')
    image.putpalette(np.asarray(common.voc_palette(256), np.uint8).ravel().tolist())
    image.save(path)


def _simple_root(root, stems, num_classes=3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Writes images/*.png + masks/*.png (alternately L and P masks); returns the arrays."""
    os.makedirs(root / 'images')
    os.makedirs(root / 'masks')
    data = {}
    for i, stem in enumerate(stems):
        image, mask = _image(i), _mask(i, num_classes)
        Image.fromarray(image).save(root / 'images' / f'{stem}.png')
        if i % 2:
            _save_palette_png(str(root / 'masks' / f'{stem}.png'), mask)
        else:
            Image.fromarray(mask, mode='L').save(root / 'masks' / f'{stem}.png')
        data[stem] = image, mask
    return data


def _dataset_config(root, data_dir, val_fraction=0.5) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            'name': 'folder',
            'data_dir': str(data_dir),
            'manual_dir': None,
            'folder_root': None if root is None else str(root),
            'folder_val_fraction': val_fraction,
        }
    )


def _read(builder) -> dict[str, dict[str, dict]]:
    # builders.prepare writes array_record, which the pipeline reads by index like this.
    return {
        split: {e['file_name'].decode(): e for e in builder.as_data_source(split)}
        for split in builder.info.splits
    }


def test_simple_layout_hash_split_and_classes_file(tmp_path):
    root = tmp_path / 'my data'
    stems = [f'img{i}' for i in range(10)]
    data = _simple_root(root, stems)
    (root / 'classes.txt').write_text('background\ncat 10 20 30\n\ntraffic light #ff8000\n')
    builder = builders.prepare(_dataset_config(root, tmp_path / 'tfds'))
    examples = _read(builder)
    expected_val = {s for s in stems if folder.stem_fraction(s) < 0.5}
    assert set(examples['validation']) == expected_val
    assert set(examples['train']) == set(stems) - expected_val
    for split_examples in examples.values():
        for stem, example in split_examples.items():
            np.testing.assert_array_equal(example['image'], data[stem][0])
            np.testing.assert_array_equal(example['segmentation_mask'][..., 0], data[stem][1])
            assert example['segmentation_mask'][0, 0, 0] == 255
    assert builder.info.metadata['class_names'] == ['background', 'cat', 'traffic light']
    assert builder.info.metadata['palette'] == [[0, 0, 0], [10, 20, 30], [255, 128, 0]]
    assert builder.info.metadata['ignore_label'] == 255
    assert re.fullmatch(r'my_data_[0-9a-f]{12}', builder.builder_config.name)


def test_config_name_separates_roots_and_contents_and_split_is_stable(tmp_path):
    _simple_root(tmp_path / 'a', ['x', 'y'])
    _simple_root(tmp_path / 'b', ['x', 'y'])
    name_a = folder.config_for_root(str(tmp_path / 'a')).name
    assert name_a != folder.config_for_root(str(tmp_path / 'b')).name
    assert name_a != folder.config_for_root(str(tmp_path / 'a'), val_fraction=0.2).name
    before = folder.plan_splits(str(tmp_path / 'a'), 0.5)
    Image.fromarray(_image(9)).save(tmp_path / 'a' / 'images' / 'z.png')
    Image.fromarray(_mask(9, 3)).save(tmp_path / 'a' / 'masks' / 'z.png')
    assert folder.config_for_root(str(tmp_path / 'a')).name != name_a
    after = folder.plan_splits(str(tmp_path / 'a'), 0.5)
    for split, items in before.items():
        assert set(items) <= set(after[split])


def test_split_lists_inferred_classes_and_image_modes(tmp_path):
    root = tmp_path / 'root'
    _simple_root(root, ['a', 'b', 'c', 'unlisted'], num_classes=6)
    rgba = np.dstack([_image(20), np.full((_H, _W), 7, np.uint8)])
    Image.fromarray(rgba, mode='RGBA').save(root / 'images' / 'a.png')
    gray = _image(21)[..., 0]
    os.remove(root / 'images' / 'b.png')
    Image.fromarray(gray, mode='L').save(root / 'images' / 'b.png')
    os.remove(root / 'images' / 'c.png')
    Image.fromarray(_image(22)).save(root / 'images' / 'c.jpg', quality=95)
    os.makedirs(root / 'splits')
    (root / 'splits' / 'train.txt').write_text('a\nb\n')
    (root / 'splits' / 'val.txt').write_text('c\n')
    config = _dataset_config(root, tmp_path / 'tfds')
    builder = builders.prepare(config)
    examples = _read(builder)
    assert set(examples['train']) == {'a', 'b'} and set(examples['validation']) == {'c'}
    np.testing.assert_array_equal(examples['train']['a']['image'], rgba[..., :3])
    np.testing.assert_array_equal(examples['train']['b']['image'], np.dstack([gray] * 3))
    # RGB JPEGs are stored as their original bytes, not re-encoded.
    raw = builder.as_data_source('validation', deserialize_method=RAW_BYTES)[0]
    stored = tf.train.Example.FromString(raw).features.feature['image'].bytes_list.value[0]
    assert stored == (root / 'images' / 'c.jpg').read_bytes()
    # The inferred class count is saved with the data and read back by a fresh builder.
    metadata = builders.get_builder(config).info.metadata
    assert metadata['class_names'] == [f'class_{i}' for i in range(6)]
    assert len(metadata['palette']) == 6


def test_voc_style_layout(tmp_path):
    root = tmp_path / 'VOC'
    for sub in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
        os.makedirs(root / sub)
    for i, stem in enumerate(['2007_000001', '2007_000002', '2007_000003', 'detection_only']):
        Image.fromarray(_image(i)).save(root / 'JPEGImages' / f'{stem}.jpg')
        if stem != 'detection_only':
            _save_palette_png(str(root / 'SegmentationClass' / f'{stem}.png'), _mask(i, 21))
    (root / 'ImageSets/Segmentation/train.txt').write_text('2007_000001\n2007_000002\n')
    (root / 'ImageSets/Segmentation/val.txt').write_text('2007_000003\n')
    examples = _read(builders.prepare(_dataset_config(root, tmp_path / 'tfds')))
    assert {split: sorted(e) for split, e in examples.items()} == {
        'train': ['2007_000001', '2007_000002'],
        'validation': ['2007_000003'],
    }
    np.testing.assert_array_equal(
        examples['validation']['2007_000003']['segmentation_mask'][..., 0], _mask(2, 21)
    )


def _no_mask(root):
    Image.fromarray(_image(5)).save(root / 'images' / 'lonely_image.png')
    return 'lonely_image.png'


def _no_image(root):
    Image.fromarray(_mask(5, 3)).save(root / 'masks' / 'lonely_mask.png')
    return 'lonely_mask.png'


def _wrong_size(root):
    Image.fromarray(np.zeros((_H + 1, _W), np.uint8)).save(root / 'masks' / 'p1.png')
    return 'p1.png'


def _bad_label(root):
    (root / 'classes.txt').write_text('a\nb\nc\n')
    mask = _mask(0, 3)
    mask[2, 2] = 3
    Image.fromarray(mask).save(root / 'masks' / 'p0.png')
    return 'p0.png'


def _corrupt_image(root):
    os.remove(root / 'images' / 'p1.png')
    (root / 'images' / 'p1.jpg').write_bytes(b'not a jpeg at all')
    return 'p1.jpg'


def _corrupt_mask(root):
    (root / 'masks' / 'p0.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    return 'p0.png'


def _rgb_mask(root):
    Image.fromarray(_image(3)).save(root / 'masks' / 'p1.png')
    return 'p1.png'


def _missing_listed(root):
    os.makedirs(root / 'splits')
    (root / 'splits' / 'train.txt').write_text('p0\nghost\n')
    (root / 'splits' / 'val.txt').write_text('p1\n')
    return 'ghost'


@pytest.mark.parametrize(
    'corrupt',
    [
        _no_mask,
        _no_image,
        _wrong_size,
        _bad_label,
        _corrupt_image,
        _corrupt_mask,
        _rgb_mask,
        _missing_listed,
    ],
)
def test_errors_name_the_file(tmp_path, corrupt):
    root = tmp_path / 'root'
    _simple_root(root, ['p0', 'p1'])
    culprit = corrupt(root)
    with pytest.raises(ValueError, match=re.escape(culprit)):
        builders.prepare(_dataset_config(root, tmp_path / 'tfds', val_fraction=0.0))


def test_folder_needs_a_root(tmp_path):
    with pytest.raises(ValueError, match='folder_root'):
        builders.get_builder(_dataset_config(None, tmp_path))


def test_labels_found_without_classes_file_are_reported_and_a_far_one_flagged(tmp_path, caplog):
    root = tmp_path / 'root'
    _simple_root(root, ['p0', 'p1'])  # Labels 0, 1, 2 (and 255).
    mask = _mask(0, 3)
    mask[3, 3] = 7  # One stray pixel.
    Image.fromarray(mask).save(root / 'masks' / 'p0.png')
    with caplog.at_level('WARNING'):
        builder = builders.prepare(_dataset_config(root, tmp_path / 'tfds', val_fraction=0.0))
    messages = [r.getMessage() for r in caplog.records]
    (report,) = [m for m in messages if 'label values and their pixel counts' in m]
    assert f'folder {root}: no classes.txt, so the masks define 8 classes' in report
    assert '7: 1' in report and '255: 4' in report
    assert any(
        'label 7 is far above the others (the next is 2)' in m
        and 'add classes.txt or fix the masks' in m
        for m in messages
    )
    assert len(builder.info.metadata['class_names']) == 8
    counts = common.LabelCounts()
    counts.add(np.array([[0, 1, 2, 3, 255]], np.uint8))
    assert counts.far_label() is None


@pytest.mark.parametrize(
    ('stems', 'val_fraction', 'lists', 'expected', 'hint'),
    [
        ([], 0.1, None, 'has no examples', 'same stem'),
        (['a'], 0.1, None, "split 'validation' would have no image", 'cannot make two splits'),
        (['a', 'b', 'c'], 0.001, None, "split 'validation' would have no image", 'or more'),
        (['a', 'b'], 0.999, None, "split 'train' would have no image", 'or less'),
        (['a', 'b'], 0.1, ('a\n', ''), "split 'validation' has no examples", 'a line'),
    ],
)
def test_a_split_without_examples_is_an_error(tmp_path, stems, val_fraction, lists, expected, hint):
    root = tmp_path / 'root'
    _simple_root(root, stems)
    if lists is not None:
        os.makedirs(root / 'splits')
        (root / 'splits' / 'train.txt').write_text(lists[0])
        (root / 'splits' / 'val.txt').write_text(lists[1])
    config = _dataset_config(root, tmp_path / 'tfds', val_fraction=val_fraction)
    with pytest.raises(errors.UserError, match=re.escape(expected)) as error:
        builders.prepare(config)
    assert str(root) in str(error.value) and hint in error.value.hint
    assert not (tmp_path / 'tfds').exists()  # A failed build leaves no empty folders.
