"""PyTorch sources: torchvision ResNet / VGG16 / FCN-ResNet and smp Unet state dicts.

`from_torchvision` recognises the source from its keys (an ImageNet classifier, a
torchvision `fcn_resnet*`, or a segmentation_models_pytorch `Unet` with a ResNet-50 or VGG16
encoder), builds the rule table for the model named and applies it. When the source has the
model's head (an FCN checkpoint for `fcn_resnet*`, an smp Unet for `unet_resnet50` /
`unet_vgg16`) the whole model is imported, otherwise only the backbone.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fcn_unet_jax.models import resnet, vgg
from fcn_unet_jax.weights import readers
from fcn_unet_jax.weights.errors import WeightImportError
from fcn_unet_jax.weights.rules import (
    RESNET_STEM_WIDTH,
    Imported,
    Rule,
    Variables,
    apply_rules,
    model_parts,
    oihw_to_hwio,
    resnet_blocks,
    resnet_depth,
    resnet_stage_channels,
    vgg16_convs,
)

# smp's default decoder widths, used where a checkpoint's block cannot say otherwise.
SMP_DECODER_CHANNELS = (256, 128, 64, 32, 16)
# torchvision's VGG16 classifier: pool5 (512 x 7 x 7) -> 4096 -> 4096 -> 1000.
_VGG_FC = 4096
_VGG_POOL5 = (vgg.VGG16_BLOCKS[-1][1], 7, 7)


def _conv(key: str, path: tuple[str, ...], cin: int, cout: int, k: int, *, bias: bool):
    rules = [Rule(f'{key}.weight', ('params', *path, 'kernel'), (cout, cin, k, k), oihw_to_hwio)]
    if bias:
        rules.append(Rule(f'{key}.bias', ('params', *path, 'bias'), (cout,)))
    return rules


def _bn(key: str, path: tuple[str, ...], c: int) -> list[Rule]:
    return [
        Rule(f'{key}.weight', ('params', *path, 'scale'), (c,)),
        Rule(f'{key}.bias', ('params', *path, 'bias'), (c,)),
        Rule(f'{key}.running_mean', ('batch_stats', *path, 'mean'), (c,)),
        Rule(f'{key}.running_var', ('batch_stats', *path, 'var'), (c,)),
    ]


def _resnet(prefix: str, depth: int) -> list[Rule]:
    stem = RESNET_STEM_WIDTH
    rules = _conv(f'{prefix}conv1', ('backbone', 'conv1'), 3, stem, 7, bias=False)
    rules += _bn(f'{prefix}bn1', ('backbone', 'bn1'), stem)
    for stage, i, cin, width, cout in resnet_blocks(depth):
        key, path = f'{prefix}layer{stage}.{i}', ('backbone', f'layer{stage}_{i}')
        shapes = ((cin, width, 1), (width, width, 3), (width, cout, 1))
        for j, (a, b, k) in enumerate(shapes, 1):
            rules += _conv(f'{key}.conv{j}', (*path, f'conv{j}'), a, b, k, bias=False)
            rules += _bn(f'{key}.bn{j}', (*path, f'bn{j}'), b)
        if i == 0:
            rules += _conv(
                f'{key}.downsample.0', (*path, 'downsample_conv'), cin, cout, 1, bias=False
            )
            rules += _bn(f'{key}.downsample.1', (*path, 'downsample_bn'), cout)
    return rules


def _vgg16(prefix: str) -> list[Rule]:
    rules = []
    for b, i, index, cin, cout in vgg16_convs():
        rules += _conv(f'{prefix}{index}', ('backbone', f'conv{b}_{i}'), cin, cout, 3, bias=True)
    return rules


def _vgg16_fc() -> list[Rule]:
    # torchvision flattens pool5 as C,H,W: row-major (4096, 512, 7, 7) is exactly that order.
    return [
        Rule(
            'classifier.0.weight',
            ('params', 'backbone', 'fc6', 'kernel'),
            (_VGG_FC, int(np.prod(_VGG_POOL5))),
            lambda w: oihw_to_hwio(w.reshape(_VGG_FC, *_VGG_POOL5)),
        ),
        Rule('classifier.0.bias', ('params', 'backbone', 'fc6', 'bias'), (_VGG_FC,)),
        Rule(
            'classifier.3.weight',
            ('params', 'backbone', 'fc7', 'kernel'),
            (_VGG_FC, _VGG_FC),
            lambda w: oihw_to_hwio(w.reshape(_VGG_FC, _VGG_FC, 1, 1)),
        ),
        Rule('classifier.3.bias', ('params', 'backbone', 'fc7', 'bias'), (_VGG_FC,)),
    ]


def _fcn_head(key: str, module: str, cin: int, num_classes: int) -> list[Rule]:
    """torchvision's FCNHead: 3x3 conv (no bias), BN, ReLU, dropout, 1x1 conv to classes."""
    mid = cin // 4
    rules = _conv(f'{key}.0', (module, 'conv'), cin, mid, 3, bias=False)
    rules += _bn(f'{key}.1', (module, 'bn'), mid)
    out = _conv(f'{key}.4', (module, 'out'), mid, num_classes, 1, bias=True)
    return rules + [dataclasses.replace(r, class_dependent=True) for r in out]


