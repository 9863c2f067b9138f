"""Tests of inference: window plans, stitching exactness, overlap-tile, TTA and the mesh path.

Real models run at width 1/16 with random initialisation on small odd-sized images; a
1x1-conv toy model (no spatial context, so every window sees exactly what a whole-image
run sees) checks that overlapping windows are stitched and averaged exactly.
"""

import functools
import re
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import default
from fcn_unet_jax import inference, models, sharding
from fcn_unet_jax.inference import InferenceSettings
from fcn_unet_jax.models import unet

TINY = 1 / 16
ODD = (37, 53)


pytestmark = pytest.mark.usefixtures('fast_compiles')


@functools.cache
def build(name, **overrides):
    """A tiny model (3 classes, 3 channels) and its randomly initialised variables."""
    c = default.get_config().model
    c.update({'name': name, 'num_classes': 3, 'input_channels': 3, 'width': TINY, **overrides})
    model = models.build_model(c)
    shape = models.example_input_shape(c, size=32)
    variables = jax.jit(model.init, static_argnames='train')(
        jax.random.key(0), jnp.zeros(shape), train=False
    )
    # FCN score layers start at zero, which would make every prediction uniform.
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [
        0.1 * jax.random.normal(k, v.shape) if not v.any() else v
        for k, v in zip(keys, leaves, strict=True)
    ]
    return model, jax.tree_util.tree_unflatten(tree, leaves)


def images(shape, seed=1):
    """Standard-normal images, like normalised inputs."""
    return jax.random.normal(jax.random.key(seed), shape)


class PixelwiseConv(nn.Module):
    """1x1 conv that records the batch sizes it is traced with; optionally with an aux head."""

    traced_batches: ClassVar[list[int]] = []
    aux_head: bool = False

    @nn.compact
    def __call__(self, x, *, train):
        del train
        self.traced_batches.append(x.shape[0])
        out = nn.Conv(3, (1, 1), name='conv')(x)
        return {'out': out, 'aux': -out} if self.aux_head else out


def infer(model, variables, x, **settings):
    settings = InferenceSettings(**settings)
    return jax.jit(lambda v, x: inference.probabilities(model, v, x, settings))(variables, x)


@pytest.mark.parametrize(
    'kwargs, match',
    [
        ({'mode': 'tiles'}, r"config\.eval\.mode must be one of \('whole', 'sliding'\)"),
        ({'mode': 'sliding'}, r'config\.eval\.window_size'),
        ({'window_size': (32, 0)}, r'config\.eval\.window_size'),
        ({'window_overlap': 1.0}, r'config\.eval\.window_overlap'),
        ({'scales': ()}, r'config\.eval\.scales'),
        ({'scales': (1.0, -0.5)}, r'config\.eval\.scales'),
    ],
)
def test_invalid_settings_name_the_config_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InferenceSettings(**kwargs)


def test_settings_from_default_config():
    config = default.get_config()
    config.eval.scales = (0.5, 1.0)
    settings = InferenceSettings.from_config(config)
    assert settings.mode == config.eval.mode
    assert settings.scales == (0.5, 1.0)
    assert settings.windows_per_call == config.eval_batch_size


def test_valid_unet_rejects_a_window_it_cannot_take():
    model, variables = build('unet', padding='VALID')
    settings = InferenceSettings(mode='sliding', window_size=(200, 204))
    geometry = inference.model_geometry(model)
    # Every side the geometry accepts is one the network maps to exactly that tile.
    for side in (188, 204, 220, 572):
        assert geometry.tile_of_window(side) == unet.unet_output_size(side)
    with pytest.raises(ValueError, match=r'config\.eval\.window_size side 200 .* \(188, 204\)'):
        inference.logits(model, variables, images((1, *ODD, 3)), settings)


@pytest.mark.parametrize('padding', ['SAME', 'VALID'])
def test_output_has_the_input_size_in_every_mode(padding):
    model, variables = build('unet', padding=padding)
    # VALID U-Net input sides 204 and 252 give tiles of 20 and 68 (larger than the image).
    window, large = ((204, 204), (252, 252)) if padding == 'VALID' else ((16, 24), (48, 64))
    modes = [
        {},
        {'mode': 'sliding', 'window_size': window, 'windows_per_call': 4},
        {'mode': 'sliding', 'window_size': large},
        {'mode': 'sliding', 'window_size': window, 'flip': True, 'scales': (0.75, 1.0)},
    ]
    x = images((2, *ODD, 3))
    for settings in modes:
        p = infer(model, variables, x, **settings)
        assert p.shape == (2, *ODD, 3), settings
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)


