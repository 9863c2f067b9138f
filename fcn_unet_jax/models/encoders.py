"""Encoders for every model family: `build_encoder(name, ...)`, the one place they are built.

FCNs and U-Nets alike take their backbone from here (as smp's `get_encoder` serves every
decoder): VGG16 in its FCN form (`voc-fcn*s`: conv1_1 padded by 100, ceil-mode pooling,
fc6/fc7) or its plain form (torchvision / smp), and ResNet-50 / ResNet-101 in
torchvision's or the original (Caffe / Keras) layout, optionally dilated. The module is
named `backbone`, the prefix of every encoder parameter path, which weight import
(`fcn_unet_jax.weights`) relies on.

An encoder maps NHWC images to a dict of features keyed by stride (see `vgg.VGG16` and
`resnet.ResNet` for which feature sits at which key).
"""

from collections.abc import Sequence

import flax.linen as nn

from fcn_unet_jax.models.resnet import RESNET_LAYERS, ResNet
from fcn_unet_jax.models.vgg import FCN_DROPOUT, VGG16

ENCODERS = ('vgg16', *(f'resnet{depth}' for depth in RESNET_LAYERS))
# The parent's name for the encoder: every encoder parameter path starts with it.
ENCODER_SCOPE = 'backbone'


def build_encoder(
    name: str,
    *,
    width: float = 1.0,
    dtype: str = 'float32',
    remat: bool = False,
    fcn_form: bool = False,
    dropout_rate: float = FCN_DROPOUT,
    resnet_variant: str = 'torchvision',
    dilate: Sequence[bool] = (False, False, False),
) -> nn.Module:
    """Builds the encoder `name`, to be called as `encoder(images, train=...)`.

    Call it inside the parent's `nn.compact` method, so that the encoder becomes its
    `backbone` submodule.

    Args:
      name: 'vgg16', 'resnet50' or 'resnet101'.
      width: channel multiplier (1.0 = the paper's widths).
      dtype: compute dtype name.
      remat: rematerialise the encoder's blocks (VGG: conv+ReLU pairs; ResNet:
        bottlenecks) in the backward pass.
      fcn_form: VGG16 only: the FCN form (pad 100, ceil pooling, fc6/fc7) instead of the
        plain one.
      dropout_rate: dropout after fc6 and fc7 (VGG16's FCN form only).
      resnet_variant: ResNets only: 'torchvision' or 'caffe' (`resnet.RESNET_VARIANTS`).
      dilate: ResNets only: torchvision's `replace_stride_with_dilation` for layer2..4.

    Returns:
      The encoder module, named `backbone`.

    Raises:
      ValueError: for an unknown name, or an option the named encoder does not have.
    """
    if name not in ENCODERS:
        raise ValueError(f'Unknown encoder {name!r}; valid encoders: {ENCODERS}.')
    if name == 'vgg16':
        if any(dilate):
            raise ValueError(f'dilate={tuple(dilate)} applies to ResNet encoders, not vgg16.')
        return VGG16(
            width=width,
            fcn=fcn_form,
            dropout_rate=dropout_rate,
            dtype=dtype,
            remat=remat,
            name=ENCODER_SCOPE,
        )
    if fcn_form:
        raise ValueError(f'fcn_form applies to the vgg16 encoder, not {name}.')
    return ResNet(
        depth=int(name.removeprefix('resnet')),
        variant=resnet_variant,
        dilate=tuple(dilate),
        width=width,
        dtype=dtype,
        remat=remat,
        name=ENCODER_SCOPE,
    )