def _smp_encoder_channels(encoder: str) -> tuple[int, ...]:
    """Channels of smp's encoder features at strides 2, 4, 8, 16, 32.

    smp drops the full-resolution feature; ResNet's stride-2 feature is the stem, VGG's is
    block 2 (after pool1), and VGG's stride-32 feature is pool5 of block 5.
    """
    if encoder.startswith('resnet'):
        return (RESNET_STEM_WIDTH, *(resnet_stage_channels(s) for s in range(1, 5)))
    blocks = [channels for _, channels in vgg.VGG16_BLOCKS]
    return (*blocks[1:], blocks[-1])


def _smp_unet_decoder(
    encoder: str, decoder_channels: Sequence[int], num_classes: int
) -> list[Rule]:
    """segmentation_models_pytorch's Unet decoder (batch norm, no attention).

    smp adds a centre block (two conv-BN-ReLU on the deepest feature) for VGG encoders only.
    """
    # The decoder starts from the deepest feature and meets the others on the way up.
    features = _smp_encoder_channels(encoder)[::-1]
    ins = [features[0], *decoder_channels[:-1]]
    skips = [*features[1:], 0]
    rules = []
    if encoder == 'vgg16':
        for i in (1, 2):
            key, path = f'decoder.center.{i - 1}', ('decoder', 'center')
            c = features[0]
            rules += _conv(f'{key}.0', (*path, f'conv{i}'), c, c, 3, bias=False)
            rules += _bn(f'{key}.1', (*path, f'bn{i}'), c)
    for j, (cin, skip, cout) in enumerate(zip(ins, skips, decoder_channels, strict=True)):
        key, path = f'decoder.blocks.{j}', ('decoder', f'block{j}')
        rules += _conv(f'{key}.conv1.0', (*path, 'conv1'), cin + skip, cout, 3, bias=False)
        rules += _bn(f'{key}.conv1.1', (*path, 'bn1'), cout)
        rules += _conv(f'{key}.conv2.0', (*path, 'conv2'), cout, cout, 3, bias=False)
        rules += _bn(f'{key}.conv2.1', (*path, 'bn2'), cout)
    head = _conv(
        'segmentation_head.0',
        ('segmentation_head',),
        decoder_channels[-1],
        num_classes,
        3,
        bias=True,
    )
    return rules + [dataclasses.replace(r, class_dependent=True) for r in head]


def _smp_decoder_channels(weights: Mapping[str, np.ndarray]) -> list[int]:
    """Reads the decoder widths from the checkpoint (smp's default where a block is absent)."""
    channels = list(SMP_DECODER_CHANNELS)
    for j in range(len(channels)):
        key = f'decoder.blocks.{j}.conv2.0.weight'
        if key in weights:
            channels[j] = int(weights[key].shape[0])
    return channels


def _has(weights: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in weights)


def _recognise(weights: Mapping[str, np.ndarray]) -> tuple[str, str, str]:
    """Recognises a state dict: returns (kind, encoder family, encoder key prefix)."""
    if _has(weights, 'decoder.blocks.'):
        if _has(weights, 'encoder.features.'):
            return 'smp_unet', 'vgg', 'encoder.features.'
        if _has(weights, 'encoder.layer1.'):
            return 'smp_unet', 'resnet', 'encoder.'
    if _has(weights, 'backbone.layer1.') and _has(weights, 'classifier.'):
        return 'torchvision_fcn', 'resnet', 'backbone.'
    if _has(weights, 'layer1.'):
        return 'classifier', 'resnet', ''
    if _has(weights, 'features.'):
        return 'classifier', 'vgg', 'features.'
    raise WeightImportError(
        'Unrecognised state dict: expected a torchvision ResNet-50/101 or VGG16, a torchvision '
        'fcn_resnet50/101 or a segmentation_models_pytorch Unet (resnet50/vgg16 encoder). '
        f'First keys: {", ".join(list(weights)[:8])}'
    )


def _class_count(weights: Mapping[str, np.ndarray], key: str) -> int | None:
    return int(weights[key].shape[0]) if key in weights else None