def test_sliding_with_one_window_equals_whole_image():
    model, variables = build('fcn8s_vgg16')
    x = images((2, *ODD, 3))
    whole = infer(model, variables, x)
    assert whole.std() > 1e-3  # A real, non-uniform prediction.
    sliding = infer(model, variables, x, mode='sliding', window_size=ODD)
    np.testing.assert_array_equal(sliding, whole)
    expected = jax.nn.softmax(model.apply(variables, x, train=False), axis=-1)
    np.testing.assert_allclose(whole, expected, atol=1e-6)


@pytest.mark.parametrize('aux_head', [False, True])
def test_overlapping_windows_stitch_exactly_with_bounded_calls(aux_head):
    model = PixelwiseConv(aux_head=aux_head)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    x = images((2, 128, 128, 3))  # 4x the window side: 5 x 5 windows per image.
    settings = InferenceSettings(
        mode='sliding', window_size=(32, 32), window_overlap=0.25, windows_per_call=4
    )
    PixelwiseConv.traced_batches.clear()
    out = jax.jit(lambda v, x: inference.logits(model, v, x, settings))(variables, x)
    # Traced with 4-window groups only, never with all 50 windows.
    assert set(PixelwiseConv.traced_batches) == {4}
    expected = model.apply(variables, x, train=False)
    np.testing.assert_allclose(out, expected['out'] if aux_head else expected, atol=1e-6)


def test_window_plan_covers_the_image_and_groups_windows():
    settings = InferenceSettings(mode='sliding', window_size=(32, 32), window_overlap=0.25)
    plan = inference.plan_tiles((128, 100), settings, inference.Geometry())
    assert plan.starts == ((0, 24, 48, 72, 96), (0, 24, 48, 68))  # Last one ends at 100.
    counts = plan.count_map()
    assert counts.shape == (128, 100) and counts.min() == 1 and counts.max() == 4

    index, valid = plan.window_groups(batch_size=3, windows_per_call=6, num_devices=4)
    assert index.shape == (8, 8, 3)  # 60 windows in groups of 8 (6 rounded up to 4 devices).
    assert valid.sum() == 60 and not valid[-1, 4:].any()
    windows = {tuple(w) for w in index[valid]}
    assert len(windows) == 60 and {b for b, _, _ in windows} == {0, 1, 2}

    small = inference.plan_tiles((20, 10), settings, inference.Geometry())  # Padded up.
    assert small.extent == small.window == (32, 32) and small.starts == ((0,), (0,))
    whole = inference.plan_tiles((20, 10), InferenceSettings(), inference.Geometry())
    assert whole.extent == whole.window == (20, 10) and whole.starts == ((0,), (0,))


@pytest.mark.parametrize('windows_per_call', [1, 9])
def test_valid_unet_overlap_tile_equals_one_run_on_the_mirrored_image(windows_per_call):
    model, variables = build('unet', padding='VALID')
    geometry = inference.model_geometry(model)
    assert (geometry.margin, geometry.step, geometry.min_tile) == (92, 16, 4)
    h, w = 45, 37
    x = images((1, h, w, 3))
    settings = InferenceSettings(
        mode='sliding', window_size=(204, 204), windows_per_call=windows_per_call
    )
    assert inference.plan_tiles((h, w), settings, geometry).windows_per_image == 9
    tiled = jax.jit(lambda v, x: inference.logits(model, v, x, settings))(variables, x)
    # One run whose output (52 = 4 + 3 * 16) covers the image, on the paper's mirror padding.
    mirrored = np.pad(
        np.asarray(x), ((0, 0), (92, 92 + 52 - h), (92, 92 + 52 - w), (0, 0)), 'reflect'
    )
    direct = model.apply(variables, mirrored, train=False)
    assert direct.shape[1:3] == (52, 52)
    np.testing.assert_allclose(tiled, direct[:, :h, :w], atol=1e-5)
    whole = jax.jit(lambda v, x: inference.logits(model, v, x, InferenceSettings()))(variables, x)
    np.testing.assert_allclose(whole, direct[:, :h, :w], atol=1e-5)


