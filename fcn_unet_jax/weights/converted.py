"""Converted checkpoints on disk: write once with `convert_file`, read with `load_pretrained`.

A converted checkpoint is a directory holding `variables/` (an orbax `StandardCheckpointer`
checkpoint of the Flax variables) and `pretrained.json` (format, model name, source file,
what was imported). Converting checks the variables against the named model with the merge
that training uses (`merge.merge_variables`, strict), so a file that `config.init_from`
would refuse is refused here, with the same error, before anything is written.
"""

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fcn_unet_jax import models
from fcn_unet_jax.weights import readers
from fcn_unet_jax.weights.keras import import_keras
from fcn_unet_jax.weights.merge import merge_variables
from fcn_unet_jax.weights.rules import Imported, Variables, model_parts
from fcn_unet_jax.weights.torchvision import SMP_DECODER_CHANNELS, import_torchvision

METADATA_FILE = 'pretrained.json'
_VARIABLES_DIR = 'variables'
_FORMAT = 'fcn_unet_jax.pretrained/1'
SOURCES = ('torchvision', 'keras')
# The class count of the model a backbone-only import is checked against: any count fits,
# since such an import has no output layer.
_ANY_CLASSES = 21


def guess_source(path: str, source: str | None) -> str:
    """'keras' for `.h5`/`.hdf5`/`.keras` files, 'torchvision' otherwise, unless given.

    Args:
        path: the weights file.
        source: the user's choice, returned as is when not None.

    Returns:
        'torchvision' or 'keras'.
    """
    if source is not None:
        return source
    suffix = os.path.splitext(path)[1].lower()
    return 'keras' if suffix in readers.KERAS_SUFFIXES else 'torchvision'


def import_file(
    path: str, model_name: str, *, num_classes: int | None, source: str | None
) -> Imported:
    """Reads and converts a weights file for `model_name` (torchvision/smp or Keras).

    Args:
        path: the weights file.
        model_name: the model the variables are for.
        num_classes: the model's class count (see `from_torchvision`).
        source: 'torchvision', 'keras' or None (guessed from the extension).

    Returns:
        The converted variables and what was imported.

    Raises:
        ValueError: an unknown `source`.
    """
    source = guess_source(path, source)
    if source == 'keras':
        return import_keras(path, model_name)
    if source == 'torchvision':
        return import_torchvision(
            readers.load_state_dict(path), model_name, num_classes=num_classes, origin=repr(path)
        )
    raise ValueError(f'Unknown weights source {source!r}: one of {SOURCES}.')


def model_config_for(
    model_name: str, imported: Imported, *, num_classes: int | None, source: str
) -> ml_collections.ConfigDict:
    """The `config.model` that `imported` is checked against when converting.

    Every field has the value of `configs/default.py` (the paper's model: None means the
    paper's default), except what the source fixes: the name, the class count (the argument,
    else the imported output layer's), the ResNet variant ('caffe' for Keras' ResNet50), the
    aux head (when one was imported) and smp's decoder widths (read from the import).

    Args:
        model_name: the model.
        imported: the conversion's outcome.
        num_classes: the class count given to the converter, or None.
        source: 'torchvision' or 'keras'.

    Returns:
        A model config for `models.build_model`.
    """
    encoder, _ = model_parts(model_name)
    params = imported.variables.get('params', {})
    decoder_channels = list(SMP_DECODER_CHANNELS)
    for j in range(len(decoder_channels)):
        block = params.get('decoder', {}).get(f'block{j}')
        if block is not None:  # An imported smp decoder fixes its widths.
            decoder_channels[j] = int(block['conv2']['kernel'].shape[-1])
    # configs/ is not part of the installed package, so its model defaults are written out
    # here; tests/weights/test_convert.py keeps them equal to configs/default.py's.
    config = ml_collections.ConfigDict()
    config.name = model_name
    config.num_classes = num_classes or imported.num_classes or _ANY_CLASSES
    config.input_channels = 3  # ImageNet's RGB: every pretrained encoder's conv1.
    config.dtype = 'float32'
    config.width = 1.0  # ImageNet's widths.
    config.skip_strides = None
    config.merge = None
    config.dropout_rate = None
    config.learnable_upsampling = False
    config.aux_head = 'aux_classifier' in params
    keras_resnet = source == 'keras' and encoder.startswith('resnet')
    config.resnet_variant = 'caffe' if keras_resnet else 'torchvision'
    config.padding = 'SAME'
    config.batch_norm = False
    config.decoder_channels = tuple(decoder_channels)
    config.remat = False
    config.plain_ops = False
    config.batch_norm_stats = 'global'
    return config


