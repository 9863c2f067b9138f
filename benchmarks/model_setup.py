"""The model, config and random batch that the model benchmark and the profiler share.

Both scripts measure the same train step: SGD with momentum 0.9 and cross-entropy on
random images and labels (the same arrays for every framework, from a fixed seed). The
classic `unet` is the paper's VALID network, run at the valid input size nearest to the
requested one.
"""

import ml_collections
import numpy as np

from configs import default
from fcn_unet_jax.models import unet


def input_size(name: str, size: int) -> tuple[int, int]:
    """The square input the model `name` runs at for a requested side `size`."""
    if name == 'unet':  # VALID: the nearest size the network accepts.
        side = min(unet.valid_unet_input_sizes(size), key=lambda s: abs(s - size))
        return side, side
    return size, size


def benchmark_config(
    name: str,
    size: int,
    batch_size: int,
    num_classes: int,
    dtype: str = 'float32',
    remat: bool = False,
) -> ml_collections.ConfigDict:
    """The config of the measured train step; `config.input.crop_size` is the input size."""
    config = default.get_config()
    config.model.name = name
    config.model.num_classes = num_classes
    config.model.dtype = dtype
    config.model.remat = remat
    config.model.padding = 'VALID' if name == 'unet' else 'SAME'
    config.optimizer.name = 'sgd'
    config.optimizer.momentum = 0.9
    config.loss.name = 'cross_entropy'
    config.batch_size = batch_size
    config.input.crop_size = input_size(name, size)
    return config


def random_batch(
    size: tuple[int, int], batch_size: int, num_classes: int, channels: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Random NHWC float32 images and int32 labels, the same on every call."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch_size, *size, channels)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=(batch_size, *size)).astype(np.int32)
    return images, labels
