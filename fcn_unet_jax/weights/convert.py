"""Pretrained weights: import torchvision, segmentation_models_pytorch and Keras files.

Conversion is a table of rules, one per source tensor: the source name, the Flax variable it
fills (collection and module path, named as in `fcn_unet_jax.models`), the shape the source
must have and the layout change (PyTorch OIHW convolutions become Flax HWIO; torchvision's
VGG16 classifier, which flattens C,H,W, becomes the fc6/fc7 convolutions). Every import
checks the whole table first and fails with one error listing the missing keys, unexpected
keys and shape mismatches, so a wrong or truncated file never half-initialises a model.

Typical use:

    pretrained = from_torchvision(load_state_dict('resnet50.pth'), 'fcn_resnet50')
    variables = merge_pretrained(model.init(rng, images, train=False), pretrained)

or, once, on the command line (the trainer then starts from `config.init_from=DIR`):

    python -m fcn_unet_jax.weights.convert --input=resnet50.pth --model=fcn_resnet50 --output=DIR

Nothing here downloads anything: every file is given by the user.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from flax import traverse_util

Variables = dict[str, Any]
"""Flax variables: {'params': {...}, 'batch_stats': {...}} as nested dicts of arrays."""

_METADATA_FILE = 'pretrained.json'
_VARIABLES_DIR = 'variables'
_FORMAT = 'fcn_unet_jax.pretrained/1'
_MAX_LISTED = 25  # Names listed per category in an error; the rest are counted.

# Model heads whose weights exist only in the source checkpoint when the model was built with
# the matching option (config.model.aux_head): `merge_pretrained` drops them, rather than
# failing, when the model has no such module.
_OPTIONAL_MODULES = ('aux_classifier',)


class WeightImportError(ValueError):
    """A weights file does not fit the model: lists every missing, unexpected and misshaped key.

    Attributes:
        missing: names the target expects but the source lacks.
        unexpected: names in the source that the target has no place for.
        mismatched: (name, expected shape, shape found) triples.
    """

    def __init__(
        self,
        what: str,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
        hints: Sequence[str] = (),
    ):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        lines = [what]
        for title, items in (
            ('missing keys', self.missing),
            ('unexpected keys', self.unexpected),
            (
                'shape mismatches (expected vs got)',
                [f'{k}: expected {tuple(e)}, got {tuple(g)}' for k, e, g in self.mismatched],
            ),
        ):
            if items:
                lines.append(f'  {title} ({len(items)}):')
                lines.extend(f'    {item}' for item in items[:_MAX_LISTED])
                if len(items) > _MAX_LISTED:
                    lines.append(f'    ... and {len(items) - _MAX_LISTED} more')
        lines.extend(f'  hint: {hint}' for hint in hints)
        super().__init__('\n'.join(lines))


# ----------------------------------------------------------------------------------------------
# Reading files.
# ----------------------------------------------------------------------------------------------


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads a PyTorch-style state dict (name -> array) from a local file.

    `.pth`/`.pt`/`.bin`/`.ckpt` need torch (loaded with `weights_only=True`, so no code in the
    file runs); `.npz` and `.safetensors` are read without it. Checkpoints that wrap the state
    dict (`{'state_dict': ...}` or `{'model': ...}`) and `DataParallel`'s `module.` prefix are
    unwrapped.

    Args:
        path: the weights file.

    Returns:
        The state dict with float32 numpy arrays.

    Raises:
        FileNotFoundError: `path` does not exist.
        ImportError: a torch pickle was given but torch is not installed.
        ValueError: the extension is not one of the supported formats.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'No weights file at {path!r}.')
    suffix = os.path.splitext(path)[1].lower()
    if suffix == '.npz':
        with np.load(path, allow_pickle=False) as data:
            state = {k: data[k] for k in data.files}
    elif suffix == '.safetensors':
        from safetensors.numpy import load_file

        state = load_file(path)
    elif suffix in ('.pth', '.pt', '.bin', '.ckpt'):
        state = _load_torch_file(path)
    else:
        raise ValueError(
            f'Unsupported weights file {path!r}: expected .pth/.pt (torch), .npz or .safetensors '
            '(or .h5/.keras for from_keras).'
        )
    return _strip_prefix(_as_numpy_dict(state), 'module.')


def _load_torch_file(path: str) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f'Reading {path!r} needs PyTorch: `pip install torch`, or convert the file where '
            'torch is available, e.g. `numpy.savez(out, **{k: v.numpy() for k, v in '
            'torch.load(path).items()})` or safetensors.torch.save_file, and pass the .npz or '
            '.safetensors file instead.'
        ) from e
    state = torch.load(path, map_location='cpu', weights_only=True)
    for wrapper in ('state_dict', 'model'):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise ValueError(f'{path!r} holds a {type(state).__name__}, not a state dict.')
    return state


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, 'detach'):  # A torch tensor; bfloat16 has no numpy dtype, hence float().
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _as_numpy_dict(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {str(k): _to_numpy(v) for k, v in state.items()}


def _strip_prefix(state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


# Keras layers store their weights in a fixed order; these are the names of that order for
# the layer types found in VGG16 and ResNet50 (the Keras 3 `.weights.h5` format stores only
# the order, the legacy format names that differ between Keras versions).
_KERAS_WEIGHT_ORDER = {
    1: ('kernel',),
    2: ('kernel', 'bias'),
    4: ('gamma', 'beta', 'moving_mean', 'moving_variance'),
}


def _read_keras_weights(path: str) -> dict[str, np.ndarray]:
    """Reads Keras weights as {'<layer name>/<kernel|bias|gamma|...>': array}.

    Handles the Keras 3 `.weights.h5` layout (`layers/<path>/vars/<i>`, layer name in the
    `name` attribute), the legacy HDF5 layout that `keras.applications` ships and `model.save`
    writes (`layer_names` attribute, `<layer>/<weight name>`; full saves nest it under
    `model_weights`), and `.keras` archives (which hold a `model.weights.h5`).
    """
    import h5py

    if not os.path.isfile(path):
        raise FileNotFoundError(f'No Keras weights file at {path!r}.')
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            source = io.BytesIO(archive.read('model.weights.h5'))
    else:
        source = path
    with h5py.File(source, 'r') as f:
        root = f.get('model_weights', f)
        if 'layer_names' in root.attrs:
            layers = _read_keras_legacy(root)
        elif 'layers' in root:
            layers = _read_keras3(root['layers'])
        else:
            raise ValueError(f'{path!r} is not a Keras weights file (no layer_names or layers).')
    weights = {}
    for layer, arrays in layers.items():
        names = _KERAS_WEIGHT_ORDER.get(len(arrays))
        if names is None:
            raise ValueError(
                f'{path!r}: layer {layer!r} has {len(arrays)} weights; expected a convolution, '
                'dense or batch-normalisation layer.'
            )
        weights.update({f'{layer}/{name}': a for name, a in zip(names, arrays, strict=True)})
    return weights


def _decode(name: bytes | str) -> str:
    return name.decode('utf8') if isinstance(name, bytes) else str(name)


def _read_keras_legacy(root: Any) -> dict[str, list[np.ndarray]]:
    layers = {}
    for layer in map(_decode, root.attrs['layer_names']):
        group = root[layer]
        names = [_decode(n) for n in group.attrs.get('weight_names', [])]
        if names:
            layers[layer] = [np.asarray(group[n]) for n in names]
    return layers


def _read_keras3(group: Any) -> dict[str, list[np.ndarray]]:
    layers = {}

    def visit(_: str, node: Any) -> None:
        if node.name.endswith('/vars') and len(node) and 'name' in node.attrs:
            layers[_decode(node.attrs['name'])] = [
                np.asarray(node[k]) for k in sorted(node, key=int)
            ]

    group.visititems(visit)
    if not layers:
        raise ValueError(
            'Keras 3 weights file without layer names (written by an older Keras 3); re-save it '
            'with the current Keras or with model.save("x.h5").'
        )
    return layers


# ----------------------------------------------------------------------------------------------
# Conversion rules.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One source tensor and the Flax variable it becomes."""

    key: str  # Name in the source (state dict key, or Keras '<layer>/<weight>').
    target: tuple[str, ...]  # (collection, *module path, variable name).
    shape: tuple[int, ...]  # Shape the source tensor must have.
    transform: Callable[[np.ndarray], np.ndarray] = np.asarray
    class_dependent: bool = False  # An output layer whose size is the number of classes.


