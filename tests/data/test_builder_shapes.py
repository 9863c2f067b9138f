"""Tests of the synthetic `shapes` and `shapes_fine` builders and of `get_builder` / `prepare`."""

import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from scipy import ndimage

from fcn_unet_jax.data import builders
from fcn_unet_jax.data.builders import shapes, shapes_fine

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_TINY = shapes.ShapesConfig(name='tiny_test', image_size=32, num_train=40, num_validation=8)


def _build(data_dir) -> dict[str, list[dict]]:
    builder = shapes.Shapes(config=_TINY, data_dir=str(data_dir))
    builder.download_and_prepare()
    return {split: list(tfds.as_numpy(builder.as_dataset(split))) for split in builder.info.splits}


def test_generation_is_a_function_of_the_index():
    forward = [shapes.generate_example(i, 'train', 48) for i in range(6)]
    backward = [shapes.generate_example(i, 'train', 48) for i in reversed(range(6))][::-1]
    for (image_a, mask_a), (image_b, mask_b) in zip(forward, backward, strict=True):
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(mask_a, mask_b)
    assert not np.array_equal(forward[0][0], forward[1][0])
    # Splits draw from different streams: validation example 0 is not train example 0.
    assert not np.array_equal(forward[0][0], shapes.generate_example(0, 'validation', 48)[0])


def test_class_hues_colour_each_class():
    def dominant_channel_shares(class_hues: bool) -> np.ndarray:
        # Per class, the share of pixels whose strongest channel is R, G, B.
        counts = np.zeros((4, 3))
        for i in range(30):
            image, mask = shapes.generate_example(i, 'train', 48, class_hues)
            for label in range(1, 4):
                strongest = image[mask == label].astype(int).argmax(axis=-1)
                counts[label] += np.bincount(strongest, minlength=3)
        return counts[1:] / counts[1:].sum(axis=1, keepdims=True)

    # Circles red, rectangles green, triangles blue: mostly the dominant channel.
    assert (np.diag(dominant_channel_shares(True)) > 0.8).all()
    assert (np.diag(dominant_channel_shares(False)) < 0.6).all()


def test_build_is_deterministic_with_expected_splits_and_labels(tmp_path):
    first = _build(tmp_path / 'a')
    second = _build(tmp_path / 'b')
    assert {split: len(examples) for split, examples in first.items()} == {
        'train': 40,
        'validation': 8,
    }
    for split, examples in first.items():
        by_name = {e['file_name']: e for e in second[split]}
        for example in examples:
            other = by_name[example['file_name']]
            np.testing.assert_array_equal(example['image'], other['image'])
            np.testing.assert_array_equal(example['segmentation_mask'], other['segmentation_mask'])
    masks = np.stack([e['segmentation_mask'] for e in first['train']])
    assert masks.shape == (40, 32, 32, 1)
    assert masks.max() < len(shapes.CLASS_NAMES)
    np.testing.assert_array_equal(np.unique(masks), np.arange(len(shapes.CLASS_NAMES)))
    images = np.stack([e['image'] for e in first['train']])
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8


def test_get_builder_resolves_configs_and_metadata(tmp_path):
    config = ml_collections.ConfigDict(
        {'name': 'shapes/small', 'data_dir': str(tmp_path), 'manual_dir': None}
    )
    builder = builders.get_builder(config)
    assert builder.builder_config.image_size == 64
    metadata = builder.info.metadata
    assert metadata['class_names'] == ['background', 'circle', 'rectangle', 'triangle']
    assert len(metadata['palette']) == 4 and metadata['ignore_label'] == 255
    # The registered default config matches config.model.num_classes and the documented size.
    default = tfds.builder('shapes', data_dir=str(tmp_path)).builder_config
    assert (default.image_size, default.num_train, default.num_validation) == (128, 2000, 200)
    assert default.class_hues
    assert not tfds.builder('shapes/hard', data_dir=str(tmp_path)).builder_config.class_hues


def test_build_command_prepares_the_configured_dataset(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'fcn_unet_jax.data.build',
            '--config=configs/default.py',
            '--config.dataset.name=shapes/small',
            f'--config.dataset.data_dir={tmp_path}',
        ],
        capture_output=True,
        text=True,
        cwd=_REPO_ROOT,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'shapes/small train: 1000 examples' in result.stdout
    assert 'shapes/small validation: 100 examples' in result.stdout
    assert list((tmp_path / 'shapes' / 'small').glob('*/*.array_record*'))


def test_shapes_fine_holds_large_small_thin_and_touching_objects():
    examples = [shapes_fine.generate_example(i, 'train', 128) for i in range(4)]
    again = shapes_fine.generate_example(3, 'train', 128)
    np.testing.assert_array_equal(again[0], examples[3][0])
    np.testing.assert_array_equal(again[1], examples[3][1])
    assert not np.array_equal(examples[0][1], shapes_fine.generate_example(0, 'validation', 128)[1])
    masks = np.stack([mask for _, mask in examples])
    assert examples[0][0].shape == (128, 128, 3) and examples[0][0].dtype == np.uint8
    np.testing.assert_array_equal(np.unique(masks), np.arange(len(shapes_fine.CLASS_NAMES)))
    # Bars are 2 to 5 px wide: no bar pixel is more than 2.5 px from the bar's edge.
    for mask in masks:
        assert ndimage.distance_transform_edt(mask == 2).max() <= 3.0
    # Small objects (radius 3 to 8 px) and large ones (radius >= 12% of the side).
    sizes = np.concatenate(
        [
            np.bincount(ndimage.label(mask == label)[0].ravel())[1:]
            for mask in masks
            for label in (1, 3)
        ]
    )
    assert sizes.min() < np.pi * 8**2 and sizes.max() > np.pi * (0.12 * 128) ** 2 * 0.8
    # Touching cells: somewhere a run of 1 to GAP background pixels lies between two cell
    # pixels of the same row or column.
    cells = masks == 1
    gaps = 0
    for width in range(1, shapes_fine.GAP + 1):
        for axis in (1, 2):
            before = np.roll(cells, 1, axis=axis)
            after = np.roll(cells, -width, axis=axis)
            between = np.ones_like(cells)
            for k in range(width):
                between &= np.roll(masks == 0, -k, axis=axis)
            gaps += (before & between & after).sum()
    assert gaps > 0


def test_shapes_fine_builder_resolves_and_registers(tmp_path):
    config = ml_collections.ConfigDict(
        {'name': 'shapes_fine', 'data_dir': str(tmp_path), 'manual_dir': None}
    )
    builder = builders.get_builder(config)
    assert builder.builder_config.image_size == 256
    assert (builder.builder_config.num_train, builder.builder_config.num_validation) == (1000, 100)
    assert builder.info.metadata['class_names'] == ['background', 'cell', 'bar', 'star']
    assert (
        tfds.builder('shapes_fine/small', data_dir=str(tmp_path)).builder_config.image_size == 128
    )


def test_generated_builders_describe_themselves_and_the_base_is_not_a_dataset(tmp_path):
    # The shared base is abstract: tfds registers the two datasets, not it.
    assert 'generated_builder' not in tfds.list_builders(with_community_datasets=False)
    for module, name in ((shapes, 'shapes/small'), (shapes_fine, 'shapes_fine/small')):
        info = tfds.builder(name, data_dir=str(tmp_path)).info
        assert info.description == module.__doc__.strip()
        assert info.metadata['class_names'] == list(module.CLASS_NAMES)
