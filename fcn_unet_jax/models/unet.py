"""U-Nets: the classic U-Net (Ronneberger et al., 2015) and smp-style U-Nets on encoders.

Classic U-Net (`UNet`): per level two 3x3 convs + ReLU, 2x2 max pooling, channels
64-128-256-512-1024, 2x2 up-convolutions halving the channels, crop-and-concat skips and a
1x1 output conv: 23 conv layers. With `padding='VALID'` (the paper) a 572x572 input gives
a 388x388 output; `unet_output_size` / `unet_input_size` / `valid_unet_input_sizes` expose
that mapping. With `padding='SAME'` the output has the input's size for any H, W: pooling
is ceil-mode and each up-convolution output is cropped to its skip level's size.

Encoder U-Net (`EncoderUNet`): the layout of segmentation_models_pytorch 0.6 `Unet` on a
ResNet-50/101 or VGG16 encoder (`encoders.build_encoder`). Decoder block j (j = 0..4)
upsamples x2 (nearest), merges the encoder feature of the next finer stride, then applies
two conv3x3-BN-ReLU; a 3x3 conv is the segmentation head. Like smp, VGG encoders get a
`center` block (two conv3x3-BN-ReLU on the stride-32 feature) and the stride-1 encoder
feature is never used as a skip. smp needs H, W divisible by 32; here the input is
zero-padded at the bottom/right to the next multiple of 32 and the logits are cropped
back, so any H, W works and inputs that already are multiples of 32 give exactly smp's
computation.

Skip ablations (`skip_strides`, `merge`):
  * 'concat' (paper default): concatenate [upsampled, skip] before the level's first conv.
  * 'sum': add the skip to the upsampled tensor. In the classic U-Net the up-convolution
    already halves the channels to the skip's count, so no projection is needed; in the
    encoder U-Net channel counts differ, so the skip goes through a bias-free 1x1
    projection (`skip_proj`) to the decoder's channel count first.
  * 'none': no skips at all (an encoder-decoder); `skip_strides` must then be empty.
  A level not listed in `skip_strides` loses its skip and the parameters that only serve
  it (the concat input channels of its first conv, or its `skip_proj`).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcn_unet_jax import ops
from fcn_unet_jax.models import layers
from fcn_unet_jax.models.encoders import build_encoder

Array = jax.Array

UNET_DEPTH = 4  # Number of 2x2 poolings in the classic U-Net.
UNET_CHANNELS = 64  # Channels of the first level; doubled at each level.
UNET_DROPOUT = 0.5  # Dropout at the end of the contracting path (paper section 3.1).
CLASSIC_SKIP_STRIDES = (1, 2, 4, 8)
ENCODER_SKIP_STRIDES = (16, 8, 4, 2)
ENCODER_PAD_MULTIPLE = 32


def _check_input_size(size: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f'Input size must be a positive integer, got {size!r}.')


def _output_size_or_none(input_size: int, depth: int) -> int | None:
    size = input_size
    for _ in range(depth):
        size -= 4  # Two unpadded 3x3 convs.
        if size < 2 or size % 2:
            return None  # 2x2 pooling needs an even size.
        size //= 2
    size -= 4
    if size < 1:
        return None
    for _ in range(depth):
        size = 2 * size - 4
        if size < 1:
            return None
    return size


def valid_unet_input_sizes(near: int, depth: int = UNET_DEPTH) -> tuple[int, ...]:
    """Returns the valid VALID-U-Net input sizes nearest to `near`.

    Args:
      near: an input side length.
      depth: number of poolings.

    Returns:
      `(near,)` when `near` is valid, else the nearest valid size below `near` (if any)
      and the nearest above it, in increasing order.
    """
    _check_input_size(near)
    if _output_size_or_none(near, depth) is not None:
        return (near,)
    step = 2**depth  # Valid sizes form an arithmetic progression with this step.
    below = [s for s in range(near - 1, max(near - step, 0), -1) if _output_size_or_none(s, depth)]
    above = near + 1
    while _output_size_or_none(above, depth) is None:
        above += 1
    return tuple(below[:1]) + (above,)


def unet_output_size(input_size: int, depth: int = UNET_DEPTH) -> int:
    """Returns the output side of the VALID (paper) U-Net for an input side.

    Args:
      input_size: input height or width.
      depth: number of poolings (4 in the paper).

    Returns:
      The output side length, e.g. 388 for 572.

    Raises:
      ValueError: if the size cannot pass the network (a pooling sees an odd size, or a
        size drops below 1); the message names the nearest valid input sizes.
    """
    _check_input_size(input_size)
    out = _output_size_or_none(input_size, depth)
    if out is None:
        raise ValueError(
            f'Input size {input_size} cannot pass a VALID U-Net of depth {depth} (every '
            f'pooling needs an even size and every size must stay >= 1). Nearest valid input '
            f'sizes: {valid_unet_input_sizes(input_size, depth)}.'
        )
    return out


def unet_input_size(output_size: int, depth: int = UNET_DEPTH) -> int:
    """Returns the VALID U-Net input side that produces `output_size` (overlap-tile inference).

    Args:
      output_size: desired output side, e.g. 388.
      depth: number of poolings.

    Returns:
      The input side, e.g. 572.

    Raises:
      ValueError: if no input produces exactly this output size.
    """
    _check_input_size(output_size)
    smallest_input = valid_unet_input_sizes(1, depth)[-1]
    smallest_output = unet_output_size(smallest_input, depth)
    # Valid sizes shift input and output alike, so input - output is a constant margin.
    candidate = output_size + smallest_input - smallest_output
    if _output_size_or_none(candidate, depth) == output_size:
        return candidate
    step = 2**depth
    below = output_size - (output_size - smallest_output) % step
    options = tuple(s for s in (below, below + step) if s >= smallest_output)
    raise ValueError(
        f'No VALID U-Net input of depth {depth} gives output size {output_size}; '
        f'nearest possible output sizes: {options}.'
    )


def _double_conv(
    x: Array, features: int, padding: str, batch_norm: bool, dtype: Any, train: bool
) -> Array:
    """Two 3x3 convs + ReLU (optionally BN), created in the calling module's scope."""
    for i in (1, 2):
        x = ops.Conv(
            features,
            (3, 3),
            padding=padding,
            use_bias=not batch_norm,  # A bias before BN is redundant.
            kernel_init=nn.initializers.he_normal(),
            dtype=dtype,
            param_dtype=jnp.float32,
            name=f'conv{i}',
        )(x)
        if batch_norm:
            x = ops.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                dtype=dtype,
                param_dtype=jnp.float32,
                name=f'bn{i}',
            )(x)
        x = nn.relu(x)
    return x