def _oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))


def _torch_conv(key: str, path: tuple[str, ...], cin: int, cout: int, k: int, *, bias: bool):
    rules = [_Rule(f'{key}.weight', ('params', *path, 'kernel'), (cout, cin, k, k), _oihw_to_hwio)]
    if bias:
        rules.append(_Rule(f'{key}.bias', ('params', *path, 'bias'), (cout,)))
    return rules


def _torch_bn(key: str, path: tuple[str, ...], c: int) -> list[_Rule]:
    return [
        _Rule(f'{key}.weight', ('params', *path, 'scale'), (c,)),
        _Rule(f'{key}.bias', ('params', *path, 'bias'), (c,)),
        _Rule(f'{key}.running_mean', ('batch_stats', *path, 'mean'), (c,)),
        _Rule(f'{key}.running_var', ('batch_stats', *path, 'var'), (c,)),
    ]


def _keras_conv(layer: str, path: tuple[str, ...], cin: int, cout: int, k: int) -> list[_Rule]:
    return [
        _Rule(f'{layer}/kernel', ('params', *path, 'kernel'), (k, k, cin, cout)),
        _Rule(f'{layer}/bias', ('params', *path, 'bias'), (cout,)),
    ]


def _keras_bn(layer: str, path: tuple[str, ...], c: int) -> list[_Rule]:
    return [
        _Rule(f'{layer}/gamma', ('params', *path, 'scale'), (c,)),
        _Rule(f'{layer}/beta', ('params', *path, 'bias'), (c,)),
        _Rule(f'{layer}/moving_mean', ('batch_stats', *path, 'mean'), (c,)),
        _Rule(f'{layer}/moving_variance', ('batch_stats', *path, 'var'), (c,)),
    ]


_RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_RESNET_WIDTHS = (64, 128, 256, 512)
_VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
_BACKBONE = ('backbone',)


def _resnet_layout(depth: int) -> Iterable[tuple[int, int, int, int, int]]:
    """Yields (stage 1..4, block index, input channels, width, output channels)."""
    cin = 64
    for stage, (blocks, width) in enumerate(
        zip(_RESNET_BLOCKS[depth], _RESNET_WIDTHS, strict=True), 1
    ):
        for i in range(blocks):
            yield stage, i, cin, width, 4 * width
            cin = 4 * width


def _torch_resnet(prefix: str, depth: int) -> list[_Rule]:
    rules = _torch_conv(f'{prefix}conv1', ('backbone', 'conv1'), 3, 64, 7, bias=False)
    rules += _torch_bn(f'{prefix}bn1', ('backbone', 'bn1'), 64)
    for stage, i, cin, width, cout in _resnet_layout(depth):
        key, path = f'{prefix}layer{stage}.{i}', ('backbone', f'layer{stage}_{i}')
        shapes = ((cin, width, 1), (width, width, 3), (width, cout, 1))
        for j, (a, b, k) in enumerate(shapes, 1):
            rules += _torch_conv(f'{key}.conv{j}', (*path, f'conv{j}'), a, b, k, bias=False)
            rules += _torch_bn(f'{key}.bn{j}', (*path, f'bn{j}'), b)
        if i == 0:
            rules += _torch_conv(
                f'{key}.downsample.0', (*path, 'downsample_conv'), cin, cout, 1, bias=False
            )
            rules += _torch_bn(f'{key}.downsample.1', (*path, 'downsample_bn'), cout)
    return rules


def _keras_resnet50_name(layer: str) -> str:
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


def _keras_resnet50() -> list[_Rule]:
    rules = _keras_conv('conv1_conv', ('backbone', 'conv1'), 3, 64, 7)
    rules += _keras_bn('conv1_bn', ('backbone', 'bn1'), 64)
    for stage, i, cin, width, cout in _resnet_layout(50):
        name, path = f'conv{stage + 1}_block{i + 1}', ('backbone', f'layer{stage}_{i}')
        shapes = ((cin, width, 1), (width, width, 3), (width, cout, 1))
        for j, (a, b, k) in enumerate(shapes, 1):
            rules += _keras_conv(f'{name}_{j}_conv', (*path, f'conv{j}'), a, b, k)
            rules += _keras_bn(f'{name}_{j}_bn', (*path, f'bn{j}'), b)
        if i == 0:
            rules += _keras_conv(f'{name}_0_conv', (*path, 'downsample_conv'), cin, cout, 1)
            rules += _keras_bn(f'{name}_0_bn', (*path, 'downsample_bn'), cout)
    return rules


def _vgg16_layers() -> Iterable[tuple[int, int, int, int, int]]:
    """Yields (block 1..5, conv 1..3, index in torchvision's `features`, in, out channels)."""
    index, cin = 0, 3
    for b, widths in enumerate(_VGG16_BLOCKS, 1):
        for i, cout in enumerate(widths, 1):
            yield b, i, index, cin, cout
            index += 2  # Conv2d, ReLU.
            cin = cout
        index += 1  # MaxPool2d.


def _torch_vgg16(prefix: str) -> list[_Rule]:
    rules = []
    for b, i, index, cin, cout in _vgg16_layers():
        rules += _torch_conv(
            f'{prefix}{index}', ('backbone', f'conv{b}_{i}'), cin, cout, 3, bias=True
        )
    return rules


