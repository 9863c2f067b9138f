"""Building blocks shared by the model families.

Bilinear upsampling kernels (Caffe's `upsample_filt` / FCN `surgery.interp`), transposed
convolutions that are either learnable (`params`) or frozen (the `frozen` collection),
crops, resizes that match PyTorch's `F.interpolate`, channel scaling for the `width`
multiplier and the compute-dtype table.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fcn_unet_jax import ops

Array = jax.Array

DTYPES: dict[str, Any] = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str) -> Any:
    """Returns the jnp dtype for a compute-dtype name.

    Args:
      name: 'float32' or 'bfloat16'.

    Returns:
      The matching jnp dtype.

    Raises:
      ValueError: for any other name.
    """
    if name not in DTYPES:
        raise ValueError(f'config.model.dtype must be one of {sorted(DTYPES)}, got {name!r}.')
    return DTYPES[name]


def check_input(images: Array, input_channels: int | None) -> None:
    """Raises at trace time unless `images` is NHWC with `input_channels` channels.

    Args:
      images: the model input.
      input_channels: expected channel count (`config.model.input_channels`); None skips
        the channel check.
    """
    if images.ndim != 4:
        raise ValueError(f'Expected NHWC images, got shape {images.shape}.')
    if input_channels is not None and images.shape[-1] != input_channels:
        raise ValueError(
            f'config.model.input_channels is {input_channels} but the images have '
            f'{images.shape[-1]} channels (shape {images.shape}).'
        )


def scaled(channels: int, width: float) -> int:
    """Scales a paper channel count by the `width` multiplier, keeping at least 1 channel."""
    return max(1, int(round(channels * width)))


def bilinear_filter(kernel_size: int) -> np.ndarray:
    """Returns the 2-D bilinear filter of Caffe's `upsample_filt` (FCN `surgery.py`).

    Args:
      kernel_size: side of the square filter (2 * factor for an upsampling by `factor`).

    Returns:
      A float32 array of shape (kernel_size, kernel_size).
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = np.arange(kernel_size, dtype=np.float64)
    filt = 1 - np.abs(og - center) / factor
    return np.outer(filt, filt).astype(np.float32)


def bilinear_kernel(kernel_size: int, channels: int) -> np.ndarray:
    """Returns a channel-diagonal bilinear transposed-conv kernel, as FCN's `surgery.interp`.

    Channel i is upsampled into channel i only; cross-channel weights are zero.

    Args:
      kernel_size: spatial side of the kernel.
      channels: number of input (= output) channels.

    Returns:
      A float32 array of shape (kernel_size, kernel_size, channels, channels).
    """
    kernel = np.zeros((kernel_size, kernel_size, channels, channels), np.float32)
    filt = bilinear_filter(kernel_size)
    for c in range(channels):
        kernel[:, :, c, c] = filt
    return kernel


def bilinear_init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    """Flax initializer producing `bilinear_kernel` (the key is unused: the init is fixed)."""
    del key
    kh, kw, cout, cin = shape
    if kh != kw or cout != cin:
        raise ValueError(f'Bilinear init needs a square kernel and cin == cout, got {shape}.')
    return jnp.asarray(bilinear_kernel(kh, cin), dtype)


class BilinearUpsample(nn.Module):
    """Bias-free transposed conv (kernel 2f, stride f, no padding) with bilinear init.

    This is the FCN `Deconvolution` layer: the output of an (H, W) input is
    ((H + 1) f, (W + 1) f) and must be cropped by the caller. The kernel uses PyTorch /
    Caffe semantics (`transpose_kernel=True`): shape (k, k, out, in), so a PyTorch
    ConvTranspose2d weight (in, out, k, k) maps to it with `transpose(2, 3, 1, 0)`.

    A learnable kernel lives in `params`; a frozen one lives in the `frozen` collection so
    that the optimiser never sees it (the reference FCN fixes it with `lr_mult: 0`).

    Attributes:
      features: number of channels (input = output).
      factor: upsampling factor.
      learnable: whether the kernel is a trainable parameter.
      dtype: compute dtype.
    """

    features: int
    factor: int
    learnable: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = 2 * self.factor
        shape = (k, k, self.features, self.features)
        if self.learnable:
            kernel = self.param('kernel', bilinear_init, shape, jnp.float32)
        else:
            kernel = self.variable(
                'frozen', 'kernel', lambda: bilinear_init(None, shape, jnp.float32)
            ).value
        return ops.upsample_transposed(x.astype(self.dtype), kernel.astype(self.dtype), self.factor)


class ConvReLU(ops.Conv):
    """`ops.Conv` followed by ReLU, with the parameter names of a plain conv.

    Being a conv subclass (not a wrapper) keeps the flat reference names such as
    `backbone/conv1_1/kernel`, and makes the conv+ReLU pair a unit `nn.remat` can wrap.
    """

    def __call__(self, inputs: Array) -> Array:
        return nn.relu(super().__call__(inputs))


def crop(x: Array, offset: tuple[int, int], size: tuple[int, int]) -> Array:
    """Crops an NHWC tensor to `size` starting at `offset` (Caffe's `Crop` layer).

    Raises:
      ValueError: if the window falls outside `x` (a shape bug, caught at trace time).
    """
    (oh, ow), (h, w) = offset, size
    if oh < 0 or ow < 0 or oh + h > x.shape[1] or ow + w > x.shape[2]:
        raise ValueError(f'Cannot crop {size} at offset {offset} from {x.shape[1:3]}.')
    return x[:, oh : oh + h, ow : ow + w, :]


def resize_bilinear(x: Array, size: tuple[int, int]) -> Array:
    """Bilinear resize equal to PyTorch `F.interpolate(mode='bilinear', align_corners=False)`.

    Both use half-pixel centres; antialiasing is off because PyTorch applies none.
    """
    n, _, _, c = x.shape
    return jax.image.resize(x, (n, size[0], size[1], c), 'bilinear', antialias=False)