class _UNetLevel(nn.Module):
    """Two 3x3 convs + ReLU (optionally BN) of one U-Net level."""

    features: int
    padding: str
    batch_norm: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        # `train` is positional so that `nn.remat(..., static_argnums=(2,))` can mark it static.
        return _double_conv(x, self.features, self.padding, self.batch_norm, self.dtype, train)


class _UNetUpLevel(nn.Module):
    """2x2 up-convolution, optional skip merge, then a `_UNetLevel`'s two convs."""

    features: int
    padding: str
    batch_norm: bool
    merge: str
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, skip: Array | None, size: tuple[int, int], train: bool) -> Array:
        x = ops.ConvTranspose(
            self.features,
            (2, 2),
            strides=(2, 2),
            kernel_init=nn.initializers.he_normal(),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name='upconv',
        )(x)
        if self.padding == 'SAME':
            # Ceil-mode pooling made the coarser level round up; drop the extra row/column.
            x = x[:, : size[0], : size[1]]
        if skip is not None:
            # VALID: the skip is larger (unpadded convs); crop its centre as the paper does.
            dh, dw = (skip.shape[1] - x.shape[1]) // 2, (skip.shape[2] - x.shape[2]) // 2
            skip = layers.crop(skip, (dh, dw), x.shape[1:3])
            x = x + skip if self.merge == 'sum' else jnp.concatenate([x, skip], axis=-1)
        return _double_conv(x, self.features, self.padding, self.batch_norm, self.dtype, train)