def _torch_vgg16_fc() -> list[_Rule]:
    # torchvision flattens pool5 as C,H,W: row-major (4096, 512, 7, 7) is exactly that order.
    return [
        _Rule(
            'classifier.0.weight',
            ('params', 'backbone', 'fc6', 'kernel'),
            (4096, 512 * 7 * 7),
            lambda w: _oihw_to_hwio(w.reshape(4096, 512, 7, 7)),
        ),
        _Rule('classifier.0.bias', ('params', 'backbone', 'fc6', 'bias'), (4096,)),
        _Rule(
            'classifier.3.weight',
            ('params', 'backbone', 'fc7', 'kernel'),
            (4096, 4096),
            lambda w: _oihw_to_hwio(w.reshape(4096, 4096, 1, 1)),
        ),
        _Rule('classifier.3.bias', ('params', 'backbone', 'fc7', 'bias'), (4096,)),
    ]


def _keras_vgg16() -> list[_Rule]:
    rules = []
    for b, i, _, cin, cout in _vgg16_layers():
        rules += _keras_conv(f'block{b}_conv{i}', ('backbone', f'conv{b}_{i}'), cin, cout, 3)
    return rules


def _keras_vgg16_fc() -> list[_Rule]:
    # Keras flattens channels-last (H, W, C), so fc1's kernel reshapes straight to HWIO.
    return [
        _Rule(
            'fc1/kernel',
            ('params', 'backbone', 'fc6', 'kernel'),
            (7 * 7 * 512, 4096),
            lambda w: w.reshape(7, 7, 512, 4096),
        ),
        _Rule('fc1/bias', ('params', 'backbone', 'fc6', 'bias'), (4096,)),
        _Rule(
            'fc2/kernel',
            ('params', 'backbone', 'fc7', 'kernel'),
            (4096, 4096),
            lambda w: w.reshape(1, 1, 4096, 4096),
        ),
        _Rule('fc2/bias', ('params', 'backbone', 'fc7', 'bias'), (4096,)),
    ]


def _torch_fcn_head(key: str, module: str, cin: int, num_classes: int) -> list[_Rule]:
    """torchvision's FCNHead: 3x3 conv (no bias), BN, ReLU, dropout, 1x1 conv to classes."""
    mid = cin // 4
    rules = _torch_conv(f'{key}.0', (module, 'conv'), cin, mid, 3, bias=False)
    rules += _torch_bn(f'{key}.1', (module, 'bn'), mid)
    out = _torch_conv(f'{key}.4', (module, 'out'), mid, num_classes, 1, bias=True)
    return rules + [dataclasses.replace(r, class_dependent=True) for r in out]


def _smp_unet_decoder(
    encoder: str, decoder_channels: Sequence[int], num_classes: int
) -> list[_Rule]:
    """segmentation_models_pytorch's Unet decoder (batch norm, no attention).

    smp adds a centre block (two conv-BN-ReLU on the deepest feature) for VGG encoders only.
    """
    # Encoder channels at strides 2..32; smp drops the full-resolution feature and starts
    # from the deepest one.
    features = (
        (64, 256, 512, 1024, 2048) if encoder.startswith('resnet') else (128, 256, 512, 512, 512)
    )
    features = features[::-1]
    ins = [features[0], *decoder_channels[:-1]]
    skips = [*features[1:], 0]
    rules = []
    if encoder == 'vgg16':
        for i in (1, 2):
            key, path = f'decoder.center.{i - 1}', ('decoder', 'center')
            c = features[0]
            rules += _torch_conv(f'{key}.0', (*path, f'conv{i}'), c, c, 3, bias=False)
            rules += _torch_bn(f'{key}.1', (*path, f'bn{i}'), c)
    for j, (cin, skip, cout) in enumerate(zip(ins, skips, decoder_channels, strict=True)):
        key, path = f'decoder.blocks.{j}', ('decoder', f'block{j}')
        rules += _torch_conv(f'{key}.conv1.0', (*path, 'conv1'), cin + skip, cout, 3, bias=False)
        rules += _torch_bn(f'{key}.conv1.1', (*path, 'bn1'), cout)
        rules += _torch_conv(f'{key}.conv2.0', (*path, 'conv2'), cout, cout, 3, bias=False)
        rules += _torch_bn(f'{key}.conv2.1', (*path, 'bn2'), cout)
    head = _torch_conv(
        'segmentation_head.0',
        ('segmentation_head',),
        decoder_channels[-1],
        num_classes,
        3,
        bias=True,
    )
    return rules + [dataclasses.replace(r, class_dependent=True) for r in head]


