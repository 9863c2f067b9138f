"""Conversion rules: one per source tensor, and the all-at-once check that applies a table.

A `Rule` names a source tensor (state dict key, or Keras '<layer>/<weight>'), the Flax
variable it fills (collection and module path, named as in `fcn_unet_jax.models`), the
shape the source must have and the layout change (PyTorch OIHW convolutions become Flax
HWIO; VGG16's classifier becomes the fc6/fc7 convolutions). `apply_rules` checks the whole
table before converting anything and fails with one `WeightImportError` listing the missing
keys, unexpected keys and shape mismatches, so a wrong or truncated file never
half-initialises a model.

Which encoder and head a model has comes from the registry (`models.MODELS`); how many
blocks a ResNet or VGG16 stage has comes from `models.resnet` and `models.vgg`. The channel
widths here are ImageNet's, which every pretrained source fixes (width 1.0).
"""

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from flax import traverse_util

from fcn_unet_jax import models
from fcn_unet_jax.models import resnet, vgg
from fcn_unet_jax.weights.errors import WeightImportError

Variables = dict[str, Any]
"""Flax variables: {'params': {...}, 'batch_stats': {...}} as nested dicts of arrays."""

RESNET_STEM_WIDTH = 64  # conv1's output channels, and the bottleneck width of layer1.


@dataclasses.dataclass(frozen=True)
class Rule:
    """One source tensor and the Flax variable it becomes.

    Attributes:
        key: name in the source (state dict key, or Keras '<layer>/<weight>').
        target: (collection, *module path, variable name).
        shape: shape the source tensor must have.
        transform: source layout -> Flax layout.
        class_dependent: an output layer whose size is the number of classes.
    """

    key: str
    target: tuple[str, ...]
    shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray] = np.asarray
    class_dependent: bool = False


@dataclasses.dataclass
class Imported:
    """The outcome of a conversion.

    Attributes:
        variables: the converted Flax variables (possibly covering only the backbone).
        scope: 'full' (backbone and head) or 'backbone'.
        num_classes: classes of the imported output layer; None if none was imported.
        skipped: source tensors the model has no use for (e.g. the ImageNet classifier).
    """

    variables: Variables
    scope: str
    num_classes: int | None
    skipped: list[str]


def model_parts(model_name: str) -> tuple[str, str]:
    """The registry's (encoder, head) of a model that pretrained weights can initialise.

    Args:
        model_name: a key of `fcn_unet_jax.models.MODELS`.

    Returns:
        (encoder, head), e.g. ('resnet50', 'fcn_head'); see `models.ModelInfo`.

    Raises:
        ValueError: the model is unknown or has no pretrained encoder (the classic U-Net).
    """
    info = models.MODELS.get(model_name)
    if info is None or info.encoder is None:
        with_encoder = sorted(name for name, i in models.MODELS.items() if i.encoder)
        raise ValueError(
            f'No pretrained weights can initialise model {model_name!r}; models with a '
            f'pretrained encoder: {", ".join(with_encoder)}.'
        )
    return info.encoder, info.head


def resnet_depth(encoder: str) -> int:
    """50 for 'resnet50', 101 for 'resnet101'."""
    return int(encoder.removeprefix('resnet'))


def resnet_stage_channels(stage: int) -> int:
    """Output channels of ResNet stage 1..4 (`layer{stage}`): 256, 512, 1024, 2048."""
    return resnet.EXPANSION * RESNET_STEM_WIDTH * 2 ** (stage - 1)


def resnet_blocks(depth: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Yields (stage 1..4, block index, input channels, width, output channels).

    Args:
        depth: 50 or 101 (a key of `models.resnet.RESNET_LAYERS`).
    """
    cin = RESNET_STEM_WIDTH
    for stage, blocks in enumerate(resnet.RESNET_LAYERS[depth], 1):
        cout = resnet_stage_channels(stage)
        for i in range(blocks):
            yield stage, i, cin, cout // resnet.EXPANSION, cout
            cin = cout


def vgg16_convs() -> Iterator[tuple[int, int, int, int, int]]:
    """Yields (block 1..5, conv 1..3, index in torchvision's `features`, in, out channels)."""
    index, cin = 0, 3
    for b, (n_convs, cout) in enumerate(vgg.VGG16_BLOCKS, 1):
        for i in range(1, n_convs + 1):
            yield b, i, index, cin, cout
            index += 2  # Conv2d, ReLU.
            cin = cout
        index += 1  # MaxPool2d.


def oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    """PyTorch's (out, in, kh, kw) convolution kernel as Flax's (kh, kw, in, out)."""
    return np.transpose(w, (2, 3, 1, 0))


def apply_rules(
    weights: Mapping[str, np.ndarray],
    rules: list[Rule],
    skip: tuple[str, ...],
    *,
    full: bool,
    num_classes: int | None,
    origin: str,
    model_name: str,
    hints: Sequence[str] = (),
) -> Imported:
    """Checks `weights` against `rules` (all at once) and builds the Flax variables.

    Args:
        weights: the source, name -> array.
        rules: the table for the model and the source.
        skip: key prefixes of source tensors that are recognised but have no place in the
            model (reported as skipped, not as unexpected).
        full: whether `rules` cover the whole model (else only its backbone).
        num_classes: the model's class count; if it differs from the source's, the
            class-dependent rules are dropped (fine-tuning on another label set).
        origin: the source, for messages (e.g. the file name).
        model_name: the model, for messages.
        hints: extra hint lines for the error.

    Returns:
        The converted variables and what was imported.

    Raises:
        WeightImportError: missing, unexpected or misshaped source tensors, all listed.
    """
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
    return Imported(variables, scope, ckpt_classes if full else None, sorted(skipped))


def _summarise(keys: Sequence[str]) -> str:
    prefixes = sorted({k.rsplit('.', 1)[0].rsplit('/', 1)[0] for k in keys})
    return ', '.join(prefixes) or 'nothing'
