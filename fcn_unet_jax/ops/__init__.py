"""The few operations the architectures call, and how they run on each platform."""

from fcn_unet_jax.ops.batch_norm import BatchNorm
from fcn_unet_jax.ops.convolutions import (
    Conv,
    ConvTranspose,
    UpsampledConcatConv,
    upsample_transposed,
)
from fcn_unet_jax.ops.pooling import max_pool, max_pool_2x2
from fcn_unet_jax.ops.remat import remat
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
    'remat',
    'upsample_transposed',
]
