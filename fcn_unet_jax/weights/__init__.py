"""Pretrained weights: import torchvision, segmentation_models_pytorch and Keras files."""

from fcn_unet_jax.weights.convert import (
    WeightImportError,
    convert_file,
    from_keras,
    from_torchvision,
    is_pretrained_checkpoint,
    load_pretrained,
    load_state_dict,
    merge_pretrained,
)

__all__ = [
    'WeightImportError',
    'convert_file',
    'from_keras',
    'from_torchvision',
    'is_pretrained_checkpoint',
    'load_pretrained',
    'load_state_dict',
    'merge_pretrained',
]
