"""`config.init_from`: starting a run from a previous run, a converted checkpoint or a file.

What the path names decides how strict the merge is (`merge.merge_variables`):

- a previous run's workdir (it has `checkpoints/`), e.g. FCN staging 32s -> 16s -> 8s: a
  partial merge takes every array whose path and shape match (backbone, score_fr, ...) and
  the rest (new score layers, upsamplers of another size) keeps its initialisation;
- a converted checkpoint (`python -m fcn_unet_jax.weights.convert`) or a raw weights file
  (converted on the fly): a strict merge that refuses unexpected or misshaped arrays and
  backbone arrays the file lacks, listing them all.
"""

import os
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from fcn_unet_jax import errors
from fcn_unet_jax.weights.converted import load_pretrained
from fcn_unet_jax.weights.merge import merge_variables
from fcn_unet_jax.weights.rules import Variables


def initialize_from(
    path: str | os.PathLike[str],
    variables: Mapping[str, Any],
    model_config: ml_collections.ConfigDict,
) -> Variables:
    """Overlays the variables that `path` names onto a model's initial variables.

    Args:
        path: `config.init_from`: a previous run's workdir, a directory written by
            `convert_file`, or a weights file (`.pth`, `.npz`, `.safetensors`, `.h5`, ...).
        variables: the model's initial variables (host arrays, or `jax.ShapeDtypeStruct`s to
            check the fit without computing anything).
        model_config: the `config.model` the variables were built from (`name` and
            `num_classes` select and convert the weights).

    Returns:
        The merged variables, with the structure of `variables` (plain dicts).

    Raises:
        WeightImportError: pretrained weights that do not fit the model, all problems listed.
        ValueError: a converted checkpoint made for another model.
        FileNotFoundError: nothing usable at `path`.
    """
    # checkpointing pulls in orbax, a noticeable part of `import fcn_unet_jax.weights`;
    # only this path needs it.
    from etils import epath

    from fcn_unet_jax import checkpointing

    path = os.fspath(path)
    if not epath.Path(path).exists():
        raise missing_weights_error(path, model_config.name)
    if (epath.Path(path) / checkpointing.CHECKPOINT_SUBDIR).exists():
        loaded = checkpointing.restore_variables(path)
        return merge_variables(variables, loaded, strict=False, origin=f'the run in {path}')
    loaded = load_pretrained(
        path, model_name=model_config.name, num_classes=model_config.num_classes
    )
    return merge_variables(
        variables, loaded, strict=True, origin=f'the pretrained checkpoint {path}'
    )


def missing_weights_error(path: str, model_name: str) -> errors.MissingInputError:
    """The error for a `config.init_from` that does not exist: how to make it, or skip it.

    The hint names the `download-weights` name when the path's last part is one
    (`weights/unet_vgg16_imagenet`), and the `convert-weights` command that makes the
    checkpoint from the original file.
    """
    from fcn_unet_jax.weights import download  # Only for this message.

    name = os.path.basename(os.path.normpath(path))
    original = download.ORIGINALS.get(name)
    if original is not None:
        folder = os.path.dirname(os.path.normpath(path)) or '.'
        make = (
            f'make it with `fcn-unet download-weights {name} --dir={folder}`, or from the '
            f'file {original.url} with `fcn-unet convert-weights --input={original.file_name} '
            f'--model={original.model} --output={path}`'
        )
    elif stage := re.fullmatch(r'fcn_voc_(\w+)', name):
        # FCN-16s and -8s start from the previous stage's run (configs/fcn_voc.py).
        make = (
            f"it is the previous FCN stage's run: train it first with `fcn-unet train "
            f'--config=fcn_voc:{stage[1]} --workdir={path}`'
        )
    else:
        make = (
            f'make it from a torchvision / Keras / smp weights file with `fcn-unet '
            f'convert-weights --input=FILE --model={model_name} --output={path}`, or, if '
            f'it is a previous run, train that run into it first'
        )
    return errors.MissingInputError(
        f'config.init_from={path!r}: no such file or folder (the pretrained weights this '
        'run starts from).',
        hint=f'{make}; or train from scratch with --config.init_from=None',
    )
