"""Fully convolutional networks: FCN-32s/16s/8s on VGG16 and FCNs on ResNets.

`FCNVGG` reproduces the reference Caffe nets (`voc-fcn32s`, `voc-fcn16s`, `voc-fcn8s`,
`voc-fcn8s-atonce` from shelhamer/fcn.berkeleyvision.org): zero-initialised 1x1 score
layers, bias-free transposed convs with bilinear init, crops, sum fusion. The crop
offsets are not hard-coded: they are derived from the coordinate map of every layer (as
Caffe's `coord_map.py` does: input coordinate = stride * index + shift), which yields the
reference offsets (32s: 19; 16s: pool4 5, final 27; 8s: pool4 5, pool3 9, final 31) and
also the right offsets for skip ablations such as fusing pool3 alone.

`FCNResNet` is torchvision's `fcn_resnet50/101`: a ResNet with dilated layer3/layer4
(output stride 8), `FCNHead` (3x3 conv to in/4 channels, BN, ReLU, dropout 0.1, 1x1
conv), an optional auxiliary `FCNHead` on layer3, and a bilinear resize to the input size
(`F.interpolate(mode='bilinear', align_corners=False)`).

`FCNSkipResNet` is FCN-8s skip fusion on an undilated ResNet (stride 32 -> 16 -> 8 ->
input): 1x1 score convs on layer4, layer3, layer2. Its x2 steps are bilinear resizes to
the skip's exact size rather than transposed convs: a SAME-padded ResNet has feature
sides ceil(n / s), which do not double exactly for odd sizes, so a transposed conv would
need size-dependent crops; a fixed bilinear resize has no such problem, adds no
parameters and is what torchvision's FCN uses for its final upsampling too.

All three take their backbone from `encoders.build_encoder`.

Merging (`merge`): 'sum' (paper); 'concat' concatenates [upsampled, skip score] and mixes
them with a 1x1 conv `fuse_*` initialised to [I; I], i.e. to the sum, so both merges
start from the same function; 'none' uses no skips. Score layers project every level to
`num_classes` channels, so sums never need an extra projection.
"""

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fcn_unet_jax import ops
from fcn_unet_jax.models import layers
from fcn_unet_jax.models.encoders import build_encoder
from fcn_unet_jax.models.vgg import FCN_CONV1_PAD

Array = jax.Array

VGG_SKIP_STRIDES = (16, 8, 4, 2)  # pool4, pool3, pool2, pool1.
RESNET_SKIP_STRIDES = (16, 8, 4)  # layer3, layer2, layer1.
# voc-fcn8s-atonce: fixed Scale layers on the pool features so that all levels can be
# trained at once without the finer scores swamping the coarse one.
AT_ONCE_SCALES = {16: 0.01, 8: 0.0001}
FCN_HEAD_DROPOUT = 0.1

_zeros = nn.initializers.zeros


def _sum_init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    """1x1 kernel [I; I] mapping a concat of two C-channel tensors to their sum."""
    del key
    _, _, c2, c = shape
    eye = np.eye(c, dtype=np.float32)
    return jnp.asarray(np.concatenate([eye, eye], axis=0).reshape(1, 1, c2, c), dtype)


def _fuse(x: Array, skip: Array, merge: str, name: str, dtype: Any) -> Array:
    """Merges a skip score into an upsampled score (in the calling module's scope)."""
    if merge == 'sum':
        return x + skip
    return ops.Conv(
        x.shape[-1],
        (1, 1),
        kernel_init=_sum_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )(jnp.concatenate([x, skip], axis=-1))


def _score(x: Array, num_classes: int, name: str, dtype: Any) -> Array:
    """Zero-initialised 1x1 score conv with bias (FCN's `score_*` layers)."""
    return ops.Conv(
        num_classes,
        (1, 1),
        kernel_init=_zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )(x)


