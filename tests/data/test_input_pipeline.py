"""Tests of the tf.data pipelines on a tiny `shapes` build in the array_record format.

Training uses 20 examples and a global batch of 8, so epoch boundaries fall inside batch 2
(samples 16..23) and at the start of batch 5 (sample 40).
"""

import itertools
import types

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import default
from fcn_unet_jax import errors
from fcn_unet_jax.data import builders, decoded_cache, input_pipeline, weight_map

TRAIN_SPLIT = 'train[:20]'
EVAL_SPLIT = 'validation[:13]'


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp('tfds'))
    config = default.get_config()
    config.dataset.name, config.dataset.data_dir = 'shapes/small', path
    builders.get_builder(config.dataset).download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    return path


def _config(data_dir: str, **input_overrides) -> ml_collections.ConfigDict:
    config = default.get_config()
    config.dataset.name, config.dataset.data_dir = 'shapes/small', data_dir
    config.dataset.train_split, config.dataset.eval_split = TRAIN_SPLIT, EVAL_SPLIT
    config.batch_size, config.eval_batch_size = 8, 4
    config.input.crop_size = (48, 48)
    config.input.elastic = True
    config.input.prefetch = 1
    config.input.update(input_overrides)
    return config


def _no_augmentation(data_dir: str) -> ml_collections.ConfigDict:
    """Full 64 x 64 crops, no randomness but the order: labels are the source masks."""
    return _config(data_dir, crop_size=(64, 64), scale_range=(1.0, 1.0), hflip=False, elastic=False)


def _take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(iterator, n))


def _assert_batches_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.keys() == e.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], e[key], err_msg=key)


def _source(data_dir: str, split: str):
    config = _config(data_dir)
    return builders.get_builder(config.dataset).as_data_source(split)


def test_dataset_info(data_dir):
    info = input_pipeline.get_dataset_info(_config(data_dir))
    assert info.num_classes == 4 and info.class_names[0] == 'background'
    assert info.palette.shape == (4, 3) and info.palette.dtype == np.uint8
    assert info.ignore_label == 255
    assert (info.num_train_examples, info.num_eval_examples) == (20, 13)


def test_pipelines_run_without_tf_data_autotuning(data_dir):
    # Deleting an autotuned iterator waits for its model thread: up to half a minute at the
    # end of a training run (docs/performance.md).
    config = _config(data_dir)
    assert input_pipeline.train_dataset(config).options().autotune.enabled is False
    eval_dataset = input_pipeline.create_eval_iterable(config).dataset()
    assert eval_dataset.options().autotune.enabled is False


def test_train_batches(data_dir):
    config = _config(data_dir, border_weights=True, color_jitter=0.4)
    batch = next(input_pipeline.create_train_iterator(config))
    assert batch['image'].shape == (8, 48, 48, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (8, 48, 48) and batch['label'].dtype == np.int32
    assert batch['weight'].shape == (8, 48, 48) and batch['weight'].dtype == np.float32
    assert set(np.unique(batch['label'])) <= {0, 1, 2, 3, 255}
    assert (batch['label'] == 255).any()  # Scale 0.5 leaves padding in some crops.
    assert (batch['weight'][batch['label'] == 255] == 0).all()
    assert (batch['weight'][batch['label'] != 255] > 0).all()
    # The weights, computed once per batch, are each crop's own map.
    for label, weight in zip(batch['label'], batch['weight'], strict=True):
        expected = weight_map.border_weight_map(
            label, w0=config.input.border_w0, sigma=config.input.border_sigma
        )
        np.testing.assert_array_equal(weight, expected)
    # 'unit' normalisation for the classic U-Net; padding is 0.
    assert batch['image'].min() >= 0 and batch['image'].max() <= 1


def test_same_seed_same_batches_other_seed_other_batches(data_dir):
    config = _config(data_dir)
    first = _take(input_pipeline.create_train_iterator(config), 3)
    again = _take(input_pipeline.create_train_iterator(config), 3)
    _assert_batches_equal(again, first)
    config.seed = 1
    other = _take(input_pipeline.create_train_iterator(config), 3)
    assert not np.array_equal(other[0]['image'], first[0]['image'])
    assert 'weight' not in first[0]


def test_resume_is_exact_across_epoch_boundaries(data_dir):
    config = _config(data_dir, color_jitter=0.2)
    uninterrupted = _take(input_pipeline.create_train_iterator(config), 6)
    for start in (2, 5):
        resumed = _take(input_pipeline.create_train_iterator(config, start_step=start), 6 - start)
        _assert_batches_equal(resumed, uninterrupted[start:])


def test_every_epoch_is_a_new_permutation(data_dir):
    source = _source(data_dir, TRAIN_SPLIT)
    index_of = {source[i]['segmentation_mask'][..., 0].tobytes(): i for i in range(len(source))}
    assert len(index_of) == 20
    batches = _take(input_pipeline.create_train_iterator(_no_augmentation(data_dir)), 8)
    order = [
        index_of[label.astype(np.uint8).tobytes()] for batch in batches for label in batch['label']
    ]
    epochs = [order[0:20], order[20:40], order[40:60]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(20))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_processes_split_each_global_batch(data_dir):
    config = _config(data_dir)
    single = _take(input_pipeline.create_train_iterator(config), 4)
    parts = [
        _take(input_pipeline.create_train_iterator(config, process_index=p, process_count=2), 4)
        for p in range(2)
    ]
    for step, batch in enumerate(single):
        for key in batch:
            assert parts[0][step][key].shape[0] == 4
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key], err_msg=key)
    with pytest.raises(ValueError, match='not divisible'):
        input_pipeline.create_train_iterator(config, process_index=0, process_count=3)


