"""Tests for fcn_unet_jax.weights without PyTorch.

Covers the file readers (npz, safetensors, every Keras HDF5 layout), the error report for
wrong or partial weights, the fit of converted variables into the real models (checked
with `jax.eval_shape`, so full-size models cost no compute), numerical parity with Keras
Applications' VGG16 and ResNet50 (random weights, randomised BN statistics), and the
conversion CLI end to end. torchvision-layout state dicts are written out here from
torchvision's architecture; tests/test_parity_torch.py checks against torch itself.
"""

import functools
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import default
from fcn_unet_jax import models, train, weights
from fcn_unet_jax.models.resnet import ResNet
from fcn_unet_jax.models.vgg import VGG16
from fcn_unet_jax.weights import convert as convert_cli

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def assert_relative_close(ours, ref, rtol=1e-4):
    """max |ours - ref| <= rtol * max |ref|; returns the relative difference."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    scale = np.abs(ref).max()
    assert scale > 0
    diff = np.abs(ours - ref).max()
    assert diff <= rtol * scale, f'max diff {diff:.3g} vs output scale {scale:.3g}'
    return diff / scale


def _abstract_variables(name, **overrides):
    """The model's variable shapes, from `jax.eval_shape` of `init` (nothing is computed)."""
    config = default.get_config().model
    config.name = name
    config.num_classes = 21
    config.update(overrides)
    model = models.build_model(config)
    return jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )


def _unfilled(merged, collections=('params', 'batch_stats')):
    """Paths of leaves that `merge_pretrained` left at their (abstract) initial value."""
    flat = jax.tree_util.tree_flatten_with_path({c: merged[c] for c in collections if c in merged})[
        0
    ]
    return [jax.tree_util.keystr(p) for p, v in flat if isinstance(v, jax.ShapeDtypeStruct)]


def _backbone(pretrained):
    """The encoder's own variables: the `backbone` subtree of each collection."""
    return {c: tree['backbone'] for c, tree in pretrained.items() if 'backbone' in tree}


def _torchvision_resnet(depth=50, prefix='', classifier=True, seed=0):
    """A state dict in torchvision's ResNet layout (Bottleneck, v1.5), random values."""
    rng = np.random.default_rng(seed)
    state = {}

    def conv(name, cout, cin, k):
        state[f'{prefix}{name}.weight'] = rng.normal(0, 0.05, (cout, cin, k, k)).astype('f4')

    def bn(name, c):
        state[f'{prefix}{name}.weight'] = rng.uniform(0.5, 1.5, c).astype('f4')
        state[f'{prefix}{name}.bias'] = rng.normal(0, 0.1, c).astype('f4')
        state[f'{prefix}{name}.running_mean'] = rng.normal(0, 0.1, c).astype('f4')
        state[f'{prefix}{name}.running_var'] = rng.uniform(0.5, 1.5, c).astype('f4')
        state[f'{prefix}{name}.num_batches_tracked'] = np.array(0, np.int64)

    conv('conv1', 64, 3, 7)
    bn('bn1', 64)
    cin = 64
    widths = (64, 128, 256, 512)
    for layer, (n_blocks, planes) in enumerate(zip(RESNET_BLOCKS[depth], widths, strict=True), 1):
        for i in range(n_blocks):
            block = f'layer{layer}.{i}'
            for j, (a, b, k) in enumerate(
                ((cin, planes, 1), (planes, planes, 3), (planes, 4 * planes, 1)), 1
            ):
                conv(f'{block}.conv{j}', b, a, k)
                bn(f'{block}.bn{j}', b)
            if i == 0:
                conv(f'{block}.downsample.0', 4 * planes, cin, 1)
                bn(f'{block}.downsample.1', 4 * planes)
            cin = 4 * planes
    if classifier:
        state['fc.weight'] = rng.normal(0, 0.01, (1000, 2048)).astype('f4')
        state['fc.bias'] = np.zeros(1000, 'f4')
    return state


