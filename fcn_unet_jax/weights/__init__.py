"""Pretrained weights: import torchvision, segmentation_models_pytorch and Keras files.

Sources: torchvision ImageNet `resnet50` / `resnet101` / `vgg16`, torchvision
`fcn_resnet50` / `fcn_resnet101`, segmentation_models_pytorch `Unet` (resnet50 or vgg16
encoder) as `.pth`/`.pt`/`.bin`/`.ckpt` (needs torch), `.npz` or `.safetensors`; Keras
Applications `VGG16` / `ResNet50` as `.h5`/`.keras` (read with h5py, Keras not needed).
Nothing here downloads anything but `download` (its own command), which fetches the
published originals, checks their hashes and converts them.

Which encoder and head a model has comes from the model registry (`models.MODELS`).
Conversion checks a whole file first and raises one `WeightImportError` listing every
missing, unexpected and misshaped key, so a wrong file never half-initialises a model.

Typical use, in Python:

    pretrained = weights.from_torchvision(weights.load_state_dict('resnet50.pth'),
                                          'fcn_resnet50')
    variables = weights.merge_pretrained(model.init(rng, images, train=False), pretrained)

or once on the command line, then train with `--config.init_from=DIR`:

    python -m fcn_unet_jax.weights.convert --input=resnet50.pth --model=fcn_resnet50 --output=DIR

Modules: `readers` (files -> arrays), `rules` (the rule type and the all-at-once check),
`torchvision` and `keras` (rule tables per source), `merge` (the one merge path, strict for
pretrained imports, partial for a previous run), `converted` (converted checkpoints on
disk), `init_from` (what training calls for `config.init_from`), `convert` (the CLI).
"""

from fcn_unet_jax.weights.converted import convert_file, is_pretrained_checkpoint, load_pretrained
from fcn_unet_jax.weights.errors import WeightImportError
from fcn_unet_jax.weights.init_from import initialize_from
from fcn_unet_jax.weights.keras import from_keras
from fcn_unet_jax.weights.merge import merge_pretrained, merge_variables
from fcn_unet_jax.weights.readers import load_state_dict
from fcn_unet_jax.weights.rules import Variables
from fcn_unet_jax.weights.torchvision import from_torchvision

__all__ = [
    'Variables',
    'WeightImportError',
    'convert_file',
    'from_keras',
    'from_torchvision',
    'initialize_from',
    'is_pretrained_checkpoint',
    'load_pretrained',
    'load_state_dict',
    'merge_pretrained',
    'merge_variables',
]
