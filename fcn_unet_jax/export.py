r"""Export a trained run's inference function: serialized StableHLO and a TF SavedModel.

    python -m fcn_unet_jax.export --workdir=RUN --output=DIR \
        [--image_size=dynamic|H,W] [--output_kind=logits|softmax|argmax] \
        [--formats=stablehlo,saved_model] [--platforms=cpu,cuda,tpu]

`RUN` is a training workdir: its `config.json` rebuilds the model and its newest checkpoint
gives the variables. The exported function is whole-image inference, one view (no sliding
window, flips or scales): normalised float32 images [batch, H, W, C] (`metadata.json` says
how to normalise) to

  * `logits`: float32 [batch, H, W, num_classes] (the default);
  * `softmax`: float32 class probabilities, same shape;
  * `argmax`: int32 class ids [batch, H, W].

`DIR` then holds:

  * `model.stablehlo`: `jax.export` serialized StableHLO with the variables inside, lowered
    for every platform of `--platforms` in one artifact (default cpu, cuda and tpu); load
    with `jax.export.deserialize(bytearray(data)).call(images)`;
  * `saved_model/`: a TensorFlow SavedModel (jax2tf, native serialization: the same
    StableHLO inside an XlaCallModule op, the variables as TF variables), signature
    `serving_default` from `images` to `{output_kind: ...}`, ready for TF Serving;
  * `metadata.json`: model, class names and palette, input layout and shape, the
    normalisation (mean/std in pixel units, channel order), output kind and layout, source
    run and step, versions.

Image size: the batch is always free. `dynamic` (the default) also leaves H and W free:
any size for the torchvision-style FCNs (`FREE_SIZE_MODELS`, which resize their logits to
the input), multiples of `SIZE_MULTIPLE` (32, the encoders' total stride) for the others,
which pad other sizes internally by an amount JAX's shape polymorphism cannot reason
about. `--image_size=H,W` fixes them to any size. The classic (VALID) U-Net needs a fixed
size: its overlap-tile mirror padding depends on the size.

The artifacts use XLA's own ops (`config.model.plain_ops`): the CPU rewrites of
`fcn_unet_jax.ops` are chosen per platform, which would keep the free sizes from
exporting; the parameters and results are the same.

ONNX is not written: jax2onnx and tf2onnx do not convert these models yet (docs/export.md
says which operation fails).

The export is written to a temporary folder beside `DIR`, renamed to `DIR` when every
format is written; an existing `DIR` is never overwritten. Input errors are one
`error: ...` line with exit status 1 (`--traceback` adds the traceback).
"""

import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from fcn_unet_jax import checkpointing, errors, inference, models, xla_options
from fcn_unet_jax import workdir as workdir_files
from fcn_unet_jax.data import augment, builders, input_pipeline

FLAGS = flags.FLAGS

FORMAT = 'fcn_unet_jax.export/1'
OUTPUT_KINDS = ('logits', 'softmax', 'argmax')
FORMATS = ('stablehlo', 'saved_model')
PLATFORMS = ('cpu', 'cuda', 'tpu')
SIZE_MULTIPLE = 32
# Models that resize their logits to the input size (torchvision's FCN head): nothing in
# them has to divide the size, so they export with free heights and widths.
FREE_SIZE_MODELS = ('fcn_resnet50', 'fcn_resnet101')
STABLEHLO_FILE = 'model.stablehlo'
SAVED_MODEL_DIR = 'saved_model'
METADATA_FILE = 'metadata.json'
# ITU-R 601-2 luma weights as `augment.normalize` uses them for one-channel models.
_LUMA = tuple(w / 0.9999 for w in (0.2989, 0.5870, 0.1140))