def check_fits(model_config: ml_collections.ConfigDict, variables: Variables, origin: str) -> None:
    """Merges `variables` (strictly) into the abstract initial variables of the model.

    Nothing is computed: the model's variables come from `jax.eval_shape` of its `init`.

    Args:
        model_config: the model section of a config.
        variables: pretrained variables.
        origin: what `variables` came from, for the error.

    Raises:
        WeightImportError: the variables do not fit (the error training would raise).
    """
    model = models.build_model(model_config)
    abstract = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct(models.example_input_shape(model_config), jnp.float32),
    )
    merge_variables(abstract, variables, strict=True, origin=origin)


def convert_file(
    input_path: str | os.PathLike[str],
    model_name: str,
    output_dir: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    source: str | None = None,
) -> Variables:
    """Converts a weights file into an orbax checkpoint that `config.init_from` can name.

    Writes `output_dir/variables` (an orbax `StandardCheckpointer` checkpoint of the Flax
    variables) and `output_dir/pretrained.json` (model name, source file, what was imported),
    after checking that the variables fit the model (see `model_config_for`).

    Args:
        input_path: `.pth`/`.pt`/`.npz`/`.safetensors` (torchvision, smp) or `.h5`/`.keras`.
        model_name: the model the checkpoint is for.
        output_dir: a new or empty directory.
        num_classes: the model's class count (see `from_torchvision`).
        source: 'torchvision' or 'keras'; None guesses from the extension.

    Returns:
        The converted variables.

    Raises:
        WeightImportError: the file does not fit the model (nothing is written).
        FileExistsError: `output_dir` already holds a checkpoint.
    """
    # orbax costs a noticeable part of `import fcn_unet_jax.weights`; only disk I/O needs it.
    import orbax.checkpoint as ocp

    input_path, output_dir = os.fspath(input_path), os.path.abspath(os.fspath(output_dir))
    source = guess_source(input_path, source)
    result = import_file(input_path, model_name, num_classes=num_classes, source=source)
    model_config = model_config_for(model_name, result, num_classes=num_classes, source=source)
    check_fits(model_config, result.variables, f'{input_path!r} converted for {model_name!r}')
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise FileExistsError(f'{output_dir!r} is not empty; choose a new --output directory.')
    os.makedirs(output_dir, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(output_dir, _VARIABLES_DIR), result.variables)
    checkpointer.wait_until_finished()
    metadata = {
        'format': _FORMAT,
        'model': model_name,
        'source': source,
        'input': os.path.abspath(input_path),
        'imported': result.scope,
        'num_classes': result.num_classes,
        'skipped': result.skipped,
    }
    with open(os.path.join(output_dir, METADATA_FILE), 'w') as f:
        json.dump(metadata, f, indent=2)
    return result.variables


def is_pretrained_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a directory written by `convert_file` (not, e.g., a run's workdir).

    Args:
        path: a directory or file name.

    Returns:
        True if `load_pretrained(path)` reads a converted checkpoint.
    """
    return os.path.isfile(os.path.join(os.fspath(path), METADATA_FILE))


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    source: str | None = None,
) -> Variables:
    """Loads pretrained variables for `config.init_from`.

    Args:
        path: a directory written by `convert_file` (or the CLI), or a weights file that is
            converted on the fly (then `model_name` is required).
        model_name: the model being initialised; a converted checkpoint made for another
            model is refused.
        num_classes: for a weights file: the model's class count (see `from_torchvision`).
        source: for a weights file: 'torchvision' or 'keras'; None guesses from the extension.

    Returns:
        Variables to pass to `merge_pretrained` with the model's initial variables.

    Raises:
        ValueError: the checkpoint was converted for another model, or `model_name` is missing
            for a raw weights file.
        FileNotFoundError: nothing usable at `path`.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        metadata = _read_metadata(path)
        if model_name is not None and metadata['model'] != model_name:
            raise ValueError(
                f'{path!r} was converted for model {metadata["model"]!r} but the config builds '
                f'{model_name!r}; convert {metadata["input"]!r} again with --model={model_name}.'
            )
        import orbax.checkpoint as ocp

        return ocp.StandardCheckpointer().restore(os.path.join(path, _VARIABLES_DIR))
    if model_name is None:
        raise ValueError(f'Converting {path!r} on the fly needs model_name.')
    return import_file(path, model_name, num_classes=num_classes, source=source).variables


def _read_metadata(path: str) -> dict[str, Any]:
    if not is_pretrained_checkpoint(path):
        raise FileNotFoundError(
            f'{path!r} is not a converted pretrained checkpoint (no {METADATA_FILE}); create '
            'one with `python -m fcn_unet_jax.weights.convert`.'
        )
    with open(os.path.join(path, METADATA_FILE)) as f:
        return json.load(f)
