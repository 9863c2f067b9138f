"""The few operations the architectures call, and how they run on each platform.

Each op has the parameters, variables and function of its Flax/XLA counterpart, so the
same checkpoint loads either way; what differs is how XLA computes it. The rewrites were
measured on XLA:CPU (`benchmarks/`, results in `docs/performance.md`). Those marked "on
CPU" are gated with `lax.platform_dependent`: other platforms get XLA's own op. The
others are exact reformulations (matrix products, smaller convolutions, hand-written
gradients) that currently run on every platform.

* `Conv` (`convolutions.py`), by configuration:
  - 1x1, zero padding: a matrix product over channels (`pointwise_conv`) whose kernel
    gradient transposes the narrower operand, or is one product per image on large maps.
    Every platform.
  - 3x3, stride 1, float32, wide enough (`winograd.pays`): on CPU, Winograd's minimal
    filtering (`winograd.py`), forward and, where it pays in training, backward. Elsewhere
    XLA's convolution with the gradients of the next case.
  - other stride-1 kernels: XLA's convolution; its kernel gradient is taken over the
    padded input on every platform and, on CPU, in the swapped form for convolutions
    that narrow their channels (`kernel_gradient.py`).
  - strided: XLA's convolution; on CPU its input gradient is computed phase by phase
    (`convolutions.input_grad_by_phases`), elsewhere it is XLA's.
  - anything else (groups, masks, input dilation, circular padding): `nn.Conv`.
* `ConvTranspose`: with kernel size = stride (the U-Net's up-convolution), a matrix
  product and `depth_to_space`, every platform; otherwise `nn.ConvTranspose`.
* `UpsampledConcatConv`: the 3x3 conv of `concat([upsample_nearest2x(x), skip])` without
  forming either tensor (a 2x2 phase convolution of `x` plus `Conv` of the skip), every
  platform.
* `upsample_transposed`: FCN's bilinear transposed convolution as one sub-pixel 2x2
  convolution and `depth_to_space`, every platform.
* `BatchNorm` (`batch_norm.py`): flax's function with a hand-written training gradient,
  every platform.
* `max_pool`, `max_pool_2x2` (`pooling.py`): XLA's `reduce_window` with a gradient
  recomputed without index tensors, every platform.
* `materialize` (`xla_cpu.py`): on CPU the identity through a conditional, a fusion
  barrier; the identity elsewhere.
* `keep_recomputation` (`xla_cpu.py`): on CPU adds a zero XLA cannot merge, so that
  `jax.checkpoint`'s recomputation survives; the identity elsewhere.
* `remat` (`remat.py`): `nn.remat` of a block, with `keep_recomputation` on its input.
* `upsample_nearest2x`: a plain op, the same everywhere.

The switch (`switch.py`): `config.model.plain_ops=True` makes a model run every op above
as the plain Flax/XLA op on every platform (`nn.Conv`, `nn.ConvTranspose`, flax's
BatchNorm function under JAX's autodiff, `nn.max_pool`, `lax.conv_transpose`, upsample +
concatenate + conv, the identity for `materialize` and `keep_recomputation`; `remat`
stays, as it is a model option), with the same parameters, so a result can always be
checked against XLA's own ops. Code that calls the ops directly gets the same inside
`with ops.plain_ops():`.
"""

from fcn_unet_jax.ops.batch_norm import BatchNorm
from fcn_unet_jax.ops.convolutions import (
    Conv,
    ConvTranspose,
    UpsampledConcatConv,
    upsample_nearest2x,
    upsample_transposed,
)
from fcn_unet_jax.ops.pooling import max_pool, max_pool_2x2
from fcn_unet_jax.ops.remat import remat
from fcn_unet_jax.ops.switch import plain_ops, uses_plain_ops
from fcn_unet_jax.ops.xla_cpu import keep_recomputation, materialize

__all__ = [
    'BatchNorm',
    'Conv',
    'ConvTranspose',
    'UpsampledConcatConv',
    'keep_recomputation',
    'materialize',
    'max_pool',
    'max_pool_2x2',
    'plain_ops',
    'remat',
    'upsample_nearest2x',
    'upsample_transposed',
    'uses_plain_ops',
]
