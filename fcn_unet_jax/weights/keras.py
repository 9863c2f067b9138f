"""Keras Applications sources: `VGG16` and `ResNet50` weights files, read without Keras.

Keras kernels are already HWIO, so the rules only rename. Keras' ResNet50 is the original
Caffe-style ResNet (stride in the first 1x1 conv of a stage, biases on convs), so a model
importing it is built with `config.model.resnet_variant='caffe'`. The ImageNet classifier is
never imported; VGG16's fc1/fc2, when present, become fc6/fc7 of the FCN-VGG models.
"""

import os
import re

from fcn_unet_jax.weights import readers
from fcn_unet_jax.weights.errors import WeightImportError
from fcn_unet_jax.weights.rules import (
    RESNET_STEM_WIDTH,
    Imported,
    Rule,
    Variables,
    apply_rules,
    model_parts,
    resnet_blocks,
    vgg16_convs,
)

# Keras' VGG16 top: Flatten of pool5 (7 x 7 x 512), fc1 and fc2 of 4096, predictions.
_VGG_FC = 4096
_VGG_POOL5 = (7, 7, 512)
# The first weight of each Keras Applications model: tells which model a file holds.
_FIRST_WEIGHT = {'VGG16': 'block1_conv1/kernel', 'ResNet50': 'conv1_conv/kernel'}


def _conv(layer: str, path: tuple[str, ...], cin: int, cout: int, k: int) -> list[Rule]:
    return [
        Rule(f'{layer}/kernel', ('params', *path, 'kernel'), (k, k, cin, cout)),
        Rule(f'{layer}/bias', ('params', *path, 'bias'), (cout,)),
    ]


def _bn(layer: str, path: tuple[str, ...], c: int) -> list[Rule]:
    return [
        Rule(f'{layer}/gamma', ('params', *path, 'scale'), (c,)),
        Rule(f'{layer}/beta', ('params', *path, 'bias'), (c,)),
        Rule(f'{layer}/moving_mean', ('batch_stats', *path, 'mean'), (c,)),
        Rule(f'{layer}/moving_variance', ('batch_stats', *path, 'var'), (c,)),
    ]


def _resnet50_name(layer: str) -> str:
    """Maps Keras 2.2-era ResNet50 layer names (`res2a_branch2a`) to `conv2_block1_1_conv`."""
    if layer == 'conv1':
        return 'conv1_conv'
    if layer == 'bn_conv1':
        return 'conv1_bn'
    match = re.fullmatch(r'(res|bn)(\d)([a-z])_branch(1|2a|2b|2c)', layer)
    if not match:
        return layer
    kind, stage, block, branch = match.groups()
    j = {'1': 0, '2a': 1, '2b': 2, '2c': 3}[branch]
    suffix = 'conv' if kind == 'res' else 'bn'
    return f'conv{stage}_block{ord(block) - ord("a") + 1}_{j}_{suffix}'


def _resnet50() -> list[Rule]:
    stem = RESNET_STEM_WIDTH
    rules = _conv('conv1_conv', ('backbone', 'conv1'), 3, stem, 7)
    rules += _bn('conv1_bn', ('backbone', 'bn1'), stem)
    for stage, i, cin, width, cout in resnet_blocks(50):
        # Keras counts stages from the stem (conv1), so torchvision's layer1 is its conv2.
        name, path = f'conv{stage + 1}_block{i + 1}', ('backbone', f'layer{stage}_{i}')
        shapes = ((cin, width, 1), (width, width, 3), (width, cout, 1))
        for j, (a, b, k) in enumerate(shapes, 1):
            rules += _conv(f'{name}_{j}_conv', (*path, f'conv{j}'), a, b, k)
            rules += _bn(f'{name}_{j}_bn', (*path, f'bn{j}'), b)
        if i == 0:
            rules += _conv(f'{name}_0_conv', (*path, 'downsample_conv'), cin, cout, 1)
            rules += _bn(f'{name}_0_bn', (*path, 'downsample_bn'), cout)
    return rules