def _torchvision_fcn(num_classes=21, aux=True):
    """A state dict in torchvision's fcn_resnet50 layout (backbone + FCNHead, optional aux)."""
    rng = np.random.default_rng(1)
    state = _torchvision_resnet(50, prefix='backbone.', classifier=False)
    heads = {'classifier': 2048, 'aux_classifier': 1024} if aux else {'classifier': 2048}
    for head, cin in heads.items():
        mid = cin // 4
        state[f'{head}.0.weight'] = rng.normal(0, 0.01, (mid, cin, 3, 3)).astype('f4')
        for name, value in (('weight', 1.0), ('bias', 0.0), ('running_mean', 0.0)):
            state[f'{head}.1.{name}'] = np.full(mid, value, 'f4')
        state[f'{head}.1.running_var'] = np.ones(mid, 'f4')
        state[f'{head}.4.weight'] = rng.normal(0, 0.01, (num_classes, mid, 1, 1)).astype('f4')
        state[f'{head}.4.bias'] = np.zeros(num_classes, 'f4')
    return state


@pytest.fixture(scope='module')
def resnet50_state():
    return _torchvision_resnet(50)


# --------------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------------


def test_npz_and_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        'module.conv1.weight': rng.normal(size=(4, 3, 3, 3)).astype('f4'),
        'module.bn1.running_var': rng.uniform(size=4).astype('f4'),
    }
    np.savez(tmp_path / 'w.npz', **state)
    save_file(state, str(tmp_path / 'w.safetensors'))
    for name in ('w.npz', 'w.safetensors'):
        loaded = weights.load_state_dict(tmp_path / name)
        # DataParallel's `module.` prefix is removed.
        assert sorted(loaded) == ['bn1.running_var', 'conv1.weight']
        for key, value in state.items():
            np.testing.assert_array_equal(loaded[key.removeprefix('module.')], value)