# ----------------------------------------------------------------------------------------------
# Models and sources.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Target:
    encoder: str  # 'vgg16', 'resnet50' or 'resnet101'.
    head: str  # 'fcn_vgg', 'fcn_head' (torchvision), 'fcn_skips' or 'smp_unet'.


_TARGETS = {
    'fcn32s_vgg16': _Target('vgg16', 'fcn_vgg'),
    'fcn16s_vgg16': _Target('vgg16', 'fcn_vgg'),
    'fcn8s_vgg16': _Target('vgg16', 'fcn_vgg'),
    'fcn8s_atonce_vgg16': _Target('vgg16', 'fcn_vgg'),
    'fcn_resnet50': _Target('resnet50', 'fcn_head'),
    'fcn_resnet101': _Target('resnet101', 'fcn_head'),
    'fcn8s_resnet50': _Target('resnet50', 'fcn_skips'),
    'fcn8s_resnet101': _Target('resnet101', 'fcn_skips'),
    'unet_resnet50': _Target('resnet50', 'smp_unet'),
    'unet_vgg16': _Target('vgg16', 'smp_unet'),
}


def _target(model_name: str) -> _Target:
    if model_name not in _TARGETS:
        raise ValueError(
            f'No pretrained weights can initialise model {model_name!r}; models with a '
            f'pretrained encoder: {", ".join(sorted(_TARGETS))}.'
        )
    return _TARGETS[model_name]


@dataclasses.dataclass
class _Import:
    """The outcome of a conversion, before it becomes plain variables."""

    variables: Variables
    scope: str  # 'full' (backbone and head) or 'backbone'.
    num_classes: int | None  # Classes of the imported output layer; None if none was imported.
    skipped: list[str]  # Source tensors the model has no use for (e.g. ImageNet classifier).


def _resnet_depth(encoder: str) -> int:
    return int(encoder.removeprefix('resnet'))


def _has(weights: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in weights)


def _torch_source(weights: Mapping[str, np.ndarray]) -> tuple[str, str, str]:
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


def _import_torchvision(
    state_dict: Mapping[str, Any], model_name: str, *, num_classes: int | None, origin: str
) -> _Import:
    target = _target(model_name)
    weights = _strip_prefix(_as_numpy_dict(state_dict), 'module.')
    kind, family, prefix = _torch_source(weights)
    if not target.encoder.startswith(family):
        raise WeightImportError(
            f'{origin} holds a {family.upper()} model; {model_name!r} has a '
            f'{target.encoder} encoder.'
        )
    rules = (
        _torch_resnet(prefix, _resnet_depth(target.encoder))
        if family == 'resnet'
        else _torch_vgg16(prefix)
    )
    hints = []
    if family == 'resnet':
        layer3 = f'{prefix}layer3.'
        blocks = {k[len(layer3) :].split('.')[0] for k in weights if k.startswith(layer3)}
        depth = {6: 50, 23: 101}.get(len(blocks))
        if depth is not None and f'resnet{depth}' != target.encoder:
            hints.append(f'the file holds a ResNet-{depth}; {model_name!r} uses {target.encoder}.')
    # Source tensors this model has no place for: recognised, skipped and reported.
    skip: tuple[str, ...] = ('fc.',) if family == 'resnet' else ('classifier.',)
    full = False
    if kind == 'classifier' and target.head == 'fcn_vgg':
        skip = ('classifier.6.',)
        if 'classifier.0.weight' in weights:
            rules += _torch_vgg16_fc()
    elif kind == 'torchvision_fcn':
        skip = ('classifier.', 'aux_classifier.')
        if target.head == 'fcn_head':
            full, skip = True, ()
            classes = num_classes or _class_count(weights, 'classifier.4.weight') or 21
            rules += _torch_fcn_head('classifier', 'classifier', 2048, classes)
            if _has(weights, 'aux_classifier.'):
                rules += _torch_fcn_head('aux_classifier', 'aux_classifier', 1024, classes)
    elif kind == 'smp_unet':
        skip = ('decoder.', 'segmentation_head.')
        if target.head == 'smp_unet':
            full, skip = True, ()
            classes = num_classes or _class_count(weights, 'segmentation_head.0.weight') or 1
            rules += _smp_unet_decoder(target.encoder, _smp_decoder_channels(weights), classes)
    return _apply_rules(
        weights,
        rules,
        skip,
        full=full,
        num_classes=num_classes,
        origin=origin,
        model_name=model_name,
        hints=hints,
    )