def _vgg16() -> list[Rule]:
    rules = []
    for b, i, _, cin, cout in vgg16_convs():
        rules += _conv(f'block{b}_conv{i}', ('backbone', f'conv{b}_{i}'), cin, cout, 3)
    return rules


def _vgg16_fc() -> list[Rule]:
    # Keras flattens channels-last (H, W, C), so fc1's kernel reshapes straight to HWIO.
    return [
        Rule(
            'fc1/kernel',
            ('params', 'backbone', 'fc6', 'kernel'),
            (_VGG_POOL5[0] * _VGG_POOL5[1] * _VGG_POOL5[2], _VGG_FC),
            lambda w: w.reshape(*_VGG_POOL5, _VGG_FC),
        ),
        Rule('fc1/bias', ('params', 'backbone', 'fc6', 'bias'), (_VGG_FC,)),
        Rule(
            'fc2/kernel',
            ('params', 'backbone', 'fc7', 'kernel'),
            (_VGG_FC, _VGG_FC),
            lambda w: w.reshape(1, 1, _VGG_FC, _VGG_FC),
        ),
        Rule('fc2/bias', ('params', 'backbone', 'fc7', 'bias'), (_VGG_FC,)),
    ]


def import_keras(h5_path: str | os.PathLike[str], model_name: str) -> Imported:
    """`from_keras`, returning what was imported besides the variables.

    Args:
        h5_path: see `from_keras`.
        model_name: see `from_keras`.

    Returns:
        The backbone variables, their scope ('backbone') and the skipped weights.
    """
    path = os.fspath(h5_path)
    encoder, head = model_parts(model_name)
    raw = readers.read_keras_weights(path)
    origin = repr(path)
    if encoder == 'vgg16':
        rules = _vgg16()
        if head == 'fcn_vgg' and 'fc1/kernel' in raw:
            rules += _vgg16_fc()
        skip = ('fc1/', 'fc2/', 'predictions/')
        first_key = _FIRST_WEIGHT['VGG16']
    elif encoder == 'resnet50':
        raw = {f'{_resnet50_name(k.split("/")[0])}/{k.split("/")[1]}': v for k, v in raw.items()}
        rules = _resnet50()
        skip = ('predictions/', 'fc1000/')
        first_key = _FIRST_WEIGHT['ResNet50']
    else:
        raise ValueError(
            f'Keras Applications has no {encoder} weights for {model_name!r}; use a '
            'torchvision checkpoint with from_torchvision.'
        )
    for other, marker in _FIRST_WEIGHT.items():
        if marker in raw and marker != first_key:
            raise WeightImportError(
                f'{origin} holds a Keras {other}; {model_name!r} has a {encoder} encoder.'
            )
    return apply_rules(
        raw, rules, skip, full=False, num_classes=None, origin=origin, model_name=model_name
    )


def from_keras(h5_path: str | os.PathLike[str], model_name: str) -> Variables:
    """Converts Keras Applications `VGG16` / `ResNet50` weights to Flax backbone variables.

    Reads the file with h5py (Keras itself is not needed): the Keras 3 `.weights.h5` layout,
    the legacy HDF5 layout of the files `keras.applications` downloads (with or without top)
    and of `model.save('x.h5')`, and `.keras` archives. Keras' ResNet50 is the Caffe-style
    ResNet, so the model must be built with `config.model.resnet_variant='caffe'`. The
    ImageNet classifier is never imported; VGG16's fc1/fc2, when present, become fc6/fc7 of
    the FCN-VGG models.

    Args:
        h5_path: the Keras weights file.
        model_name: a key of `fcn_unet_jax.models.MODELS` with a VGG16 or ResNet-50 encoder.

    Returns:
        {'params': ..., 'batch_stats': ...} for the model's `backbone`.

    Raises:
        WeightImportError: the file does not fit (lists missing, unexpected and misshaped
            weights, naming the file).
        ValueError: the model has no encoder that Keras Applications provides.
    """
    return import_keras(h5_path, model_name).variables
