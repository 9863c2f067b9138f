"""Keras Applications VGG16 / ResNet50: every HDF5 layout, parity, fit and conversion.

The reference models are built with Keras (random weights, randomised biases and BN
statistics, so every imported tensor matters) and saved in each layout the reader handles;
our encoder must reproduce Keras' output to 1e-4 of its scale.
"""

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from fcn_unet_jax import weights
from fcn_unet_jax.models.resnet import ResNet
from fcn_unet_jax.models.vgg import VGG16
from tests.weights.common import (
    abstract_variables,
    assert_relative_close,
    backbone,
    model_config,
    unfilled,
)


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
    return encoder.apply(backbone(pretrained), jnp.asarray(x), train=False)[32]


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

    merged = weights.merge_pretrained(abstract_variables('unet_vgg16'), pretrained)
    assert not [p for p in unfilled(merged) if 'backbone' in p]
    # A "notop" file has no fc6/fc7: FCN-VGG models need strict_backbone=False for it.
    fcn_pretrained = weights.from_keras(paths['applications'], 'fcn8s_vgg16')
    abstract = abstract_variables('fcn8s_vgg16')
    with pytest.raises(weights.WeightImportError, match='fc6/fc7'):
        weights.merge_pretrained(abstract, fcn_pretrained)
    merged = weights.merge_pretrained(abstract, fcn_pretrained, strict_backbone=False)
    assert {p for p in unfilled(merged) if 'backbone' in p} == {
        f"['params']['backbone']['{fc}']['{leaf}']"
        for fc in ('fc6', 'fc7')
        for leaf in ('kernel', 'bias')
    }
    # Training cannot pass strict_backbone=False, so the converter refuses the notop file
    # for an FCN-VGG model before writing anything, and converts it for the U-Net.
    with pytest.raises(weights.WeightImportError, match='fc6/fc7'):
        weights.convert_file(paths['applications'], 'fcn8s_vgg16', tmp_path / 'fcn')
    assert not (tmp_path / 'fcn').exists()
    weights.convert_file(paths['keras_archive'], 'unet_vgg16', tmp_path / 'unet')
    restored = weights.load_pretrained(tmp_path / 'unet', model_name='unet_vgg16')
    jax.tree.map(np.testing.assert_array_equal, restored, pretrained)


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
        abstract = abstract_variables(name, resnet_variant='caffe')
        merged = weights.merge_pretrained(abstract, pretrained)
        assert not [p for p in unfilled(merged) if 'backbone' in p]
    with pytest.raises(weights.WeightImportError, match="resnet_variant='caffe'"):
        weights.merge_pretrained(abstract_variables('fcn_resnet50'), pretrained)
    with pytest.raises(weights.WeightImportError, match='holds a Keras ResNet50'):
        weights.from_keras(paths['keras3'], 'unet_vgg16')

    # The converter checks against the Caffe-style ResNet that Keras' weights need; training
    # then takes them with resnet_variant='caffe' and refuses them without it.
    converted = tmp_path / 'converted'
    weights.convert_file(paths['applications'], 'fcn8s_resnet50', converted)
    config = model_config('fcn8s_resnet50', resnet_variant='caffe')
    abstract = abstract_variables('fcn8s_resnet50', resnet_variant='caffe')
    merged = weights.initialize_from(converted, abstract, config)
    jax.tree.map(np.testing.assert_array_equal, backbone(merged), backbone(pretrained))
    with pytest.raises(weights.WeightImportError, match="resnet_variant='caffe'"):
        weights.initialize_from(
            converted, abstract_variables('fcn8s_resnet50'), model_config('fcn8s_resnet50')
        )


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
    merged = weights.merge_pretrained(abstract_variables('fcn32s_vgg16'), pretrained)
    assert not [p for p in unfilled(merged) if 'backbone' in p]
    params = pretrained['params']['backbone']
    fc6 = nn.Conv(4096, (7, 7), padding='VALID').apply({'params': params['fc6']}, features)
    fc7 = nn.Conv(4096, (1, 1)).apply({'params': params['fc7']}, nn.relu(fc6))
    diff = assert_relative_close(nn.relu(fc7).reshape(1, 4096), reference)
    print('Keras VGG16 fc2 as fc7: relative max diff', diff)