def test_flip_tta_is_flip_symmetric_on_a_symmetric_image():
    model, variables = build('unet', padding='SAME')
    half = images((1, 24, 12, 3))
    x = jnp.concatenate([half, half[:, :, ::-1]], axis=2)
    plain = infer(model, variables, x)
    assert not np.allclose(plain, plain[:, :, ::-1], atol=1e-4)  # The net itself is not.
    flipped = infer(model, variables, x, flip=True)
    np.testing.assert_allclose(flipped, flipped[:, :, ::-1], atol=1e-6)


def test_multi_scale_averages_probabilities():
    model, variables = build('unet', padding='SAME')
    x = images((1, *ODD, 3))
    apply = jax.jit(lambda x: model.apply(variables, x, train=False))
    full = jax.nn.softmax(apply(x), axis=-1)
    np.testing.assert_allclose(infer(model, variables, x, scales=(1.0,)), full, atol=1e-6)
    half = jax.image.resize(x, (1, 18, 26, 3), 'bilinear', antialias=False)
    half = jax.image.resize(apply(half), (1, *ODD, 3), 'bilinear', antialias=False)
    expected = (full + jax.nn.softmax(half, axis=-1)) / 2
    np.testing.assert_allclose(infer(model, variables, x, scales=(0.5, 1.0)), expected, atol=1e-5)


@pytest.mark.parametrize(
    'settings',
    [
        InferenceSettings(windows_per_call=3),
        InferenceSettings(mode='sliding', window_size=(16, 24), windows_per_call=3, flip=True),
    ],
)
def test_mesh_path_equals_single_device(settings):
    assert jax.device_count() == 4  # tests/conftest.py forces four host devices.
    model, variables = build('unet', padding='SAME')
    x = np.asarray(images((3, *ODD, 3)))
    single = inference.Predictor(model, variables, settings)
    mesh = sharding.create_mesh()
    sharded = inference.Predictor(model, variables, settings, mesh=mesh)
    expected = single.probabilities(x)
    result = sharded.probabilities(x)
    assert len(result.sharding.device_set) == 4
    np.testing.assert_allclose(result, expected, atol=1e-5)
    np.testing.assert_array_equal(single.predict(x), np.argmax(expected, axis=-1))


def test_mesh_shards_each_window_group_over_the_devices():
    model, variables = build('unet', padding='SAME')
    mesh = sharding.create_mesh()
    replicated = NamedSharding(mesh, P())
    x = jax.device_put(images((3, *ODD, 3)), replicated)
    variables = jax.device_put(variables, replicated)
    settings = InferenceSettings(mode='sliding', window_size=(16, 24), windows_per_call=3)
    fn = jax.jit(lambda v, x: inference.logits(model, v, x, settings, mesh))
    hlo = fn.lower(variables, x).compile().as_text()
    # Groups of 3 windows are padded to 4, one per device: full-resolution convs see 1.
    batches = set(re.findall(r'f32\[(\d+),16,24,\d+\]\S* convolution\(', hlo))
    assert batches == {'1'}


def test_predictor_rejects_a_mesh_without_data_axis():
    model, variables = build('unet', padding='SAME')
    mesh = Mesh(np.asarray(jax.devices()), ('batch',))
    with pytest.raises(ValueError, match="'data' axis"):
        inference.Predictor(model, variables, InferenceSettings(), mesh=mesh)


def test_make_predict_fn_reads_config_eval():
    config = default.get_config()
    config.eval.update(mode='sliding', window_size=(16, 16), window_overlap=0.5)
    model, variables = build('unet', padding='SAME')
    x = images((1, *ODD, 3))
    out = jax.jit(inference.make_predict_fn(model, config))(variables, x)
    expected = infer(model, variables, x, mode='sliding', window_size=(16, 16), window_overlap=0.5)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert not np.allclose(out, infer(model, variables, x), atol=1e-4)  # Not whole-image.