class UNet(nn.Module):
    """The classic U-Net (Ronneberger et al., 2015).

    Parameter paths: `down{k}/conv{1,2}` (k = 1..4 contracting levels, 5 = bottom),
    `down{k}/bn{1,2}` with `batch_norm`, `up{k}/upconv`, `up{k}/conv{1,2}` (k = 4..1, the
    level whose skip it receives), `final_conv`. All kernels He-normal, biases zero.

    Attributes:
      num_classes: output channels.
      input_channels: expected image channels (None: any).
      width: channel multiplier (1.0 = 64-128-256-512-1024).
      padding: 'VALID' (paper, output smaller than input) or 'SAME' (output = input size).
      batch_norm: BN after every 3x3 conv (then the conv has no bias).
      dropout_rate: dropout on the outputs of the last two contracting levels.
      skip_strides: strides (1, 2, 4, 8) of the levels whose features are skipped across.
      merge: 'concat', 'sum' or 'none'.
      dtype: compute dtype name.
      remat: rematerialise each level in the backward pass.
      plain_ops: run every op as the plain Flax/XLA op (`ops.plain_ops`).
      batch_norm_stats: BatchNorm statistics in training, 'global' or 'per_device'
        (`ops.batch_norm_statistics`).
    """

    num_classes: int
    input_channels: int | None = None
    width: float = 1.0
    padding: str = 'VALID'
    batch_norm: bool = False
    dropout_rate: float = UNET_DROPOUT
    skip_strides: Sequence[int] = CLASSIC_SKIP_STRIDES
    merge: str = 'concat'
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
        if self.padding == 'VALID':
            for side in images.shape[1:3]:
                unet_output_size(side, UNET_DEPTH)  # Raises a clear error at trace time.
        level = ops.remat(_UNetLevel, self.remat, static_argnums=(2,))
        up_level = ops.remat(_UNetUpLevel, self.remat, static_argnums=(3, 4))
        dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
        merge_skips = self.merge != 'none'

        x = images.astype(dtype)
        skips, sizes = {}, {}
        for k in range(1, UNET_DEPTH + 2):
            features = layers.scaled(UNET_CHANNELS * 2 ** (k - 1), self.width)
            x = level(features, self.padding, self.batch_norm, dtype, name=f'down{k}')(x, train)
            if k >= UNET_DEPTH:
                # "Drop-out layers at the end of the contracting path" (paper, section 3.1).
                x = dropout(x)
            if k <= UNET_DEPTH:
                stride = 2 ** (k - 1)
                skips[stride], sizes[stride] = x, x.shape[1:3]
                # SAME: odd sizes round up; VALID sizes were checked to be even here.
                x = ops.max_pool_2x2(x, ceil_mode=True)
        for k in range(UNET_DEPTH, 0, -1):
            stride = 2 ** (k - 1)
            features = layers.scaled(UNET_CHANNELS * 2 ** (k - 1), self.width)
            skip = skips[stride] if merge_skips and stride in self.skip_strides else None
            x = up_level(features, self.padding, self.batch_norm, self.merge, dtype, name=f'up{k}')(
                x, skip, sizes[stride], train
            )
        x = ops.Conv(
            self.num_classes,
            (1, 1),
            kernel_init=nn.initializers.he_normal(),
            dtype=dtype,
            param_dtype=jnp.float32,
            name='final_conv',
        )(x)
        return x.astype(jnp.float32)


class _DecoderBlock(nn.Module):
    """smp `UnetDecoderBlock`: nearest x2, merge skip, two conv3x3-BN-ReLU.

    Unless a skip is added to the upsampled tensor (`merge='sum'`), the first conv reads
    the block's input before upsampling (`ops.UpsampledConcatConv`): neither the
    upsampled tensor nor the concatenation is formed, with the same parameters and
    function.
    """

    features: int
    merge: str
    upsample: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, skip: Array | None, train: bool) -> Array:
        # The first conv of the upsampled (and concatenated) input runs at the input's
        # resolution; with 'sum' the upsampled and projected skip are added first.
        merged_in_conv = self.upsample and (skip is None or self.merge != 'sum')
        if self.upsample and not merged_in_conv:
            x = ops.upsample_nearest2x(x)
        if skip is not None and not merged_in_conv:
            if self.merge == 'sum':
                skip = ops.Conv(
                    x.shape[-1],
                    (1, 1),
                    use_bias=False,
                    dtype=self.dtype,
                    param_dtype=jnp.float32,
                    name='skip_proj',
                )(skip)
                x = x + skip
            else:
                x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        for i in (1, 2):
            conv_options = {
                'use_bias': False,  # smp's Conv2dReLU drops the bias before BN.
                'dtype': self.dtype,
                'param_dtype': jnp.float32,
                'name': f'conv{i}',
            }
            if i == 1 and merged_in_conv:
                x = ops.UpsampledConcatConv(self.features, (3, 3), **conv_options)(x, skip)
            else:
                x = ops.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), **conv_options)(x)
            x = ops.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                epsilon=1e-5,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f'bn{i}',
            )(x)
            x = nn.relu(x)
        return x