def test_pth_without_torch_says_what_to_do(tmp_path, monkeypatch):
    path = tmp_path / 'weights.pth'
    path.write_bytes(b'not read')
    monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now fails.
    with pytest.raises(ImportError, match=r'pip install torch.*\.npz.*\.safetensors'):
        weights.load_state_dict(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.npz'):
        weights.load_state_dict(tmp_path / 'nope.npz')
    (tmp_path / 'weights.txt').write_text('')
    with pytest.raises(ValueError, match='Unsupported weights file'):
        weights.load_state_dict(tmp_path / 'weights.txt')


# --------------------------------------------------------------------------------------------
# torchvision layouts: mapping, fit into the real models, error reports.
# --------------------------------------------------------------------------------------------


def test_resnet_backbone_mapping(resnet50_state):
    pretrained = weights.from_torchvision(resnet50_state, 'fcn_resnet50')
    # A backbone-only import: the ImageNet classifier `fc` has no place in the model.
    assert {c: list(t) for c, t in pretrained.items()} == {
        'params': ['backbone'],
        'batch_stats': ['backbone'],
    }
    block = pretrained['params']['backbone']['layer2_0']
    np.testing.assert_array_equal(
        block['conv2']['kernel'], resnet50_state['layer2.0.conv2.weight'].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        block['downsample_bn']['scale'], resnet50_state['layer2.0.downsample.1.weight']
    )
    np.testing.assert_array_equal(
        pretrained['batch_stats']['backbone']['bn1']['var'], resnet50_state['bn1.running_var']
    )


@pytest.mark.parametrize('model_name', ['fcn_resnet50', 'fcn8s_resnet50', 'unet_resnet50'])
def test_resnet_backbone_fits_every_resnet50_model(resnet50_state, model_name):
    pretrained = weights.from_torchvision(resnet50_state, model_name)
    merged = weights.merge_pretrained(_abstract_variables(model_name), pretrained)
    unfilled = _unfilled(merged)
    assert unfilled, 'the head keeps its initialisation'
    assert not [p for p in unfilled if 'backbone' in p]


def test_fcn_checkpoint_full_import_and_new_classes():
    state = _torchvision_fcn(num_classes=21)
    pretrained = weights.from_torchvision(state, 'fcn_resnet50')
    # Every variable of the model comes from the checkpoint, aux head included.
    merged = weights.merge_pretrained(
        _abstract_variables('fcn_resnet50', aux_head=True), pretrained
    )
    assert _unfilled(merged) == []
    np.testing.assert_array_equal(
        merged['params']['aux_classifier']['out']['kernel'],
        state['aux_classifier.4.weight'].transpose(2, 3, 1, 0),
    )
    # A model built without the aux head drops it.
    merged = weights.merge_pretrained(_abstract_variables('fcn_resnet50'), pretrained)
    assert 'aux_classifier' not in merged['params'] and _unfilled(merged) == []

    # Another label set: keeping the 21-class output layer is a shape error with a hint ...
    with pytest.raises(weights.WeightImportError, match='num_classes') as error:
        weights.merge_pretrained(_abstract_variables('fcn_resnet50', num_classes=5), pretrained)
    assert ('params/classifier/out/kernel', (1, 1, 512, 5), (1, 1, 512, 21)) in (
        error.value.mismatched
    )
    # ... and converting with num_classes leaves the output layers to the model's init.
    pretrained = weights.from_torchvision(state, 'fcn_resnet50', num_classes=5)
    assert 'out' not in pretrained['params']['classifier']
    merged = weights.merge_pretrained(
        _abstract_variables('fcn_resnet50', num_classes=5), pretrained
    )
    assert sorted(_unfilled(merged)) == [
        "['params']['classifier']['out']['bias']",
        "['params']['classifier']['out']['kernel']",
    ]


def test_partial_state_dict_lists_every_problem(resnet50_state, tmp_path):
    state = dict(resnet50_state)
    del state['layer3.2.conv1.weight']
    state['layer5.0.conv1.weight'] = np.zeros((1, 1, 1, 1), 'f4')
    state['layer1.0.bn1.running_var'] = np.ones(65, 'f4')
    with pytest.raises(weights.WeightImportError) as error:
        weights.from_torchvision(state, 'fcn8s_resnet50')
    assert error.value.missing == ['layer3.2.conv1.weight']
    assert error.value.unexpected == ['layer5.0.conv1.weight']
    assert error.value.mismatched == [('layer1.0.bn1.running_var', (64,), (65,))]
    assert 'layer1.0.bn1.running_var: expected (64,), got (65,)' in str(error.value)
    # Read from a file, the error names the file.
    path = tmp_path / 'broken.npz'
    np.savez(path, **state)
    with pytest.raises(weights.WeightImportError, match='broken.npz'):
        weights.load_pretrained(path, model_name='fcn8s_resnet50')


def test_wrong_architecture_is_named():
    with pytest.raises(weights.WeightImportError, match='ResNet-101') as error:
        weights.from_torchvision(_torchvision_resnet(101), 'fcn_resnet50')
    assert 'layer3.22.conv1.weight' in error.value.unexpected
    vgg = {'features.0.weight': np.zeros((64, 3, 3, 3), 'f4')}
    with pytest.raises(weights.WeightImportError, match='VGG.*resnet50 encoder'):
        weights.from_torchvision(vgg, 'unet_resnet50')
    with pytest.raises(ValueError, match="No pretrained weights can initialise model 'unet'"):
        weights.from_torchvision(vgg, 'unet')


def test_merge_reports_missing_backbone_leaves(resnet50_state):
    pretrained = weights.from_torchvision(resnet50_state, 'fcn_resnet50')
    del pretrained['params']['backbone']['layer4_2']['conv3']
    abstract = _abstract_variables('fcn_resnet50')
    with pytest.raises(weights.WeightImportError, match='layer4_2/conv3/kernel'):
        weights.merge_pretrained(abstract, pretrained)
    merged = weights.merge_pretrained(abstract, pretrained, strict_backbone=False)
    assert "['params']['backbone']['layer4_2']['conv3']['kernel']" in _unfilled(merged)


# --------------------------------------------------------------------------------------------
# Converted checkpoints and the CLI.
# --------------------------------------------------------------------------------------------


def test_cli_converts_to_an_orbax_checkpoint(resnet50_state, tmp_path):
    source = tmp_path / 'resnet50.safetensors'
    save_file(resnet50_state, str(source))
    output = tmp_path / 'converted'
    command = [sys.executable, '-m', 'fcn_unet_jax.weights.convert', f'--input={source}']
    command += ['--model=fcn_resnet50', f'--output={output}', '--num_classes=21']
    subprocess.run(command, check=True, capture_output=True, cwd=REPO_ROOT)

    with open(output / 'pretrained.json') as f:
        metadata = json.load(f)
    assert metadata['model'] == 'fcn_resnet50'
    assert metadata['imported'] == 'backbone'
    assert metadata['skipped'] == ['fc.bias', 'fc.weight']
    assert weights.is_pretrained_checkpoint(output)
    assert not weights.is_pretrained_checkpoint(tmp_path)
    restored = weights.load_pretrained(output, model_name='fcn_resnet50')
    expected = weights.from_torchvision(resnet50_state, 'fcn_resnet50')
    jax.tree.map(np.testing.assert_array_equal, restored, expected)
    # The same file converted on the fly gives the same variables.
    direct = weights.load_pretrained(source, model_name='fcn_resnet50')
    jax.tree.map(np.testing.assert_array_equal, direct, expected)

    with pytest.raises(FileNotFoundError, match='not a converted pretrained checkpoint'):
        weights.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match='needs model_name'):
        weights.load_pretrained(source)
    with pytest.raises(ValueError, match="for model 'fcn_resnet50'.*builds 'fcn_resnet101'"):
        weights.load_pretrained(output, model_name='fcn_resnet101')
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main([f'--input={source}', '--model=fcn_resnet50', f'--output={output}'])
    assert exit_info.value.code == 1


