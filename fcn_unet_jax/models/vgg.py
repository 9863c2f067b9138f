"""VGG16 encoder (Simonyan & Zisserman), in its FCN and its plain (smp U-Net) form.

FCN form (`fcn=True`, reference Caffe `voc-fcn*s/net.py`): conv1_1 is padded by 100 so
that the fc6 7x7 VALID conv sees enough context for any input size, the other convs pad
by 1, 2x2 max pooling is ceil-mode, and the classifier becomes fc6 (7x7 conv, 4096) and
fc7 (1x1 conv, 4096), each followed by ReLU and dropout.

Plain form (`fcn=False`, torchvision `vgg16` features as used by smp's encoder): every
conv pads by 1, pooling is floor-mode, no fc layers.

Parameter paths (under the parent's `backbone`): `conv{b}_{i}/{kernel,bias}` for
b = 1..5 and i = 1..2 (b <= 2) or 1..3 (b >= 3); `fc6` and `fc7` in the FCN form.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcn_unet_jax import ops
from fcn_unet_jax.models import layers

Array = jax.Array

# Convs per block and their channels (configuration "D" of the paper).
VGG16_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
FCN_CONV1_PAD = 100
FCN_DROPOUT = 0.5
# Blocks of the FCN form whose maps keep a constant middle of conv1_1's padding (pool3 has a
# margin 7 wide, pool4 none: `ops.constant_margin`).
FCN_STEM_BLOCKS = 3

_conv_init = nn.initializers.he_normal()
# torchvision initialises VGG's Linear layers (our fc6/fc7) with N(0, 0.01).
FC_INIT_STD = 0.01


def fc_init_std(width: float) -> float:
    """The std of fc6/fc7's initial weights at channel multiplier `width`.

    torchvision's N(0, 0.01) sets each layer's gain (std x sqrt(fan-in): 1.58 for fc6's
    7 x 7 x 512 inputs, 0.64 for fc7's 4,096) at the paper's widths. Both fan-ins scale
    with `width`, so the std grows by 1 / sqrt(width) to keep those gains: with a fixed
    0.01, a 1/16-width FCN starts with fc7 outputs 16 times weaker than at full width, and
    FCN-32s, all of whose scores pass through fc7, trains more slowly.
    """
    return FC_INIT_STD / width**0.5


class VGG16(nn.Module):
    """VGG16 feature extractor returning the feature at each stride.

    Attributes:
      width: channel multiplier (1.0 = the paper's widths, including fc6/fc7's 4096).
      fcn: FCN form (pad 100, ceil pooling, fc6/fc7) instead of the plain form.
      dropout_rate: dropout after fc6 and fc7 (FCN form only).
      dtype: compute dtype name.
      remat: rematerialise every conv+ReLU pair in the backward pass (the flat reference
        parameter names leave the conv as the unit that can be wrapped).
    """

    width: float = 1.0
    fcn: bool = True
    dropout_rate: float = FCN_DROPOUT
    dtype: str = 'float32'
    remat: bool = False

    def _conv(self, b: int, i: int, padding, **kwargs) -> nn.Module:
        """conv{b}_{i} with ReLU (`kwargs`: `parent=None` for an unbound copy)."""
        return ops.remat(layers.ConvReLU, self.remat)(
            layers.scaled(VGG16_BLOCKS[b - 1][1], self.width),
            (3, 3),
            padding=padding,
            kernel_init=_conv_init,
            dtype=layers.compute_dtype(self.dtype),
            param_dtype=jnp.float32,
            name=f'conv{b}_{i}',
            **kwargs,
        )

    def _fcn_stem(self, x: Array) -> list[Array]:
        """Runs blocks 1 to `FCN_STEM_BLOCKS` of the FCN form; returns their pooled outputs.

        `ops.stem_with_constant_margin` may run them on a canvas without the constant
        middle of conv1_1's padding, which needs the blocks as a function of their arrays:
        the convs run as unbound copies on this module's parameters.
        """
        convs = [n for n, _ in VGG16_BLOCKS[:FCN_STEM_BLOCKS]]
        variables = self.variables['params']

        def block(b, x, params, padding):
            for i in range(1, convs[b] + 1):
                name = f'conv{b + 1}_{i}'
                same = ((1, 1), (1, 1))
                conv = self._conv(b + 1, i, padding if (b, i) == (0, 1) else same, parent=None)
                x = conv.apply({'params': params[name]}, x)
            return ops.max_pool_2x2(x, ceil_mode=True)

        stem_params = {
            f'conv{b}_{i}': variables[f'conv{b}_{i}']
            for b in range(1, FCN_STEM_BLOCKS + 1)
            for i in range(1, convs[b - 1] + 1)
        }
        return ops.stem_with_constant_margin(block, x, stem_params, FCN_CONV1_PAD, convs)

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> dict[int, Array]:
        """Runs the encoder.

        Args:
          x: NHWC images.
          train: enables dropout.

        Returns:
          FCN form: {2: pool1, 4: pool2, 8: pool3, 16: pool4, 32: fc7}. Plain form (smp's
          encoder outputs): {1: conv1_2, 2: conv2_2, 4: conv3_3, 8: conv4_3, 16: conv5_3,
          32: pool5}; all after ReLU.
        """
        dtype = layers.compute_dtype(self.dtype)
        x = x.astype(dtype)
        features = {}
        first_block = 1
        # Initialisation creates the parameters through the layers themselves; every later
        # call of the FCN form runs its stem as one function of them.
        if self.fcn and not self.is_initializing():
            for b, pooled in enumerate(self._fcn_stem(x), start=1):
                features[2**b] = x = pooled
            first_block = FCN_STEM_BLOCKS + 1
        for b, (n_convs, _) in enumerate(VGG16_BLOCKS[first_block - 1 :], start=first_block):
            for i in range(1, n_convs + 1):
                pad = FCN_CONV1_PAD if self.fcn and (b, i) == (1, 1) else 1
                x = self._conv(b, i, ((pad, pad), (pad, pad)))(x)
            stride = 2 ** (b - 1)
            if not self.fcn:
                features[stride] = x
            x = ops.max_pool_2x2(x, ceil_mode=self.fcn)
            if self.fcn and b < len(VGG16_BLOCKS):
                features[2 * stride] = x
        if not self.fcn:
            features[32] = x
            return features
        conv = ops.remat(layers.ConvReLU, self.remat)
        for name, kernel in (('fc6', 7), ('fc7', 1)):
            x = conv(
                layers.scaled(4096, self.width),
                (kernel, kernel),
                padding='VALID',
                kernel_init=nn.initializers.normal(fc_init_std(self.width)),
                dtype=dtype,
                param_dtype=jnp.float32,
                name=name,
            )(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        features[32] = x
        return features