def preprocessing(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """How to turn RGB pixels into the model's input, as `input_pipeline` does it.

    `input = (pixels[..., order] - mean) / std` per channel, with pixels in [0, 255]; for
    one-channel models the pixels are first reduced to grey with `grey_weights`.

    Args:
      config: the run's config (`input.normalization`, `model.name`, `model.input_channels`).

    Returns:
      {'normalization', 'channel_order' ('RGB', 'BGR' or 'grey'), 'grey_weights' (grey
      only), 'mean', 'std' (per input channel, pixel units), 'formula'}.
    """
    normalization = input_pipeline.normalization_for(config)
    channels = config.model.input_channels
    mean, std, bgr = augment.statistics(normalization, channels)
    result: dict[str, Any] = {
        'normalization': normalization,
        'channel_order': 'grey' if channels == 1 else 'BGR' if bgr else 'RGB',
    }
    if channels == 1:
        result['grey_weights'] = list(_LUMA)
    result['mean'] = [float(m) for m in mean]
    result['std'] = [float(s) for s in std]
    result['formula'] = 'input = (pixels[..., channel_order] - mean) / std, pixels in [0, 255]'
    return result


def whole_image_logits(model: Any, variables: Any, images: jax.Array) -> jax.Array:
    """`inference.logits` in whole-image mode, for a free batch size (traceable).

    SAME models see the image as given. The VALID U-Net gets the overlap-tile plan of
    `inference.plan_tiles` for one tile covering the image (mirror padding), which needs a
    static height and width.

    Returns:
      float32 logits [batch, H, W, classes].
    """
    geometry = inference.model_geometry(model)
    if geometry.margin == 0:
        return inference.main_logits(model.apply(variables, images, train=False)).astype(
            jnp.float32
        )
    height, width = images.shape[1:3]
    plan = inference.plan_tiles((height, width), inference.InferenceSettings(), geometry)
    m = plan.margin
    pad = ((0, 0), (m, m + plan.extent[0] - height), (m, m + plan.extent[1] - width), (0, 0))
    padded = jnp.pad(images, pad, mode='reflect')
    out = inference.main_logits(model.apply(variables, padded, train=False))
    return out[:, :height, :width].astype(jnp.float32)


def inference_function(model: Any, output_kind: str) -> Callable[[Any, jax.Array], jax.Array]:
    """`fn(variables, images)` giving `output_kind` of whole-image inference (traceable).

    The variables are an argument, so that jax2tf can keep them as TF variables.
    """
    if output_kind not in OUTPUT_KINDS:
        raise errors.UserError(f'--output_kind={output_kind!r}; expected one of {OUTPUT_KINDS}.')

    def fn(variables: Any, images: jax.Array) -> jax.Array:
        logits = whole_image_logits(model, variables, images)
        if output_kind == 'softmax':
            return jax.nn.softmax(logits, axis=-1)
        if output_kind == 'argmax':
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return logits

    return fn


def parse_image_size(value: str | Sequence[int] | None) -> tuple[int, int] | None:
    """'dynamic' (or None) -> None; 'H,W' or (H, W) -> (H, W) of positive ints."""
    if value is None or value == 'dynamic' or list(value) == ['dynamic']:
        return None
    parts = value.split(',') if isinstance(value, str) else list(value)
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise errors.UserError(
            f'--image_size={value!r}; expected dynamic or H,W (two positive integers).'
        )
    return size


def input_spec(
    model: Any, config: ml_collections.ConfigDict, image_size: tuple[int, int] | None
) -> tuple[str, jax.ShapeDtypeStruct]:
    """The symbolic input of the export: (shape description, ShapeDtypeStruct).

    Raises:
      UserError: a dynamic size for the VALID U-Net.
    """
    channels = config.model.input_channels
    if image_size is None:
        if inference.model_geometry(model).margin:
            raise errors.UserError(
                f"The run's model ({config.model.name}, padding VALID) needs a fixed image "
                'size: its overlap-tile padding depends on it.',
                hint='pass --image_size=H,W (any size; the output has the same H, W)',
            )
        if config.model.name in FREE_SIZE_MODELS:
            spec = f'batch, height, width, {channels}'
        else:
            spec = f'batch, {SIZE_MULTIPLE}*hk, {SIZE_MULTIPLE}*wk, {channels}'
    else:
        spec = f'batch, {image_size[0]}, {image_size[1]}, {channels}'
    shape = jax.export.symbolic_shape(spec)
    return spec, jax.ShapeDtypeStruct(shape, jnp.float32)


def export_stablehlo(
    fn: Callable, variables: Any, spec: jax.ShapeDtypeStruct, platforms: Sequence[str]
) -> jax.export.Exported:
    """`fn` with the variables as constants, exported for `platforms`."""
    return jax.export.export(jax.jit(lambda images: fn(variables, images)), platforms=platforms)(
        spec
    )


def write_saved_model(
    path: str,
    fn: Callable,
    variables: Any,
    polymorphic_shape: str,
    channels: int,
    output_kind: str,
    platforms: Sequence[str],
) -> None:
    """Writes a TF SavedModel of `fn` through jax2tf (native serialization)."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    tf_fn = jax2tf.convert(
        fn,
        polymorphic_shapes=[None, polymorphic_shape],
        native_serialization_platforms=tuple(platforms),
        with_gradient=False,
    )
    module = tf.Module()
    # Variables, not constants: a graph holding a full-size model as constants would pass
    # the 2 GiB protobuf limit.
    module.variables_ = tf.nest.map_structure(tf.Variable, variables)
    dims = [None if not d.isdigit() else int(d) for d in _dims(polymorphic_shape)]
    signature = tf.TensorSpec([None, *dims[1:3], channels], tf.float32, name='images')

    @tf.function(input_signature=[signature], autograph=False)
    def serve(images):
        return {output_kind: tf_fn(module.variables_, images)}

    module.serve = serve
    tf.saved_model.save(module, path, signatures={'serving_default': serve})


def _dims(spec: str) -> list[str]:
    return [d.strip() for d in spec.split(',')]


def class_metadata(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Class names and palette from the dataset builder's info (None where unavailable)."""
    try:
        metadata = builders.get_builder(config.dataset).info.metadata
    except Exception as error:  # The dataset's definition may be missing where one exports.
        logging.warning('No class names in the export: dataset %s: %s', config.dataset.name, error)
        return {'class_names': None, 'palette': None}
    palette = np.asarray(metadata['palette'], np.uint8).reshape(-1, 3)
    return {'class_names': list(metadata['class_names']), 'palette': palette.tolist()}


def export_run(
    workdir: str,
    output: str,
    *,
    image_size: tuple[int, int] | None = None,
    output_kind: str = 'logits',
    formats: Sequence[str] = FORMATS,
    platforms: Sequence[str] = PLATFORMS,
) -> dict[str, Any]:
    """Exports the newest checkpoint of `workdir` into the new folder `output`.

    Args:
      workdir: a training workdir.
      output: the folder to create (must not exist).
      image_size: (H, W), or None for free sizes (see the module docstring).
      output_kind: 'logits', 'softmax' or 'argmax'.
      formats: some of `FORMATS`.
      platforms: the platforms of the StableHLO and the SavedModel.

    Returns:
      The metadata written to `output/metadata.json`.

    Raises:
      UserError: an existing output, an unknown format, kind or platform, a dynamic size
        for the VALID U-Net, a missing optional package.
    """
    output = os.path.abspath(output)
    if os.path.exists(output):
        raise errors.UserError(
            f'{output} exists; an export never overwrites.', hint='choose a new --output'
        )
    unknown = sorted(set(formats) - set(FORMATS)) + sorted(set(platforms) - set(PLATFORMS))
    if unknown or not formats or not platforms:
        raise errors.UserError(
            f'Unknown or missing --formats / --platforms: {unknown or "none given"}; formats '
            f'are {FORMATS}, platforms {PLATFORMS}.'
        )
    config = workdir_files.read_config(workdir)
    _, variables = checkpointing.restore_model(workdir, config)
    step = checkpointing_step(workdir)
    model_config = config.model.copy_and_resolve_references()
    model_config.plain_ops = True
    model = models.build_model(model_config)
    fn = inference_function(model, output_kind)
    spec, abstract = input_spec(model, config, image_size)
    channels = config.model.input_channels
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    # A hidden sibling, renamed into place when complete; os.mkdir (not mkdtemp's 0700)
    # gives the permissions of any folder the user makes, for a server running as another user.
    staging = os.path.join(parent, f'.{os.path.basename(output)}.{uuid.uuid4().hex[:8]}')
    os.mkdir(staging)
    files = {}
    try:
        if 'stablehlo' in formats:
            exported = export_stablehlo(fn, variables, abstract, platforms)
            with open(os.path.join(staging, STABLEHLO_FILE), 'wb') as f:
                f.write(exported.serialize())
            files['stablehlo'] = STABLEHLO_FILE
            logging.info('Wrote StableHLO for %s.', ', '.join(platforms))
        if 'saved_model' in formats:
            write_saved_model(
                os.path.join(staging, SAVED_MODEL_DIR),
                fn,
                variables,
                spec,
                channels,
                output_kind,
                platforms,
            )
            files['saved_model'] = SAVED_MODEL_DIR
            logging.info('Wrote the SavedModel.')
        metadata = build_metadata(
            config, workdir, step, spec, image_size, output_kind, platforms, files
        )
        workdir_files.write_json(os.path.join(staging, METADATA_FILE), metadata)
        os.replace(staging, output)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return metadata


def checkpointing_step(workdir: str) -> int | None:
    """The step of the newest checkpoint in `workdir` (None when it cannot be read)."""
    steps = [
        int(name)
        for name in os.listdir(os.path.join(workdir, checkpointing.CHECKPOINT_SUBDIR))
        if name.isdigit()
    ]
    return max(steps) if steps else None


def build_metadata(
    config: ml_collections.ConfigDict,
    workdir: str,
    step: int | None,
    spec: str,
    image_size: tuple[int, int] | None,
    output_kind: str,
    platforms: Sequence[str],
    files: dict[str, str],
) -> dict[str, Any]:
    """The content of `metadata.json` (see the module docstring)."""
    import tensorflow as tf

    dims = _dims(spec)
    channels = int(config.model.input_channels)
    if image_size is None and config.model.name in FREE_SIZE_MODELS:
        size_rule = 'H and W: any'
    elif image_size is None:
        size_rule = f'H and W: any multiples of {SIZE_MULTIPLE}'
    else:
        size_rule = f'H = {image_size[0]}, W = {image_size[1]} exactly'
    output_shape = ['batch', 'H', 'W'] + ([] if output_kind == 'argmax' else ['num_classes'])
    return {
        'format': FORMAT,
        'model': config.model.name,
        'num_classes': int(config.model.num_classes),
        **class_metadata(config),
        'ignore_label': int(config.dataset.ignore_label),
        'input': {
            'name': 'images',
            'layout': 'NHWC',
            'dtype': 'float32',
            'shape': ['batch', *(int(d) if d.isdigit() else d for d in dims[1:3]), channels],
            'size_rule': f'batch: any; {size_rule}',
        },
        'preprocessing': preprocessing(config),
        'output': {
            'kind': output_kind,
            'dtype': 'int32' if output_kind == 'argmax' else 'float32',
            'shape': output_shape,
            'layout': 'NHW (class ids)' if output_kind == 'argmax' else 'NHWC',
        },
        'inference': 'whole image, one view (config.eval sliding windows, flips and scales '
        'are not part of the export)',
        'platforms': list(platforms),
        'files': files,
        'source': {'workdir': os.path.abspath(workdir), 'step': step},
        'versions': {'jax': jax.__version__, 'tensorflow': tf.__version__},
    }


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines the program's flags (when run as a program, or in a test's own FlagValues)."""
    fv = {'flag_values': flag_values}
    flags.DEFINE_string('workdir', None, 'Training workdir (config.json and checkpoints).', **fv)
    flags.DEFINE_string('output', None, 'New folder for the exported model.', **fv)
    flags.DEFINE_string(
        'image_size',
        'dynamic',
        f'dynamic (free H, W, multiples of {SIZE_MULTIPLE}) or H,W (fixed). The batch is free.',
        **fv,
    )
    flags.DEFINE_enum('output_kind', 'logits', list(OUTPUT_KINDS), 'What the model returns.', **fv)
    flags.DEFINE_list(
        'formats', list(FORMATS), f'Comma-separated, some of {", ".join(FORMATS)}.', **fv
    )
    flags.DEFINE_list(
        'platforms', list(PLATFORMS), 'Platforms the StableHLO and SavedModel run on.', **fv
    )
    flags.mark_flags_as_required(['workdir', 'output'], flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> None:
    """Exports with the command-line flags.

    Args:
      argv: the arguments left after flag parsing (the program name only).
      flag_values: the parsed flags (`define_flags`).
    """
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    fv = flag_values
    metadata = export_run(
        fv.workdir,
        fv.output,
        image_size=parse_image_size(fv.image_size),
        output_kind=fv.output_kind,
        formats=fv.formats,
        platforms=fv.platforms,
    )
    print(f'Wrote {", ".join(metadata["files"].values())} and {METADATA_FILE} to {fv.output}')


if __name__ == '__main__':
    xla_options.set_default_flags()  # Before JAX starts its backends.
    define_flags()
    app.run(errors.guard(main), flags_parser=errors.parse_flags)