def test_the_decoded_cache_gives_the_same_batches(data_dir, monkeypatch):
    # Every augmentation and the border weights, across both epoch boundaries (batches 2
    # and 5), resumed mid-stream and split over processes.
    config = _config(data_dir, border_weights=True, color_jitter=0.4)
    plain = _take(input_pipeline.create_train_iterator(config), 6)
    config.input.cache_decoded = True
    first = _take(input_pipeline.create_train_iterator(config), 6)  # Fills the cache.
    _assert_batches_equal(first, plain)

    def no_decoding(*args):
        raise AssertionError('a record was decoded while the cache was filled')

    # From then on no record is decoded: the split is decoded once per process, and the
    # runs of a sweep share it.
    monkeypatch.setattr(input_pipeline, '_decode', no_decoding)
    monkeypatch.setattr(decoded_cache, '_decode_all', no_decoding)
    _assert_batches_equal(_take(input_pipeline.create_train_iterator(config), 6), plain)
    resumed = _take(input_pipeline.create_train_iterator(config, start_step=3), 3)
    _assert_batches_equal(resumed, plain[3:])
    parts = [
        _take(input_pipeline.create_train_iterator(config, process_index=p, process_count=2), 6)
        for p in range(2)
    ]
    for step, batch in enumerate(plain):
        for key in batch:
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key], err_msg=key)


def test_the_decoded_cache_refuses_a_split_that_does_not_fit(data_dir, monkeypatch):
    config = _config(data_dir, cache_decoded=True)
    config.dataset.train_split = 'train[:12]'  # Not the split a test before may have cached.
    # 12 decoded 64 x 64 examples (RGB image and mask): 12 * 64 * 64 * 4 bytes.
    monkeypatch.setattr(decoded_cache, '_physical_memory', lambda: 4 * 12 * 64 * 64 * 4 - 4)
    with pytest.raises(errors.UserError) as error:
        input_pipeline.create_train_iterator(config)
    message = str(error.value)
    assert "split 'train[:12]' of shapes" in message and 'cache_decoded' in message
    assert '\n' not in message and 'cache_decoded=False' in error.value.hint
    monkeypatch.setattr(decoded_cache, '_physical_memory', lambda: 4 * 12 * 64 * 64 * 4)
    assert next(input_pipeline.create_train_iterator(config))['image'].shape == (8, 48, 48, 3)


def test_the_decoded_cache_keeps_each_example_s_own_shape():
    features = {
        'image': types.SimpleNamespace(shape=(None, None, 3)),
        'segmentation_mask': types.SimpleNamespace(shape=(None, None, 1)),
    }
    builder = types.SimpleNamespace(info=types.SimpleNamespace(features=features))
    rng = np.random.default_rng(0)
    sizes = [(5, 7), (1, 1), (6, 3)]
    values = {
        name: [rng.integers(0, 255, (*size, c), np.uint8) for size in sizes]
        for name, c in (('image', 3), ('segmentation_mask', 1))
    }
    split = decoded_cache.DecodedSplit(
        {name: decoded_cache._concatenate(builder, name, v) for name, v in values.items()}
    )
    lookup = tf.function(split.lookup)
    for index in (2, 0, 1):
        example = lookup(tf.constant(index, tf.int64))
        for name in values:
            np.testing.assert_array_equal(example[name].numpy(), values[name][index])
    assert lookup.get_concrete_function(tf.constant(0, tf.int64)).structured_outputs[
        'image'
    ].shape.as_list() == [None, None, 3]


