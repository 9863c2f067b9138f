"""The few operations the architectures call, and how they run on each platform.

Each op has the parameters, variables and function of its Flax/XLA counterpart, so the
same checkpoint loads either way; what differs is how XLA computes it. Every rewrite below
was measured on XLA:CPU (`benchmarks/`, results in `docs/performance.md`) and runs on CPU
only: the choice is `lax.platform_dependent`, made inside custom VJP rules where nothing
differentiates it (`platform.py`), so a program lowered for a GPU or TPU holds the plain
Flax/XLA op, forward and backward, as `plain_ops` gives (`tests/test_lowering.py` checks
this for every model family). No rewrite has been measured on an accelerator yet; one that
is measured faster there gets that platform added where it is chosen.

On CPU (elsewhere: the plain op in brackets):

* `Conv` (`convolutions.py`), by configuration:
  - 1x1, zero padding: a matrix product over channels (`pointwise_conv`) whose kernel
    gradient transposes the narrower operand, or is one product per image on large maps
    [`nn.Conv`'s convolution and JAX's gradient].
  - 3x3, stride 1, float32, wide enough (`winograd.pays`): Winograd's minimal filtering
    (`winograd.py`), forward and, where it pays in training, backward [XLA's convolution].
  - 3x3, stride 1, float32, thin channels over a large map (`space_to_depth.pays`): a 3x3
    convolution of 2x2 pixel blocks with 4x the channels (`space_to_depth.py`), forward
    and backward [XLA's convolution].
  - other stride-1 kernels: XLA's convolution, its kernel gradient taken over the padded
    input, in the swapped form for convolutions that narrow their channels
    (`kernel_gradient.py`) [XLA's gradient].
  - strided: XLA's convolution, its input gradient computed phase by phase
    (`convolutions.input_grad_by_phases`) [XLA's gradient].
  - VALID stride-1 with an output of at most half the input's positions (FCN's fc6): the
    input gradient as one matrix product with every tap and shifted sums
    (`convolutions.input_grad_by_taps`) [XLA's gradient].
  - anything else (groups, masks, input dilation, circular padding): `nn.Conv` everywhere.
* `ConvTranspose` (`upsampling.py`, as the next two): with kernel size = stride (the
  U-Net's up-convolution), a matrix product and `depth_to_space` [`lax.conv_transpose`,
  as `nn.ConvTranspose`]; otherwise `nn.ConvTranspose` everywhere.
* `UpsampledConcatConv`: the 3x3 conv of `concat([upsample_nearest2x(x), skip])` without
  forming either tensor (a 2x2 phase convolution of `x` plus `Conv` of the skip) [the
  convolution of the concatenation].
* `upsample_transposed`: FCN's bilinear transposed convolution as one sub-pixel 2x2
  convolution and `depth_to_space` [`lax.conv_transpose`].
* `BatchNorm` (`batch_norm.py`): flax's function with a hand-written training gradient
  [JAX's gradient of the same function]. Its statistics are over the global batch or per
  device (`batch_norm_statistics`, `config.model.batch_norm_stats`) on every platform.
* `stem_with_constant_margin` (`constant_margin.py`): FCN-VGG16's blocks 1 to 3 on a canvas
  without the constant middle of conv1_1's 100 px padding, cut and widened again after each
  pooling [the full canvas]. It chooses its platform around a differentiated function (its
  blocks have no hand-written gradient), so a train step traces both branches' derivatives.
* `max_pool`, `max_pool_2x2` (`pooling.py`): XLA's `reduce_window` with a gradient
  recomputed without index tensors [`nn.max_pool` and its `select_and_scatter` gradient].
* `materialize` (`xla_cpu.py`): the identity through a conditional, a fusion barrier [the
  identity].
* `keep_recomputation` (`xla_cpu.py`): adds a zero XLA cannot merge, so that
  `jax.checkpoint`'s recomputation survives [the identity].
* `remat` (`remat.py`): `nn.remat` of a block, with `keep_recomputation` on its input.
* `upsample_nearest2x`: a plain op, the same everywhere.

The switch (`switch.py`): `config.model.plain_ops=True` makes a model run every op above
as the plain Flax/XLA op on every platform, CPU included (`nn.Conv`, `nn.ConvTranspose`,
flax's BatchNorm function under JAX's autodiff, `nn.max_pool`, `lax.conv_transpose`,
upsample + concatenate + conv, the identity for `materialize` and `keep_recomputation`;
`remat` stays, as it is a model option), with the same parameters, so a result can always
be checked against XLA's own ops. Code that calls the ops directly gets the same inside
`with ops.plain_ops():`.

Every module here that convolves directly uses `nhwc.lax_conv`, XLA's convolution in
flax's layout, the plain op the rewrites are checked against.
"""

from fcn_unet_jax.ops.batch_norm import STATISTICS as BATCH_NORM_STATISTICS
from fcn_unet_jax.ops.batch_norm import BatchNorm, batch_norm_statistics
from fcn_unet_jax.ops.constant_margin import stem_with_constant_margin
from fcn_unet_jax.ops.convolutions import Conv
from fcn_unet_jax.ops.pooling import max_pool, max_pool_2x2
from fcn_unet_jax.ops.remat import remat
from fcn_unet_jax.ops.switch import plain_ops, uses_plain_ops
from fcn_unet_jax.ops.upsampling import (
    ConvTranspose,
    UpsampledConcatConv,
    upsample_nearest2x,
    upsample_transposed,
)
from fcn_unet_jax.ops.xla_cpu import keep_recomputation, materialize

__all__ = [
    'BATCH_NORM_STATISTICS',
    'BatchNorm',
    'Conv',
    'ConvTranspose',
    'UpsampledConcatConv',
    'batch_norm_statistics',
    'keep_recomputation',
    'materialize',
    'max_pool',
    'max_pool_2x2',
    'plain_ops',
    'remat',
    'stem_with_constant_margin',
    'upsample_nearest2x',
    'upsample_transposed',
    'uses_plain_ops',
]