def vgg_fcn_coords(stride: int) -> Fraction:
    """Shift b of the FCN-VGG16 feature at `stride` (input coordinate = stride * i + b).

    Follows Caffe's coord_map: a conv/pool with kernel k and padding p maps output index i
    to input coordinate s * i + (k - 1) / 2 - p.

    Args:
      stride: 2, 4, 8 or 16 (pool1..pool4) or 32 (fc7 and the scores on it).

    Returns:
      The shift b as an exact fraction.
    """
    shift = Fraction(1 - FCN_CONV1_PAD)  # conv1_1: 3x3, pad 100; the other convs shift 0.
    s = 1
    while s < stride:
        shift += Fraction(s, 2)  # 2x2 stride-2 pooling: (k - 1) / 2 = 1/2 of the input step.
        s *= 2
    if stride == 32:
        shift += 32 * 3  # fc6: 7x7 VALID.
    return shift


def _upsampled_coords(stride: int, shift: Fraction, factor: int) -> tuple[int, Fraction]:
    # A deconv inverts a conv with kernel 2f and stride f: i_in = (i_out - (2f - 1) / 2) / f.
    return stride // factor, shift - Fraction(stride * (2 * factor - 1), 2 * factor)


def _offset(kept_shift: Fraction, cropped_shift: Fraction, stride: int) -> int:
    # Index j + offset of the cropped map lies where index j of the kept map does.
    offset = (kept_shift - cropped_shift) / stride
    if offset.denominator != 1 or offset < 0:
        raise ValueError(f'Non-integral FCN crop offset {offset} at stride {stride}.')
    return int(offset)