def _smp_decoder_channels(weights: Mapping[str, np.ndarray]) -> list[int]:
    """Reads the decoder widths from the checkpoint (smp's default is (256, 128, 64, 32, 16))."""
    channels = [256, 128, 64, 32, 16]
    for j in range(len(channels)):
        key = f'decoder.blocks.{j}.conv2.0.weight'
        if key in weights:
            channels[j] = int(weights[key].shape[0])
    return channels


def _apply_rules(
    weights: Mapping[str, np.ndarray],
    rules: list[_Rule],
    skip: tuple[str, ...],
    *,
    full: bool,
    num_classes: int | None,
    origin: str,
    model_name: str,
    hints: Sequence[str] = (),
) -> _Import:
    """Checks `weights` against `rules` (all at once) and builds the Flax variables."""
    ckpt_classes = next(
        (int(weights[r.key].shape[0]) for r in rules if r.class_dependent and r.key in weights),
        None,
    )
    skipped = []
    if num_classes is not None and ckpt_classes is not None and num_classes != ckpt_classes:
        # Fine-tuning on another label set: the output layers keep their fresh initialisation.
        skipped = [r.key for r in rules if r.class_dependent and r.key in weights]
        rules = [r for r in rules if not r.class_dependent]
        ckpt_classes = None
    known = {r.key for r in rules}
    missing = [r.key for r in rules if r.key not in weights]
    unexpected = []
    for key in weights:
        # BN's step counter is bookkeeping, not a weight: neither imported nor reported.
        if key in known or key in skipped or key.endswith('num_batches_tracked'):
            continue
        if key.startswith(skip):
            skipped.append(key)
        else:
            unexpected.append(key)
    mismatched = [
        (r.key, r.shape, tuple(weights[r.key].shape))
        for r in rules
        if r.key in weights and tuple(weights[r.key].shape) != r.shape
    ]
    if missing or unexpected or mismatched:
        raise WeightImportError(
            f'Cannot import {origin} into {model_name!r}:',
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
            hints=hints,
        )
    flat = {r.target: np.asarray(r.transform(weights[r.key]), np.float32) for r in rules}
    variables = traverse_util.unflatten_dict(flat)
    scope = 'full' if full else 'backbone'
    logging.info(
        'Imported %d tensors from %s into %s (%s); skipped %d: %s',
        len(rules),
        origin,
        model_name,
        scope,
        len(skipped),
        _summarise(skipped),
    )
    return _Import(variables, scope, ckpt_classes if full else None, sorted(skipped))


def _summarise(keys: Sequence[str]) -> str:
    prefixes = sorted({k.rsplit('.', 1)[0].rsplit('/', 1)[0] for k in keys})
    return ', '.join(prefixes) or 'nothing'


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
    return _import_torchvision(
        state_dict, model_name, num_classes=num_classes, origin='the state dict'
    ).variables


