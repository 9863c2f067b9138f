"""Model registry: `build_model(config.model)` and one `MODELS` line per model name.

Each `ModelInfo` is the constructor of one name (call it with the model config) and
carries the facts the README table and weight import need: the paper, the output stride
(the coarsest resolution at which the final prediction is formed), the available skip
strides, the encoder (built by `encoders.build_encoder`) and the head. Config values are
validated here, with errors (`errors.UserError`) that name the field and the allowed values.

Defaults: `build_model` accepts a partial model config and fills each unset field from the
documented defaults, which are written once, in the model section of `configs/default.py`
(`default_model_config` reads them from there). `configs/` is a folder of the repository,
not of the installed package; where it cannot be imported, a missing field is an error
that names it.
"""

import dataclasses
import difflib
import functools
import importlib.util
import pathlib
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fcn_unet_jax import errors, ops
from fcn_unet_jax.models import fcn, unet
from fcn_unet_jax.models.encoders import ENCODERS, build_encoder
from fcn_unet_jax.models.layers import DTYPES
from fcn_unet_jax.models.resnet import RESNET_VARIANTS

MERGES = ('sum', 'concat', 'none')
PADDINGS = ('VALID', 'SAME')

FCN_PAPER = (
    'Long, Shelhamer, Darrell. Fully Convolutional Networks for Semantic Segmentation (2015)'
)
TORCHVISION_FCN = 'torchvision fcn_resnet (FCN head on a dilated ResNet, He et al. 2016)'
UNET_PAPER = 'Ronneberger, Fischer, Brox. U-Net (2015)'
SMP_UNET = 'U-Net decoder (Ronneberger et al. 2015), segmentation_models_pytorch layout'


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Constructor and facts of one registered model.

    Attributes:
      build: `build(model_config, skip_strides, merge, encoder) -> nn.Module`, called with
        validated, resolved skip settings and this model's `encoder`.
      paper: the paper (or reference implementation) the model follows.
      output_stride: stride of the coarsest map the final prediction is formed at.
      family: 'fcn' (default merge 'sum') or 'unet' (default merge 'concat').
      skip_strides: encoder strides that can feed the decoder.
      default_skip_strides: the paper's skips (used when `skip_strides` is None).
      encoder: the backbone, 'vgg16', 'resnet50' or 'resnet101'; None for the classic
        U-Net, which has no pretrained encoder.
      head: what sits on the encoder: 'fcn_vgg' (the Caffe FCN score/upsampling layers),
        'fcn_head' (torchvision's FCNHead), 'fcn_skips' (FCN skip fusion on a ResNet),
        'smp_unet' (segmentation_models_pytorch's U-Net decoder) or 'unet' (classic).
    """

    build: Callable[[ml_collections.ConfigDict, tuple[int, ...], str, str | None], nn.Module]
    paper: str
    output_stride: int
    family: str
    skip_strides: tuple[int, ...]
    default_skip_strides: tuple[int, ...]
    encoder: str | None
    head: str

    def __call__(self, model_config: ml_collections.ConfigDict) -> nn.Module:
        """Validates `model_config` and builds the module."""
        _validate_common(model_config)
        if model_config.batch_norm and self.head != 'unet':
            # The other models' normalisation is their reference's: BatchNorm throughout the
            # ResNets, none in VGG16 (the FCN paper's and smp's encoder).
            own = 'no BatchNorm (VGG16)' if self.encoder == 'vgg16' else 'BatchNorm (ResNet)'
            raise errors.UserError(
                f'config.model.batch_norm=True applies to the classic U-Net only; '
                f'{model_config.name} always has {own}, as its reference.',
                hint='leave config.model.batch_norm False for this model',
            )
        merge = model_config.merge
        if merge is None:
            merge = 'sum' if self.family == 'fcn' else 'concat'
        strides = model_config.skip_strides
        if strides is None:
            strides = () if merge == 'none' else self.default_skip_strides
        strides = tuple(strides)
        bad = [s for s in strides if s not in self.skip_strides]
        if bad or len(set(strides)) != len(strides):
            raise errors.UserError(
                f'config.model.skip_strides for {model_config.name!r} must be distinct values '
                f'from {self.skip_strides}, got {strides}.'
            )
        if merge == 'none' and strides:
            raise errors.UserError(
                f"config.model.merge='none' means no skips, but config.model.skip_strides is "
                f'{strides}; set skip_strides to None or ().'
            )
        return self.build(model_config, strides, merge, self.encoder)


def _validate_common(c: ml_collections.ConfigDict) -> None:
    def check(ok: bool, field: str, allowed: str) -> None:
        if not ok:
            raise errors.UserError(f'config.model.{field} must be {allowed}, got {c[field]!r}.')

    check(c.dtype in DTYPES, 'dtype', f'one of {sorted(DTYPES)}')
    check(isinstance(c.width, int | float) and c.width > 0, 'width', 'a number > 0')
    check(isinstance(c.num_classes, int) and c.num_classes >= 1, 'num_classes', 'an int >= 1')
    check(
        isinstance(c.input_channels, int) and c.input_channels >= 1,
        'input_channels',
        'an int >= 1',
    )
    check(c.merge is None or c.merge in MERGES, 'merge', f'None or one of {MERGES}')
    check(c.padding in PADDINGS, 'padding', f'one of {PADDINGS}')
    check(c.resnet_variant in RESNET_VARIANTS, 'resnet_variant', f'one of {RESNET_VARIANTS}')
    check(
        c.dropout_rate is None or 0.0 <= c.dropout_rate < 1.0,
        'dropout_rate',
        'None (paper default) or in [0, 1)',
    )
    check(
        len(c.decoder_channels) == 5 and all(int(v) >= 1 for v in c.decoder_channels),
        'decoder_channels',
        'five positive ints (one per decoder block)',
    )
    check(isinstance(_plain_ops(c), bool), 'plain_ops', 'True or False')
    check(
        _batch_norm_stats(c) in ops.BATCH_NORM_STATISTICS,
        'batch_norm_stats',
        f'one of {ops.BATCH_NORM_STATISTICS}',
    )


def _plain_ops(c: ml_collections.ConfigDict) -> Any:
    # Configs written before the field existed (a run's config.json) run the tuned ops.
    return c.get('plain_ops', False)


def _batch_norm_stats(c: ml_collections.ConfigDict) -> Any:
    # Configs written before the field existed take their statistics over the global batch.
    return c.get('batch_norm_stats', 'global')


def _common(c: ml_collections.ConfigDict) -> dict[str, Any]:
    return {
        'num_classes': c.num_classes,
        'input_channels': c.input_channels,
        'width': float(c.width),
        'dtype': c.dtype,
        'remat': c.remat,
        'plain_ops': _plain_ops(c),
        'batch_norm_stats': _batch_norm_stats(c),
    }


def _dropout(c: ml_collections.ConfigDict, paper_default: float) -> float:
    return paper_default if c.dropout_rate is None else float(c.dropout_rate)


def _fcn_vgg(c, skip_strides, merge, encoder, *, at_once=False):
    del encoder  # Always VGG16: the reference Caffe nets.
    return fcn.FCNVGG(
        skip_strides=skip_strides,
        merge=merge,
        at_once=at_once,
        learnable_upsampling=c.learnable_upsampling,
        dropout_rate=_dropout(c, 0.5),
        **_common(c),
    )


def _fcn_resnet(c, skip_strides, merge, encoder):
    del skip_strides, merge  # torchvision's FCN-ResNet has no skips (checked: always ()).
    return fcn.FCNResNet(
        encoder=encoder,
        aux_head=c.aux_head,
        resnet_variant=c.resnet_variant,
        dropout_rate=_dropout(c, fcn.FCN_HEAD_DROPOUT),
        **_common(c),
    )


def _fcn_skip_resnet(c, skip_strides, merge, encoder):
    return fcn.FCNSkipResNet(
        encoder=encoder,
        skip_strides=skip_strides,
        merge=merge,
        resnet_variant=c.resnet_variant,
        **_common(c),
    )


def _unet(c, skip_strides, merge, encoder):
    del encoder  # None: the classic U-Net has no pretrained encoder.
    return unet.UNet(
        padding=c.padding,
        batch_norm=c.batch_norm,
        dropout_rate=_dropout(c, unet.UNET_DROPOUT),
        skip_strides=skip_strides,
        merge=merge,
        **_common(c),
    )


def _encoder_unet(c, skip_strides, merge, encoder):
    return unet.EncoderUNet(
        encoder=encoder,
        decoder_channels=tuple(int(v) for v in c.decoder_channels),
        skip_strides=skip_strides,
        merge=merge,
        resnet_variant=c.resnet_variant,
        **_common(c),
    )


_p = functools.partial
_VGG, _RES, _ENC = fcn.VGG_SKIP_STRIDES, fcn.RESNET_SKIP_STRIDES, unet.ENCODER_SKIP_STRIDES
_AT_ONCE, _CLS = tuple(fcn.AT_ONCE_SCALES), unet.CLASSIC_SKIP_STRIDES
_FCN, _TV, _UNET, _SMP = FCN_PAPER, TORCHVISION_FCN, UNET_PAPER, SMP_UNET

# fmt: off
MODELS: dict[str, ModelInfo] = {
    'fcn32s_vgg16': ModelInfo(_fcn_vgg, _FCN, 32, 'fcn', _VGG, (), 'vgg16', 'fcn_vgg'),
    'fcn16s_vgg16': ModelInfo(_fcn_vgg, _FCN, 16, 'fcn', _VGG, (16,), 'vgg16', 'fcn_vgg'),
    'fcn8s_vgg16': ModelInfo(_fcn_vgg, _FCN, 8, 'fcn', _VGG, (16, 8), 'vgg16', 'fcn_vgg'),
    'fcn8s_atonce_vgg16': ModelInfo(
        _p(_fcn_vgg, at_once=True), _FCN, 8, 'fcn', _AT_ONCE, (16, 8), 'vgg16', 'fcn_vgg'
    ),
    'fcn_resnet50': ModelInfo(_fcn_resnet, _TV, 8, 'fcn', (), (), 'resnet50', 'fcn_head'),
    'fcn_resnet101': ModelInfo(_fcn_resnet, _TV, 8, 'fcn', (), (), 'resnet101', 'fcn_head'),
    'fcn8s_resnet50': ModelInfo(
        _fcn_skip_resnet, _FCN, 8, 'fcn', _RES, (16, 8), 'resnet50', 'fcn_skips'
    ),
    'fcn8s_resnet101': ModelInfo(
        _fcn_skip_resnet, _FCN, 8, 'fcn', _RES, (16, 8), 'resnet101', 'fcn_skips'
    ),
    'unet': ModelInfo(_unet, _UNET, 1, 'unet', _CLS, _CLS, None, 'unet'),
    'unet_resnet50': ModelInfo(_encoder_unet, _SMP, 1, 'unet', _ENC, _ENC, 'resnet50', 'smp_unet'),
    'unet_vgg16': ModelInfo(_encoder_unet, _SMP, 1, 'unet', _ENC, _ENC, 'vgg16', 'smp_unet'),
}
# fmt: on


def default_model_config() -> ml_collections.ConfigDict | None:
    """The documented model defaults: the model section of `configs/default.py`.

    Returns:
      A fresh copy of `configs/default.py`'s `get_config().model`, or None where the
      project's `configs/` is not beside the package.
    """
    default = _project_default_config()
    return None if default is None else default.get_config().model


@functools.cache
def _project_default_config() -> Any:
    # The project's own file, by path: a `configs` package of the user's, first on the
    # path, must not supply the defaults.
    path = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'default.py'
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location('fcn_unet_jax._default_config', path)
    default = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(default)
    return default


def complete_model_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`model_config` with every unset field filled from `default_model_config()`.

    Args:
      model_config: a full or partial `config.model`; it is not changed.

    Returns:
      A new ConfigDict holding every model field.

    Raises:
      UserError: a field is unknown (the message lists the closest valid names), or fields
        are missing and the defaults cannot be read (the message names them).
    """
    given = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
    defaults = default_model_config()
    if defaults is None:  # `build_model` names a field that is missing.
        return ml_collections.ConfigDict(given)
    known = defaults.to_dict()
    unknown = sorted(set(given) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(known), n=3)
        raise errors.UserError(
            f'config.model has no field(s) {", ".join(unknown)}.',
            hint=f'closest valid fields: {", ".join(close)}' if close else None,
        )
    return ml_collections.ConfigDict({**known, **given})


def build_model(model_config: ml_collections.ConfigDict) -> nn.Module:
    """Builds the model named `model_config.name`.

    Args:
      model_config: the `config.model` section (see configs/default.py); unset fields take
        their defaults (`complete_model_config`).

    Returns:
      A Flax module; `model.apply(variables, images, train=...)` maps NHWC images to NHWC
      float32 logits (a dict {'out', 'aux'} for torchvision FCNs with `aux_head`).

    Raises:
      UserError (a ValueError): for an unknown name, an unknown or missing field, or an
        invalid field value (the message names the field and the allowed values).
    """
    name = model_config.get('name') if hasattr(model_config, 'get') else None
    if name not in MODELS:
        close = difflib.get_close_matches(str(name), list(MODELS), n=3)
        raise errors.UserError(
            f'Unknown config.model.name {name!r}; valid names: {sorted(MODELS)}.',
            hint=f'did you mean {" or ".join(close)}?' if close else None,
        )
    complete = complete_model_config(model_config)
    try:
        return MODELS[name](complete)
    except AttributeError as error:
        # ConfigDict's message for a missing field is the field's quoted name; any other
        # AttributeError is not about the config.
        match = re.fullmatch(r'["\']*(\w+)["\']*', str(error))
        if match is None or match.group(1) in complete:
            raise
        field = match.group(1)
        raise errors.UserError(
            f'config.model lacks the field {field!r}, and its default (configs/default.py) '
            'cannot be imported here.',
            hint='set it, or run from the repository root so that configs/ imports',
        ) from error


def example_input_shape(
    model_config: ml_collections.ConfigDict, batch_size: int = 1, size: int = 64
) -> tuple[int, int, int, int]:
    """Returns an NHWC input shape the model accepts, for `init` or `eval_shape`.

    Args:
      model_config: the `config.model` section.
      batch_size: leading dimension.
      size: preferred side; for the VALID U-Net the nearest valid side at or above it.

    Returns:
      (batch_size, side, side, input_channels).
    """
    if model_config.name == 'unet' and model_config.padding == 'VALID':
        size = unet.valid_unet_input_sizes(size)[-1]
    return (batch_size, size, size, model_config.input_channels)


def count_params(model_config: ml_collections.ConfigDict) -> int:
    """Number of learnable parameters (`params` only), computed without allocating them."""
    model = build_model(model_config)
    shape = example_input_shape(model_config)
    variables = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct(shape, jnp.float32),
    )
    return sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables['params']))


def model_table(model_config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """Rows for the README model table, one per registered model.

    Args:
      model_config: a base `config.model` (e.g. `configs.default.get_config().model`); it
        is copied and set to 21 classes, 3 input channels, width 1.0, paper skips.

    Returns:
      Dicts with 'name', 'paper', 'params' (learnable, 21 classes) and 'output_stride'.
    """
    rows = []
    for name, info in MODELS.items():
        c = ml_collections.ConfigDict(model_config.to_dict())
        c.update(name=name, num_classes=21, input_channels=3, width=1.0, dtype='float32')
        c.skip_strides, c.merge = None, None
        rows.append(
            {
                'name': name,
                'paper': info.paper,
                'params': count_params(c),
                'output_stride': info.output_stride,
            }
        )
    return rows


__all__ = [
    'ENCODERS',
    'MERGES',
    'MODELS',
    'ModelInfo',
    'build_encoder',
    'build_model',
    'complete_model_config',
    'count_params',
    'default_model_config',
    'example_input_shape',
    'model_table',
]