def vgg_fcn_crop_offsets(skip_strides: Sequence[int]) -> dict[str, int]:
    """Returns the crop offsets of an FCN-VGG16 with the given skips.

    Args:
      skip_strides: strides of the fused pool features, e.g. (16, 8) for FCN-8s.

    Returns:
      Mapping 'pool{k}' -> offset of that score's crop, and 'final' -> offset of the
      final crop to the input, e.g. {'pool4': 5, 'pool3': 9, 'final': 31} for FCN-8s.
    """
    stride, shift = 32, vgg_fcn_coords(32)
    offsets = {}
    for target in sorted(skip_strides, reverse=True):
        stride, shift = _upsampled_coords(stride, shift, stride // target)
        offsets[f'pool{target.bit_length() - 1}'] = _offset(shift, vgg_fcn_coords(target), stride)
    stride, shift = _upsampled_coords(stride, shift, stride)
    offsets['final'] = _offset(Fraction(0), shift, 1)
    return offsets


class FCNVGG(nn.Module):
    """FCN-32s/16s/8s (and the at-once 8s) on VGG16, as the reference Caffe nets.

    Parameter paths: `backbone/conv{b}_{i}`, `backbone/fc6`, `backbone/fc7`, `score_fr`,
    `score_pool{k}` (k = 4, 3, 2, 1 for strides 16, 8, 4, 2), `fuse_pool{k}` with
    `merge='concat'`. Upsamplers (bias-free, `kernel` of shape (2f, 2f, C, C)): the one
    applied to `score_fr` is `upscore{f}` (`upscore2` in FCN-16s/8s), the one after the
    fusion with pool{k} is `upscore_pool{k}`, the final one (to the input resolution) is
    `upscore`. The final upsampler always lives in the `frozen` collection; the others
    live in `params` iff `learnable_upsampling`, else in `frozen`.

    Attributes:
      num_classes: output channels.
      input_channels: expected image channels (None: any).
      skip_strides: strides of the fused pool features: () 32s, (16,) 16s, (16, 8) 8s.
      merge: 'sum', 'concat' or 'none'.
      at_once: scale pool4 by 0.01 and pool3 by 0.0001 before scoring.
      learnable_upsampling: whether the intermediate upsamplers are learnable.
      dropout_rate: dropout after fc6 and fc7.
      width: channel multiplier.
      dtype: compute dtype name.
      remat: rematerialise the encoder's conv+ReLU pairs.
      plain_ops: run every op as the plain Flax/XLA op (`ops.plain_ops`).
      batch_norm_stats: BatchNorm statistics in training, 'global' or 'per_device'
        (`ops.batch_norm_statistics`).
    """

    num_classes: int
    input_channels: int | None = None
    skip_strides: Sequence[int] = (16, 8)
    merge: str = 'sum'
    at_once: bool = False
    learnable_upsampling: bool = False
    dropout_rate: float = 0.5
    width: float = 1.0
    dtype: str = 'float32'
    remat: bool = False
    plain_ops: bool = False
    batch_norm_stats: str = 'global'

    @nn.compact
    def __call__(self, images: Array, *, train: bool) -> Array:
        with ops.plain_ops(self.plain_ops), ops.batch_norm_statistics(self.batch_norm_stats):
            return self._forward(images, train)

    def _forward(self, images: Array, train: bool) -> Array:
        layers.check_input(images, self.input_channels)
        dtype = layers.compute_dtype(self.dtype)
        features = build_encoder(
            'vgg16',
            width=self.width,
            dtype=self.dtype,
            remat=self.remat,
            fcn_form=True,
            dropout_rate=self.dropout_rate,
        )(images, train=train)
        skips = sorted(self.skip_strides, reverse=True) if self.merge != 'none' else []
        offsets = vgg_fcn_crop_offsets(skips)
        x = _score(features[32], self.num_classes, 'score_fr', dtype)
        stride, up_name = 32, None
        for target in skips:
            factor = stride // target
            up_name = up_name or f'upscore{factor}'
            x = layers.BilinearUpsample(
                self.num_classes, factor, self.learnable_upsampling, dtype, name=up_name
            )(x)
            pool = f'pool{target.bit_length() - 1}'
            skip = features[target]
            if self.at_once:
                skip = skip * AT_ONCE_SCALES[target]
            skip = _score(skip, self.num_classes, f'score_{pool}', dtype)
            skip = layers.crop(skip, (offsets[pool],) * 2, x.shape[1:3])
            x = _fuse(x, skip, self.merge, f'fuse_{pool}', dtype)
            stride, up_name = target, f'upscore_{pool}'
        x = layers.BilinearUpsample(self.num_classes, stride, False, dtype, name='upscore')(x)
        x = layers.crop(x, (offsets['final'],) * 2, images.shape[1:3])
        return x.astype(jnp.float32)


class FCNHead(nn.Module):
    """torchvision's `FCNHead`: conv3x3 (in/4, no bias), BN, ReLU, dropout, conv1x1.

    Parameter paths: `conv/kernel`, `bn/{scale,bias}`, `out/{kernel,bias}`.

    Attributes:
      num_classes: output channels.
      dropout_rate: dropout before the 1x1 conv.
      dtype: compute dtype.
    """

    num_classes: int
    dropout_rate: float = FCN_HEAD_DROPOUT
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        x = ops.Conv(
            max(1, x.shape[-1] // 4),
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name='conv',
        )(x)
        x = ops.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name='bn',
        )(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
        return ops.Conv(
            self.num_classes, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, name='out'
        )(x)


class FCNResNet(nn.Module):
    """torchvision's `fcn_resnet50` / `fcn_resnet101` (dilated, output stride 8).

    Parameter paths: `backbone/...` (see `resnet.ResNet`), `classifier/{conv,bn,out}` and,
    with `aux_head`, `aux_classifier/{conv,bn,out}` on layer3.

    Attributes:
      num_classes: output channels.
      input_channels: expected image channels (None: any).
      encoder: 'resnet50' or 'resnet101'.
      aux_head: also return the auxiliary head's logits.
      resnet_variant: 'torchvision' or 'caffe'.
      dropout_rate: dropout in the FCN heads.
      width: channel multiplier.
      dtype: compute dtype name.
      remat: rematerialise each bottleneck block.
      plain_ops: run every op as the plain Flax/XLA op (`ops.plain_ops`).
      batch_norm_stats: BatchNorm statistics in training, 'global' or 'per_device'
        (`ops.batch_norm_statistics`).
    """

    num_classes: int
    input_channels: int | None = None
    encoder: str = 'resnet50'
    aux_head: bool = False
    resnet_variant: str = 'torchvision'
    dropout_rate: float = FCN_HEAD_DROPOUT
    width: float = 1.0
    dtype: str = 'float32'
    remat: bool = False
    plain_ops: bool = False
    batch_norm_stats: str = 'global'

    @nn.compact
    def __call__(self, images: Array, *, train: bool) -> Array | dict[str, Array]:
        with ops.plain_ops(self.plain_ops), ops.batch_norm_statistics(self.batch_norm_stats):
            return self._forward(images, train)

    def _forward(self, images: Array, train: bool) -> Array | dict[str, Array]:
        layers.check_input(images, self.input_channels)
        dtype = layers.compute_dtype(self.dtype)
        size = images.shape[1:3]
        features = build_encoder(
            self.encoder,
            width=self.width,
            dtype=self.dtype,
            remat=self.remat,
            resnet_variant=self.resnet_variant,
            dilate=(False, True, True),
        )(images, train=train)
        head = FCNHead(self.num_classes, self.dropout_rate, dtype, name='classifier')
        out = layers.resize_bilinear(head(features[32], train=train), size).astype(jnp.float32)
        if not self.aux_head:
            return out
        aux = FCNHead(self.num_classes, self.dropout_rate, dtype, name='aux_classifier')
        aux = layers.resize_bilinear(aux(features[16], train=train), size).astype(jnp.float32)
        return {'out': out, 'aux': aux}


class FCNSkipResNet(nn.Module):
    """FCN skip fusion (default 8s: stride 32 -> 16 -> 8 -> input) on an undilated ResNet.

    Parameter paths: `backbone/...` (see `resnet.ResNet`), `score_layer4`,
    `score_layer{L}` for the fused stages (L = 3, 2, 1 for strides 16, 8, 4), and
    `fuse_layer{L}` with `merge='concat'`. All score convs are zero-initialised (FCN).

    Attributes:
      num_classes: output channels.
      input_channels: expected image channels (None: any).
      encoder: 'resnet50' or 'resnet101'.
      skip_strides: strides of the fused stages, default (16, 8).
      merge: 'sum', 'concat' or 'none'.
      resnet_variant: 'torchvision' or 'caffe'.
      width: channel multiplier.
      dtype: compute dtype name.
      remat: rematerialise each bottleneck block.
      plain_ops: run every op as the plain Flax/XLA op (`ops.plain_ops`).
      batch_norm_stats: BatchNorm statistics in training, 'global' or 'per_device'
        (`ops.batch_norm_statistics`).
    """

    num_classes: int
    input_channels: int | None = None
    encoder: str = 'resnet50'
    skip_strides: Sequence[int] = (16, 8)
    merge: str = 'sum'
    resnet_variant: str = 'torchvision'
    width: float = 1.0
    dtype: str = 'float32'
    remat: bool = False
    plain_ops: bool = False
    batch_norm_stats: str = 'global'

    @nn.compact
    def __call__(self, images: Array, *, train: bool) -> Array:
        with ops.plain_ops(self.plain_ops), ops.batch_norm_statistics(self.batch_norm_stats):
            return self._forward(images, train)

    def _forward(self, images: Array, train: bool) -> Array:
        layers.check_input(images, self.input_channels)
        dtype = layers.compute_dtype(self.dtype)
        features = build_encoder(
            self.encoder,
            width=self.width,
            dtype=self.dtype,
            remat=self.remat,
            resnet_variant=self.resnet_variant,
        )(images, train=train)
        skips = sorted(self.skip_strides, reverse=True) if self.merge != 'none' else []
        x = _score(features[32], self.num_classes, 'score_layer4', dtype)
        for stride in skips:
            stage = f'layer{stride.bit_length() - 2}'
            skip = _score(features[stride], self.num_classes, f'score_{stage}', dtype)
            x = layers.resize_bilinear(x, skip.shape[1:3])
            x = _fuse(x, skip, self.merge, f'fuse_{stage}', dtype)
        return layers.resize_bilinear(x, images.shape[1:3]).astype(jnp.float32)