def _depth_hint(weights: Mapping[str, np.ndarray], prefix: str, encoder: str, model_name: str):
    """A hint when the file's ResNet depth (read from layer3's block count) is not the model's."""
    layer3 = f'{prefix}layer3.'
    blocks = {k[len(layer3) :].split('.')[0] for k in weights if k.startswith(layer3)}
    depths = {layers[2]: depth for depth, layers in resnet.RESNET_LAYERS.items()}
    depth = depths.get(len(blocks))
    if depth is not None and f'resnet{depth}' != encoder:
        return [f'the file holds a ResNet-{depth}; {model_name!r} uses {encoder}.']
    return []


def import_torchvision(
    state_dict: Mapping[str, Any], model_name: str, *, num_classes: int | None, origin: str
) -> Imported:
    """`from_torchvision`, returning what was imported besides the variables.

    Args:
        state_dict: see `from_torchvision`.
        model_name: see `from_torchvision`.
        num_classes: see `from_torchvision`.
        origin: the source, for messages (e.g. the file name).

    Returns:
        The variables, their scope, the imported class count and the skipped tensors.
    """
    encoder, head = model_parts(model_name)
    weights = readers.strip_prefix(readers.as_numpy_dict(state_dict), 'module.')
    kind, family, prefix = _recognise(weights)
    if not encoder.startswith(family):
        raise WeightImportError(
            f'{origin} holds a {family.upper()} model; {model_name!r} has a {encoder} encoder.'
        )
    hints = []
    if family == 'resnet':
        rules = _resnet(prefix, resnet_depth(encoder))
        hints = _depth_hint(weights, prefix, encoder, model_name)
    else:
        rules = _vgg16(prefix)
    # Source tensors this model has no place for: recognised, skipped and reported.
    skip: tuple[str, ...] = ('fc.',) if family == 'resnet' else ('classifier.',)
    full = False
    if kind == 'classifier' and head == 'fcn_vgg':
        skip = ('classifier.6.',)
        if 'classifier.0.weight' in weights:
            rules += _vgg16_fc()
    elif kind == 'torchvision_fcn':
        skip = ('classifier.', 'aux_classifier.')
        if head == 'fcn_head':
            full, skip = True, ()
            classes = num_classes or _class_count(weights, 'classifier.4.weight') or 21
            rules += _fcn_head('classifier', 'classifier', resnet_stage_channels(4), classes)
            if _has(weights, 'aux_classifier.'):
                aux_channels = resnet_stage_channels(3)
                rules += _fcn_head('aux_classifier', 'aux_classifier', aux_channels, classes)
    elif kind == 'smp_unet':
        skip = ('decoder.', 'segmentation_head.')
        if head == 'smp_unet':
            full, skip = True, ()
            classes = num_classes or _class_count(weights, 'segmentation_head.0.weight') or 1
            rules += _smp_unet_decoder(encoder, _smp_decoder_channels(weights), classes)
    return apply_rules(
        weights,
        rules,
        skip,
        full=full,
        num_classes=num_classes,
        origin=origin,
        model_name=model_name,
        hints=hints,
    )


def from_torchvision(
    state_dict: Mapping[str, Any], model_name: str, *, num_classes: int | None = None
) -> Variables:
    """Converts a torchvision or segmentation_models_pytorch state dict to Flax variables.

    Recognised sources: torchvision ImageNet `resnet50`, `resnet101` and `vgg16` (its first
    two classifier layers become fc6/fc7 for the FCN-VGG models), torchvision `fcn_resnet50` /
    `fcn_resnet101` (with or without the aux head) and smp `Unet` with a `resnet50` or `vgg16`
    encoder. When the source has the model's head (an FCN checkpoint for `fcn_resnet*`, an smp
    Unet for `unet_resnet50` / `unet_vgg16`) the whole model is imported, otherwise only the
    backbone: the result then holds only `backbone` variables, and `merge_pretrained` keeps the
    model's freshly initialised head.

    Args:
        state_dict: name -> array (numpy, or torch tensors).
        model_name: a key of `fcn_unet_jax.models.MODELS`, e.g. 'fcn_resnet50'.
        num_classes: the model's class count. If it differs from the checkpoint's, the output
            layers are left out (fine-tuning on another label set); None keeps them.

    Returns:
        {'params': ..., 'batch_stats': ...} nested dicts of float32 numpy arrays, possibly
        covering only part of the model.

    Raises:
        WeightImportError: the state dict does not fit (lists missing, unexpected and
            misshaped keys), or its encoder is not the model's.
        ValueError: `model_name` has no pretrained encoder.
    """
    return import_torchvision(
        state_dict, model_name, num_classes=num_classes, origin='the state dict'
    ).variables
