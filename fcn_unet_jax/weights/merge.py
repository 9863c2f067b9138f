"""The one merge path: overlaying loaded variables onto a model's initial variables.

Training (`config.init_from`) and the converter both go through `merge_variables`, so a
file the converter accepts is one training accepts. Two strictnesses:

- strict, for pretrained imports: every loaded leaf must exist in the model with the same
  shape and (with `strict_backbone`) every backbone leaf of the model must be loaded; any
  problem is one `WeightImportError` listing them all, with hints. A head the model was
  built without (torchvision's `aux_classifier` when `config.model.aux_head` is False) is
  dropped rather than refused.
- partial, for a previous run of this project (FCN staging 32s -> 16s -> 8s): every leaf
  whose path and shape match is taken, the rest keeps its initialisation (new score
  layers, upsamplers of another size), and both lists are logged.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from flax import traverse_util

from fcn_unet_jax.weights.errors import WeightImportError
from fcn_unet_jax.weights.rules import Variables

# Model heads whose weights exist only in the source checkpoint when the model was built with
# the matching option (config.model.aux_head): a strict merge drops them, rather than
# failing, when the model has no such module.
OPTIONAL_MODULES = ('aux_classifier',)
# The collections an encoder's pretrained weights fill.
_BACKBONE_COLLECTIONS = ('params', 'batch_stats')

KeyPath = tuple[str, ...]  # A leaf's position: (collection, *modules, variable).


def merge_variables(
    init_variables: Mapping[str, Any],
    loaded: Mapping[str, Any],
    *,
    strict: bool,
    strict_backbone: bool = True,
    origin: str = 'the pretrained variables',
) -> Variables:
    """Overlays `loaded` onto `init_variables`: the merge that training and the converter use.

    Args:
        init_variables: the model's variables, e.g. from `model.init` (or its
            `jax.eval_shape`, to check the fit without computing anything).
        loaded: variables from a pretrained import, a converted checkpoint or a previous run.
        strict: refuse loaded leaves the model has no place for or of another shape (pretrained
            imports); otherwise take what matches and keep the rest (a previous run).
        strict_backbone: with `strict`, also refuse when a `backbone` parameter or statistic
            of the model is not in `loaded` (a backbone import that silently covers only part
            of it).
        origin: what `loaded` came from, for the log and the error.

    Returns:
        A new variable tree with the structure of `init_variables` (plain dicts); loaded
        leaves are cast to the dtype of the leaf they replace.

    Raises:
        WeightImportError: (strict) unexpected leaves, shape mismatches or missing backbone
            leaves, all listed.
    """
    init_flat = traverse_util.flatten_dict(_to_dict(init_variables), keep_empty_nodes=True)
    new_flat = traverse_util.flatten_dict(_to_dict(loaded))
    init_leaves = {k: v for k, v in init_flat.items() if v is not traverse_util.empty_node}
    fits = {
        k for k, v in new_flat.items() if k in init_leaves and _shape(v) == _shape(init_leaves[k])
    }
    if strict:
        _check_strict(init_leaves, new_flat, fits, strict_backbone, origin)
    merged = dict(init_flat)
    for k in fits:
        merged[k] = np.asarray(new_flat[k], dtype=init_leaves[k].dtype)
    kept = [_name(k) for k in init_leaves if k not in fits]
    logging.info(
        'Initialised %d arrays from %s; %d keep their initialisation: %s',
        len(fits),
        origin,
        len(kept),
        kept,
    )
    unused = [_name(k) for k in new_flat if k not in fits]
    if unused and not strict:  # A strict merge has refused or logged them already.
        logging.info(
            '%d arrays of %s have no place in the model (other path or shape): %s',
            len(unused),
            origin,
            unused,
        )
    return traverse_util.unflatten_dict(merged)


def merge_pretrained(
    init_variables: Mapping[str, Any],
    pretrained: Mapping[str, Any],
    *,
    strict_backbone: bool = True,
) -> Variables:
    """Overlays pretrained variables onto a model's freshly initialised ones (strictly).

    Every pretrained leaf must exist in `init_variables` with the same shape; leaves the
    pretrained tree lacks (a new head, the frozen upsampling kernels) keep their initial value.
    A pretrained head the model was built without (torchvision's `aux_classifier` when
    `config.model.aux_head` is False) is dropped. `merge_variables(..., strict=True)`.

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
    return merge_variables(init_variables, pretrained, strict=True, strict_backbone=strict_backbone)


def _check_strict(
    init_leaves: dict[KeyPath, Any],
    new_flat: dict[KeyPath, Any],
    fits: set[KeyPath],
    strict_backbone: bool,
    origin: str,
) -> None:
    init_modules = {k[1] for k in init_leaves if len(k) >= 3}
    dropped = {
        k for k in new_flat if len(k) >= 2 and k[1] in OPTIONAL_MODULES and k[1] not in init_modules
    }
    unexpected = [_name(k) for k in new_flat if k not in init_leaves and k not in dropped]
    mismatched = [
        (_name(k), _shape(init_leaves[k]), _shape(v))
        for k, v in new_flat.items()
        if k in init_leaves and k not in fits
    ]
    missing = []
    if strict_backbone:
        missing = [
            _name(k)
            for k in init_leaves
            if k[0] in _BACKBONE_COLLECTIONS and k[1:2] == ('backbone',) and k not in new_flat
        ]
    if unexpected or mismatched or missing:
        raise WeightImportError(
            f'Cannot initialise the model from {origin}:',
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
            hints=_hints(unexpected, mismatched, missing),
        )
    if dropped:
        logging.info(
            'The model has no %s: dropped %d pretrained leaves.', OPTIONAL_MODULES, len(dropped)
        )


def _to_dict(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _to_dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(np.shape(leaf))


def _name(path: KeyPath) -> str:
    return '/'.join(path)


def _hints(unexpected: list[str], mismatched: list, missing: list[str]) -> list[str]:
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
            'the weights have no fc6/fc7 (a "notop" file): use one with the classifier '
            '(torchvision vgg16, Keras VGG16 with include_top), or call merge_pretrained with '
            'strict_backbone=False to keep them freshly initialised.'
        )
    return hints