class _Decoder(nn.Module):
    """smp `UnetDecoder` (optional center block + five decoder blocks)."""

    decoder_channels: Sequence[int]
    skip_strides: Sequence[int]
    merge: str
    center: bool
    remat: bool
    dtype: Any

    @nn.compact
    def __call__(self, features: dict[int, Array], train: bool) -> Array:
        block = ops.remat(_DecoderBlock, self.remat, static_argnums=(3,))
        x = features[32]
        if self.center:
            x = block(x.shape[-1], self.merge, False, self.dtype, name='center')(x, None, train)
        for j, channels in enumerate(self.decoder_channels):
            stride = 32 // 2 ** (j + 1)
            use_skip = self.merge != 'none' and stride in self.skip_strides
            skip = features[stride] if use_skip else None
            x = block(channels, self.merge, True, self.dtype, name=f'block{j}')(x, skip, train)
        return x


class EncoderUNet(nn.Module):
    """segmentation_models_pytorch `Unet` layout on a ResNet-50/101 or VGG16 encoder.

    Parameter paths: `backbone/...` (see `resnet.ResNet` / `vgg.VGG16`), VGG only:
    `decoder/center/{conv1,bn1,conv2,bn2}`; `decoder/block{j}/{conv1,bn1,conv2,bn2}`
    (j = 0..4, stride 16, 8, 4, 2, 1), `decoder/block{j}/skip_proj` with `merge='sum'`,
    `segmentation_head/{kernel,bias}` (3x3).

    Attributes:
      num_classes: output channels.
      input_channels: expected image channels (None: any).
      encoder: 'resnet50', 'resnet101' or 'vgg16'.
      decoder_channels: output channels of the five decoder blocks (before `width`).
      skip_strides: encoder strides (16, 8, 4, 2) whose features feed the decoder.
      merge: 'concat', 'sum' or 'none'.
      resnet_variant: 'torchvision' or 'caffe' (ResNet encoders).
      width: channel multiplier for encoder and decoder.
      dtype: compute dtype name.
      remat: rematerialise encoder stages and decoder blocks.
      plain_ops: run every op as the plain Flax/XLA op (`ops.plain_ops`).
      batch_norm_stats: BatchNorm statistics in training, 'global' or 'per_device'
        (`ops.batch_norm_statistics`).
    """

    num_classes: int
    input_channels: int | None = None
    encoder: str = 'resnet50'
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)
    skip_strides: Sequence[int] = ENCODER_SKIP_STRIDES
    merge: str = 'concat'
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
        h, w = images.shape[1:3]
        m = ENCODER_PAD_MULTIPLE
        x = jnp.pad(images, ((0, 0), (0, -h % m), (0, -w % m), (0, 0))).astype(dtype)
        features = build_encoder(
            self.encoder,
            width=self.width,
            dtype=self.dtype,
            remat=self.remat,
            resnet_variant=self.resnet_variant,
        )(x, train=train)
        x = _Decoder(
            tuple(layers.scaled(c, self.width) for c in self.decoder_channels),
            tuple(self.skip_strides),
            self.merge,
            center=self.encoder == 'vgg16',
            remat=self.remat,
            dtype=dtype,
            name='decoder',
        )(features, train)
        x = ops.Conv(
            self.num_classes,
            (3, 3),
            padding=((1, 1), (1, 1)),
            dtype=dtype,
            param_dtype=jnp.float32,
            name='segmentation_head',
        )(x)
        return x[:, :h, :w].astype(jnp.float32)