# --------------------------------------------------------------------------------------------
# Keras Applications.
# --------------------------------------------------------------------------------------------


def _randomise(model, seed):
    """Random biases and BN parameters/statistics, so that every imported tensor matters."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            c = weights[0].shape
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c),
                    rng.normal(0, 0.1, c),
                    rng.normal(0, 0.1, c),
                    rng.uniform(0.5, 1.5, c),
                ]
            )
        elif len(weights) == 2:
            layer.set_weights([weights[0], rng.normal(0, 0.1, weights[1].shape)])


def _decode(name):
    return name.decode() if isinstance(name, bytes) else name


def _applications_layout(full_h5, output, rename=lambda name: name):
    """Rewrites a `model.save('x.h5')` file in the layout of keras.applications' downloads.

    Those files keep the legacy layer groups at the root and name weights Keras-2 style
    (`<layer>/<weight>:0`); `rename` maps layer names (e.g. to Keras 2.2's ResNet names).
    """
    with h5py.File(full_h5, 'r') as src, h5py.File(output, 'w') as dst:
        weights = src['model_weights']
        names = [_decode(n) for n in weights.attrs['layer_names']]
        dst.attrs['layer_names'] = [rename(n).encode() for n in names]
        for name in names:
            group = dst.create_group(rename(name))
            new_names = []
            for weight in map(_decode, weights[name].attrs['weight_names']):
                new_names.append(f'{rename(name)}/{weight.split("/")[-1]}:0')
                group.create_dataset(new_names[-1], data=weights[name][weight][()])
            group.attrs['weight_names'] = [n.encode() for n in new_names]


def _save_all_layouts(model, directory, rename=lambda name: name):
    paths = {
        'keras3': directory / 'model.weights.h5',
        'save_h5': directory / 'model.h5',
        'keras_archive': directory / 'model.keras',
        'applications': directory / 'applications.h5',
    }
    model.save_weights(paths['keras3'])
    model.save(paths['save_h5'])
    model.save(paths['keras_archive'])
    _applications_layout(paths['save_h5'], paths['applications'], rename)
    return paths


def _run_encoder(encoder, pretrained, x):
    return encoder.apply(_backbone(pretrained), jnp.asarray(x), train=False)[32]


def test_keras_vgg16_parity_in_every_layout(tmp_path):
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(64, 64, 3))
    _randomise(model, seed=0)
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype('f4')
    reference = model.predict(x, verbose=0)  # block5_pool
    paths = _save_all_layouts(model, tmp_path)
    pretrained = weights.from_keras(paths['keras3'], 'unet_vgg16')
    for layout in ('save_h5', 'keras_archive', 'applications'):
        other = weights.from_keras(paths[layout], 'unet_vgg16')
        jax.tree.map(np.testing.assert_array_equal, other, pretrained)
    diff = assert_relative_close(_run_encoder(VGG16(fcn=False), pretrained, x), reference)
    print('Keras VGG16 block5_pool: relative max diff', diff)

    merged = weights.merge_pretrained(_abstract_variables('unet_vgg16'), pretrained)
    assert not [p for p in _unfilled(merged) if 'backbone' in p]
    # A "notop" file has no fc6/fc7: FCN-VGG models need strict_backbone=False for it.
    fcn_pretrained = weights.from_keras(paths['applications'], 'fcn8s_vgg16')
    abstract = _abstract_variables('fcn8s_vgg16')
    with pytest.raises(weights.WeightImportError, match='fc6/fc7'):
        weights.merge_pretrained(abstract, fcn_pretrained)
    merged = weights.merge_pretrained(abstract, fcn_pretrained, strict_backbone=False)
    assert {p for p in _unfilled(merged) if 'backbone' in p} == {
        f"['params']['backbone']['{fc}']['{leaf}']"
        for fc in ('fc6', 'fc7')
        for leaf in ('kernel', 'bias')
    }


def _keras22_resnet_name(name):
    """Keras 2.2's ResNet50 layer names (res2a_branch2a, bn2a_branch2a, bn_conv1)."""
    if name == 'conv1_conv':
        return 'conv1'
    if name == 'conv1_bn':
        return 'bn_conv1'
    parts = name.split('_')  # conv{s}_block{b}_{j}_{conv|bn}
    if len(parts) != 4 or not parts[1].startswith('block') or parts[3] not in ('conv', 'bn'):
        return name
    stage, block = parts[0][-1], chr(ord('a') + int(parts[1][5:]) - 1)
    branch = {'0': '1', '1': '2a', '2': '2b', '3': '2c'}[parts[2]]
    return f'{"res" if parts[3] == "conv" else "bn"}{stage}{block}_branch{branch}'


def test_keras_resnet50_parity(tmp_path):
    model = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 64, 3))
    _randomise(model, seed=0)
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype('f4')
    reference = model.predict(x, verbose=0)  # conv5_block3_out
    paths = _save_all_layouts(model, tmp_path, rename=_keras22_resnet_name)
    pretrained = weights.from_keras(paths['keras3'], 'fcn_resnet50')
    for layout in ('save_h5', 'applications'):
        other = weights.from_keras(paths[layout], 'fcn_resnet50')
        jax.tree.map(np.testing.assert_array_equal, other, pretrained)
    ours = _run_encoder(ResNet(depth=50, variant='caffe'), pretrained, x)
    diff = assert_relative_close(ours, reference)
    print('Keras ResNet50 conv5_block3_out: relative max diff', diff)

    for name in ('fcn_resnet50', 'fcn8s_resnet50', 'unet_resnet50'):
        abstract = _abstract_variables(name, resnet_variant='caffe')
        merged = weights.merge_pretrained(abstract, pretrained)
        assert not [p for p in _unfilled(merged) if 'backbone' in p]
    with pytest.raises(weights.WeightImportError, match="resnet_variant='caffe'"):
        weights.merge_pretrained(_abstract_variables('fcn_resnet50'), pretrained)
    with pytest.raises(weights.WeightImportError, match='holds a Keras ResNet50'):
        weights.from_keras(paths['keras3'], 'unet_vgg16')


