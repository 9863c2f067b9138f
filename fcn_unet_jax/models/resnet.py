"""ResNet-50/101 encoders (He et al.) with optional dilation, in two weight layouts.

`variant='torchvision'`: torchvision's ResNet (v1.5): the stride sits in the 3x3 conv of
a bottleneck, convs have no bias, BN eps 1e-5, explicit symmetric padding (not 'SAME',
which pads asymmetrically for stride 2 and would shift features against imported weights).
`variant='caffe'`: the original ResNet as in Keras Applications' ResNet50: the stride
sits in the first 1x1 conv of a stage, every conv has a bias, BN eps 1.001e-5.

Dilation follows torchvision's `replace_stride_with_dilation` exactly (`_make_layer`): a
dilated stage replaces its stride by dilation; its first block's 3x3 conv keeps the
*previous* dilation and the others use the new one. `dilate=(False, True, True)` gives the
output stride 8 of torchvision's FCN-ResNet.

Parameter paths (under the parent's `backbone`): `conv1/kernel`, `bn1/{scale,bias}`
(+ `batch_stats` `mean`/`var`), blocks `layer{L}_{i}/conv{1,2,3}/kernel`,
`layer{L}_{i}/bn{1,2,3}`, projections `layer{L}_{i}/downsample_conv/kernel` and
`layer{L}_{i}/downsample_bn` (L = 1..4, i from 0); 'caffe' adds `bias` to every conv.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcn_unet_jax import ops
from fcn_unet_jax.models import layers

Array = jax.Array

RESNET_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
RESNET_VARIANTS = ('torchvision', 'caffe')
EXPANSION = 4
_BN_EPS = {'torchvision': 1e-5, 'caffe': 1.001e-5}
# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class _Bottleneck(nn.Module):
    """Bottleneck block; `train` is positional so `nn.remat` can mark it static."""

    planes: int
    stride: int
    dilation: int
    downsample: bool
    variant: str
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        caffe = self.variant == 'caffe'

        def conv(features, kernel, stride, dilation, name):
            pad = dilation * (kernel // 2)
            return ops.Conv(
                features,
                (kernel, kernel),
                strides=(stride, stride),
                padding=((pad, pad), (pad, pad)),
                kernel_dilation=(dilation, dilation),
                use_bias=caffe,
                kernel_init=_conv_init,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=name,
            )

        def bn(name):
            return ops.BatchNorm(
                use_running_average=not train,
                momentum=0.9,  # PyTorch's momentum 0.1.
                epsilon=_BN_EPS[self.variant],
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=name,
            )

        s1, s2 = (self.stride, 1) if caffe else (1, self.stride)
        out = nn.relu(bn('bn1')(conv(self.planes, 1, s1, 1, 'conv1')(x)))
        out = nn.relu(bn('bn2')(conv(self.planes, 3, s2, self.dilation, 'conv2')(out)))
        out = bn('bn3')(conv(self.planes * EXPANSION, 1, 1, 1, 'conv3')(out))
        if self.downsample:
            x = bn('downsample_bn')(
                conv(self.planes * EXPANSION, 1, self.stride, 1, 'downsample_conv')(x)
            )
        return ops.materialize(nn.relu(out + x))


class ResNet(nn.Module):
    """ResNet-50/101 feature extractor.

    Attributes:
      depth: 50 or 101.
      variant: 'torchvision' or 'caffe' (see the module docstring).
      dilate: torchvision's `replace_stride_with_dilation` for layer2..layer4.
      width: channel multiplier (1.0 = 64..2048 channels).
      dtype: compute dtype name.
      remat: rematerialise each bottleneck block in the backward pass.
    """

    depth: int = 50
    variant: str = 'torchvision'
    dilate: Sequence[bool] = (False, False, False)
    width: float = 1.0
    dtype: str = 'float32'
    remat: bool = False

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> dict[int, Array]:
        """Runs the encoder.

        Args:
          x: NHWC images.
          train: BatchNorm uses batch statistics (and updates `batch_stats`).

        Returns:
          Features keyed by their stride in the undilated network: {2: stem (after
          conv1-bn1-ReLU, before max pooling), 4: layer1, 8: layer2, 16: layer3, 32: layer4}.
          With dilation a key is nominal: the tensor keeps the resolution of the last
          strided stage.
        """
        if self.variant not in RESNET_VARIANTS:
            raise ValueError(
                f'config.model.resnet_variant must be one of {RESNET_VARIANTS}, '
                f'got {self.variant!r}.'
            )
        dtype = layers.compute_dtype(self.dtype)
        block = ops.remat(_Bottleneck, self.remat, static_argnums=(2,))
        x = ops.Conv(
            layers.scaled(64, self.width),
            (7, 7),
            strides=(2, 2),
            padding=((3, 3), (3, 3)),
            use_bias=self.variant == 'caffe',
            kernel_init=_conv_init,
            dtype=dtype,
            param_dtype=jnp.float32,
            name='conv1',
        )(x.astype(dtype))
        x = ops.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=_BN_EPS[self.variant],
            dtype=dtype,
            param_dtype=jnp.float32,
            name='bn1',
        )(x)
        x = nn.relu(x)
        features = {2: x}
        # Padding with -inf (torchvision) equals Keras' zero padding here: inputs are >= 0.
        x = ops.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
        in_channels = x.shape[-1]
        dilation = 1
        for layer, n_blocks in enumerate(RESNET_LAYERS[self.depth], start=1):
            planes = layers.scaled(64 * 2 ** (layer - 1), self.width)
            stride = 1 if layer == 1 else 2
            previous_dilation = dilation
            if layer > 1 and self.dilate[layer - 2]:
                dilation *= stride
                stride = 1
            for i in range(n_blocks):
                x = block(
                    planes,
                    stride if i == 0 else 1,
                    previous_dilation if i == 0 else dilation,
                    i == 0 and (stride != 1 or in_channels != planes * EXPANSION),
                    self.variant,
                    dtype,
                    name=f'layer{layer}_{i}',
                )(x, train)
                in_channels = planes * EXPANSION
            features[2 ** (layer + 1)] = x
        return features