def _real_examples(batches) -> dict[bytes, dict[str, np.ndarray]]:
    """Collects the non-filler examples of eval batches by file name (must be unique)."""
    examples = {}
    for batch in batches:
        for i, has_pixels in enumerate(batch['mask'].any(axis=(1, 2))):
            if has_pixels:
                name = batch['file_name'][i]
                assert name not in examples
                examples[name] = {key: value[i] for key, value in batch.items()}
            else:
                assert batch['file_name'][i] == b''
                assert (batch['label'][i] == 255).all()
    return examples


def test_eval_covers_every_example_once_at_original_size(data_dir):
    config = _config(data_dir, eval_pad_size=(96, 80))
    config.model.input_channels = 1
    iterable = input_pipeline.create_eval_iterable(config)
    batches = list(iterable)
    assert len(batches) == len(iterable) == 4  # ceil(13 / 4).
    for batch in batches:
        assert batch['image'].shape == (4, 96, 80, 1) and batch['image'].dtype == np.float32
        assert batch['label'].shape == (4, 96, 80) and batch['label'].dtype == np.int32
        assert batch['mask'].shape == (4, 96, 80) and batch['mask'].dtype == bool
    examples = _real_examples(batches)
    source = _source(data_dir, EVAL_SPLIT)
    assert len(examples) == len(source) == 13
    for i in range(len(source)):
        expected = source[i]
        got = examples[expected['file_name']]
        assert got['mask'][:64, :64].all() and not got['mask'][64:].any()
        assert not got['mask'][:, 64:].any()
        np.testing.assert_array_equal(got['label'][:64, :64], expected['segmentation_mask'][..., 0])
        assert (got['label'][64:] == 255).all() and (got['label'][:, 64:] == 255).all()
        np.testing.assert_allclose(
            got['image'][:64, :64],
            input_pipeline.preprocess_image(expected['image'], config),
            atol=1e-6,
        )
        assert (got['image'][64:] == 0).all()
    # Each iter() is a new, identical pass.
    _assert_batches_equal(list(iterable), batches)


def test_eval_processes_share_the_split_without_overlap(data_dir):
    config = _config(data_dir)
    assert input_pipeline.eval_pad_size(config) == (64, 64)
    single = _real_examples(input_pipeline.create_eval_iterable(config))
    shares = []
    for p in range(2):
        iterable = input_pipeline.create_eval_iterable(config, process_index=p, process_count=2)
        batches = list(iterable)
        assert len(batches) == len(iterable) == 4  # 6 and 7 examples, 2 per batch.
        assert all(batch['image'].shape[0] == 2 for batch in batches)
        shares.append(_real_examples(batches))
    assert not shares[0].keys() & shares[1].keys()
    assert shares[0].keys() | shares[1].keys() == single.keys()
    for name, example in single.items():
        other = shares[0].get(name, shares[1].get(name))
        for key in example:
            np.testing.assert_array_equal(other[key], example[key])


def test_eval_pad_size_smaller_than_an_image_fails(data_dir):
    config = _config(data_dir, eval_pad_size=(32, 64))
    with pytest.raises(tf.errors.InvalidArgumentError, match='eval pad size'):
        list(input_pipeline.create_eval_iterable(config))


@pytest.mark.parametrize(
    ('model', 'expected'),
    [
        ('fcn8s_vgg16', 'fcn_bgr'),
        ('fcn32s_vgg16', 'fcn_bgr'),
        ('fcn_resnet50', 'imagenet'),
        ('unet_vgg16', 'imagenet'),
        ('unet_resnet50', 'imagenet'),
        ('unet', 'unit'),
    ],
)
def test_normalization_for(model, expected):
    config = default.get_config()
    config.model.name = model
    assert input_pipeline.normalization_for(config) == expected
    config.input.normalization = 'imagenet'
    assert input_pipeline.normalization_for(config) == 'imagenet'


def test_preprocess_image_matches_the_train_pipeline(data_dir):
    config = _no_augmentation(data_dir)
    config.model.name = 'fcn8s_vgg16'
    source = _source(data_dir, TRAIN_SPLIT)
    images = {
        source[i]['segmentation_mask'][..., 0].tobytes(): source[i]['image'] for i in range(20)
    }
    batch = next(input_pipeline.create_train_iterator(config))
    for image, label in zip(batch['image'], batch['label'], strict=True):
        expected = input_pipeline.preprocess_image(images[label.astype(np.uint8).tobytes()], config)
        assert isinstance(expected, np.ndarray) and expected.dtype == np.float32
        np.testing.assert_allclose(image, expected, atol=1e-4)