@pytest.mark.slow
def test_keras_vgg16_fc_layers_become_fc6_fc7(tmp_path):
    """fc1/fc2 of an include_top VGG16 file become fc6 (7x7 VALID conv) and fc7 (1x1 conv).

    Keras' Flatten on channels-last features is a row-major reshape over (H, W, C), so the
    reference here is that reshape followed by the two Dense layers in numpy (building the
    Keras top itself would hold 470 MB of fc weights several times over).
    """
    conv = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    conv.save(tmp_path / 'conv.h5')
    # The layout of keras.applications' include_top download: conv blocks, flatten, fc1, fc2.
    _applications_layout(tmp_path / 'conv.h5', tmp_path / 'vgg16.h5')
    rng = np.random.default_rng(0)
    # fc1 of rank 16 (every input row still distinct, so a wrong flattening order shows)
    # because drawing 100M random numbers dominates the test's time otherwise.
    fc1 = rng.standard_normal((7 * 7 * 512, 16), 'f4') @ rng.standard_normal((16, 4096), 'f4')
    fc = {
        'fc1': (fc1 * 0.01, rng.normal(0, 0.1, 4096)),
        'fc2': (rng.standard_normal((4096, 4096), 'f4') * 0.02, rng.normal(0, 0.1, 4096)),
    }
    del fc1
    with h5py.File(tmp_path / 'vgg16.h5', 'a') as f:
        names = [_decode(n).encode() for n in f.attrs['layer_names']]
        for layer, (kernel, bias) in fc.items():
            group = f.create_group(layer)
            group.create_dataset(f'{layer}/kernel:0', data=kernel)
            group.create_dataset(f'{layer}/bias:0', data=bias.astype('f4'))
            group.attrs['weight_names'] = [f'{layer}/kernel:0'.encode(), f'{layer}/bias:0'.encode()]
            names.append(layer.encode())
        f.attrs['layer_names'] = names
    features = rng.normal(size=(1, 7, 7, 512)).astype('f4')
    reference = features.reshape(1, -1)
    for kernel, bias in fc.values():
        reference = np.maximum(reference @ kernel + bias.astype('f4'), 0)

    pretrained = weights.from_keras(tmp_path / 'vgg16.h5', 'fcn32s_vgg16')
    merged = weights.merge_pretrained(_abstract_variables('fcn32s_vgg16'), pretrained)
    assert not [p for p in _unfilled(merged) if 'backbone' in p]
    params = pretrained['params']['backbone']
    fc6 = nn.Conv(4096, (7, 7), padding='VALID').apply({'params': params['fc6']}, features)
    fc7 = nn.Conv(4096, (1, 1)).apply({'params': params['fc7']}, nn.relu(fc6))
    diff = assert_relative_close(nn.relu(fc7).reshape(1, 4096), reference)
    print('Keras VGG16 fc2 as fc7: relative max diff', diff)


def test_trainer_init_from_a_converted_checkpoint(resnet50_state, tmp_path):
    source = tmp_path / 'resnet50.npz'
    np.savez(source, **resnet50_state)
    converted = tmp_path / 'converted'
    weights.convert_file(source, 'fcn8s_resnet50', converted)
    config = default.get_config()
    config.model.name = 'fcn8s_resnet50'
    config.model.num_classes = 21
    config.init_from = str(converted)
    initial = _abstract_variables('fcn8s_resnet50')

    merged = train.init_from(config, initial)

    expected = weights.from_torchvision(resnet50_state, 'fcn8s_resnet50')
    jax.tree.map(np.testing.assert_array_equal, _backbone(merged), _backbone(expected))
    # The score layers are not in an ImageNet backbone: they keep their initialisation.
    assert not any('backbone' in path for path in _unfilled(merged))
    assert any('score_layer4' in path for path in _unfilled(merged))

    config.model.name = 'fcn8s_resnet101'
    with pytest.raises(ValueError, match="for model 'fcn8s_resnet50'.*builds 'fcn8s_resnet101'"):
        train.init_from(config, _abstract_variables('fcn8s_resnet101'))