def _import_keras(h5_path: str | os.PathLike[str], model_name: str) -> _Import:
    path = os.fspath(h5_path)
    target = _target(model_name)
    raw = _read_keras_weights(path)
    origin = repr(path)
    if target.encoder == 'vgg16':
        rules = _keras_vgg16()
        if target.head == 'fcn_vgg' and 'fc1/kernel' in raw:
            rules += _keras_vgg16_fc()
        skip = ('fc1/', 'fc2/', 'predictions/')
        first_key = 'block1_conv1/kernel'
    elif target.encoder == 'resnet50':
        raw = {
            f'{_keras_resnet50_name(k.split("/")[0])}/{k.split("/")[1]}': v for k, v in raw.items()
        }
        rules = _keras_resnet50()
        skip = ('predictions/', 'fc1000/')
        first_key = 'conv1_conv/kernel'
    else:
        raise ValueError(
            f'Keras Applications has no {target.encoder} weights for {model_name!r}; use a '
            'torchvision checkpoint with from_torchvision.'
        )
    others = {'VGG16': 'block1_conv1/kernel', 'ResNet50': 'conv1_conv/kernel'}
    for other, marker in others.items():
        if marker in raw and marker != first_key:
            raise WeightImportError(
                f'{origin} holds a Keras {other}; {model_name!r} has a {target.encoder} encoder.'
            )
    return _apply_rules(
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
    return _import_keras(h5_path, model_name).variables


# ----------------------------------------------------------------------------------------------
# Merging into a model's variables.
# ----------------------------------------------------------------------------------------------


def merge_pretrained(
    init_variables: Mapping[str, Any],
    pretrained: Mapping[str, Any],
    *,
    strict_backbone: bool = True,
) -> Variables:
    """Overlays pretrained variables onto a model's freshly initialised ones.

    Every pretrained leaf must exist in `init_variables` with the same shape; leaves the
    pretrained tree lacks (a new head, the frozen upsampling kernels) keep their initial value.
    A pretrained head the model was built without (torchvision's `aux_classifier` when
    `config.model.aux_head` is False) is dropped.

    Args:
        init_variables: the model's variables, e.g. from `model.init` (or its
            `jax.eval_shape`, to check the fit without computing anything).
        pretrained: variables from `from_torchvision`, `from_keras` or `load_pretrained`.
        strict_backbone: also fail when a `backbone` parameter or statistic of the model is not
            in `pretrained` (a backbone import that silently covers only part of it).

    Returns:
        A new variable tree with the structure of `init_variables` (plain dicts).

    Raises:
        WeightImportError: unexpected leaves, shape mismatches, or (strict) missing backbone
            leaves, all listed.
    """
    init_flat = traverse_util.flatten_dict(_to_dict(init_variables), sep='/')
    new_flat = traverse_util.flatten_dict(_to_dict(pretrained), sep='/')
    init_modules = {k.split('/')[1] for k in init_flat if k.count('/') >= 2}
    dropped = [
        k
        for k in new_flat
        if k.split('/')[1] in _OPTIONAL_MODULES and k.split('/')[1] not in init_modules
    ]
    unexpected = [k for k in new_flat if k not in init_flat and k not in dropped]
    mismatched = [
        (k, tuple(init_flat[k].shape), tuple(np.shape(v)))
        for k, v in new_flat.items()
        if k in init_flat and tuple(init_flat[k].shape) != tuple(np.shape(v))
    ]
    missing = []
    if strict_backbone:
        missing = [
            k
            for k in init_flat
            if k.split('/')[0] in ('params', 'batch_stats')
            and k.split('/')[1] == 'backbone'
            and k not in new_flat
        ]
    if unexpected or mismatched or missing:
        raise WeightImportError(
            'Pretrained variables do not fit the model:',
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
            hints=_merge_hints(unexpected, mismatched, missing),
        )
    if dropped:
        logging.info(
            'The model has no %s: dropped %d pretrained leaves.', _OPTIONAL_MODULES, len(dropped)
        )
    merged = dict(init_flat)
    for k, v in new_flat.items():
        if k in init_flat:
            merged[k] = np.asarray(v, dtype=init_flat[k].dtype)
    return traverse_util.unflatten_dict(merged, sep='/')


def _to_dict(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _to_dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _merge_hints(unexpected: list[str], mismatched: list, missing: list[str]) -> list[str]:
    hints = []
    if any(k.startswith('params/backbone/') and k.endswith('/bias') for k in unexpected):
        hints.append(
            "convolution biases in the backbone: Keras' ResNet50 needs "
            "config.model.resnet_variant='caffe'."
        )
    if any(k.startswith('params/backbone/') and k.endswith('/bias') for k in missing):
        hints.append(
            "the model has backbone convolution biases (resnet_variant='caffe'); torchvision "
            "ResNets need config.model.resnet_variant='torchvision'."
        )
    if any(k.split('/')[1] == 'backbone' for k, _, _ in mismatched):
        hints.append('pretrained backbones need config.model.width=1.0.')
    if any(k.split('/')[1] != 'backbone' for k, _, _ in mismatched):
        hints.append(
            'for a head with another number of classes, convert with num_classes='
            "(--num_classes) set to the model's, so the output layers are left out."
        )
    if any('/fc6/' in k or '/fc7/' in k for k in missing):
        hints.append(
            'the weights have no fc6/fc7 (a "notop" file); pass strict_backbone=False to keep '
            'them freshly initialised.'
        )
    return hints


# ----------------------------------------------------------------------------------------------
# Converted checkpoints on disk.
# ----------------------------------------------------------------------------------------------


def _guess_source(path: str, source: str | None) -> str:
    if source is not None:
        return source
    suffix = os.path.splitext(path)[1].lower()
    return 'keras' if suffix in ('.h5', '.hdf5', '.keras') else 'torchvision'


def _import_file(
    path: str, model_name: str, *, num_classes: int | None, source: str | None
) -> _Import:
    source = _guess_source(path, source)
    if source == 'keras':
        return _import_keras(path, model_name)
    if source == 'torchvision':
        return _import_torchvision(
            load_state_dict(path), model_name, num_classes=num_classes, origin=repr(path)
        )
    raise ValueError(f"Unknown weights source {source!r}: 'torchvision' or 'keras'.")


def convert_file(
    input_path: str | os.PathLike[str],
    model_name: str,
    output_dir: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    source: str | None = None,
) -> Variables:
    """Converts a weights file into an orbax checkpoint that `config.init_from` can name.

    Writes `output_dir/variables` (an orbax `StandardCheckpointer` checkpoint of the Flax
    variables) and `output_dir/pretrained.json` (model name, source file, what was imported).

    Args:
        input_path: `.pth`/`.pt`/`.npz`/`.safetensors` (torchvision, smp) or `.h5`/`.keras`.
        model_name: the model the checkpoint is for.
        output_dir: a new or empty directory.
        num_classes: the model's class count (see `from_torchvision`).
        source: 'torchvision' or 'keras'; None guesses from the extension.

    Returns:
        The converted variables.

    Raises:
        FileExistsError: `output_dir` already holds a checkpoint.
    """
    import orbax.checkpoint as ocp

    input_path, output_dir = os.fspath(input_path), os.path.abspath(os.fspath(output_dir))
    result = _import_file(input_path, model_name, num_classes=num_classes, source=source)
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise FileExistsError(f'{output_dir!r} is not empty; choose a new --output directory.')
    os.makedirs(output_dir, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(output_dir, _VARIABLES_DIR), result.variables)
    checkpointer.wait_until_finished()
    metadata = {
        'format': _FORMAT,
        'model': model_name,
        'source': _guess_source(input_path, source),
        'input': os.path.abspath(input_path),
        'imported': result.scope,
        'num_classes': result.num_classes,
        'skipped': result.skipped,
    }
    with open(os.path.join(output_dir, _METADATA_FILE), 'w') as f:
        json.dump(metadata, f, indent=2)
    return result.variables


def is_pretrained_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a directory written by `convert` (as opposed to, e.g., a run's workdir).

    Args:
        path: a directory or file name.

    Returns:
        True if `load_pretrained(path)` reads a converted checkpoint.
    """
    return os.path.isfile(os.path.join(os.fspath(path), _METADATA_FILE))


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    source: str | None = None,
) -> Variables:
    """Loads pretrained variables for `config.init_from`.

    Args:
        path: a directory written by `convert` (or the CLI), or a weights file that is
            converted on the fly (then `model_name` is required).
        model_name: the model being initialised; a converted checkpoint made for another
            model is refused.
        num_classes: for a weights file: the model's class count (see `from_torchvision`).
        source: for a weights file: 'torchvision' or 'keras'; None guesses from the extension.

    Returns:
        Variables to pass to `merge_pretrained` with the model's initial variables.

    Raises:
        ValueError: the checkpoint was converted for another model, or `model_name` is missing
            for a raw weights file.
        FileNotFoundError: nothing usable at `path`.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        metadata_path = os.path.join(path, _METADATA_FILE)
        if not is_pretrained_checkpoint(path):
            raise FileNotFoundError(
                f'{path!r} is not a converted pretrained checkpoint (no {_METADATA_FILE}); create '
                'one with `python -m fcn_unet_jax.weights.convert`.'
            )
        with open(metadata_path) as f:
            metadata = json.load(f)
        if model_name is not None and metadata['model'] != model_name:
            raise ValueError(
                f'{path!r} was converted for model {metadata["model"]!r} but the config builds '
                f'{model_name!r}; convert {metadata["input"]!r} again with --model={model_name}.'
            )
        import orbax.checkpoint as ocp

        return ocp.StandardCheckpointer().restore(os.path.join(path, _VARIABLES_DIR))
    if model_name is None:
        raise ValueError(f'Converting {path!r} on the fly needs model_name.')
    return _import_file(path, model_name, num_classes=num_classes, source=source).variables


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: converts a weights file into a checkpoint for `config.init_from`."""
    # argparse, not absl flags: module-level absl flags would be defined by every import of
    # this library module and clash with the --input/--output of fcn_unet_jax.predict.
    parser = argparse.ArgumentParser(
        prog='python -m fcn_unet_jax.weights.convert',
        description='Convert torchvision / smp / Keras weights into an orbax checkpoint.',
    )
    parser.add_argument(
        '--input', required=True, help='.pth, .pt, .npz, .safetensors, .h5 or .keras'
    )
    parser.add_argument('--model', required=True, help='model name, e.g. fcn_resnet50')
    parser.add_argument('--output', required=True, help='new directory for the checkpoint')
    parser.add_argument('--num_classes', type=int, default=None, help="the model's classes")
    parser.add_argument('--source', choices=('torchvision', 'keras'), default=None)
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.INFO)
    try:
        convert_file(
            args.input, args.model, args.output, num_classes=args.num_classes, source=args.source
        )
    except (WeightImportError, ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        parser.exit(1, f'error: {e}\n')
    print(f'Wrote {args.output}; start training from it with --config.init_from={args.output}')


if __name__ == '__main__':
    main(sys.argv[1:])
