"""Prediction CLI: segment image files with a trained run and write masks and overlays.

    python -m fcn_unet_jax.predict --workdir=DIR --input=PATH --output=OUTDIR \\
        [--mode=whole|sliding --window_size=H,W --window_overlap=F --flip \\
         --scales=0.75,1,1.25 --batch_size=N]

`DIR` is a training workdir: its resolved `config.json` (see `workdir.py`) rebuilds the
model and its newest checkpoint gives the variables. `PATH` is an image file, a folder (its
image files, not recursive) or a glob pattern. For each input `NAME.ext` three PNGs go to
`OUTDIR`: `NAME.png` (class ids, mode L), `NAME_color.png` (the dataset palette) and
`NAME_overlay.png` (the palette blended over the image). The flags override the run's
`config.eval` (and `--batch_size` its `eval_batch_size`: images per call and windows per
network call).

Images keep their own size: consecutive inputs of equal size are batched, any other size is
a new call (and one compilation per distinct size). Sliding-window mode bounds device memory
for large images. Every call runs through `inference.Predictor` on a mesh of all
devices. Files that cannot be read are logged and skipped; the exit status is non-zero only
when no input could be processed.
"""

import collections
import dataclasses
import glob
import os
import sys
from collections.abc import Iterator, Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from PIL import Image

from fcn_unet_jax import checkpointing, inference, models, sharding, visualize, xla_options
from fcn_unet_jax import workdir as workdir_files
from fcn_unet_jax.data import builders, input_pipeline

IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.ppm', '.tif', '.tiff', '.webp')

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class PredictionResult:
    """What `predict_paths` did.

    Attributes:
      written: the index-mask paths written, one per processed input, in input order.
      failed: (input path, error message) of every input that could not be read.
    """

    written: tuple[str, ...]
    failed: tuple[tuple[str, str], ...]


def override_eval(
    config: ml_collections.ConfigDict,
    *,
    mode: str | None = None,
    window_size: Sequence[int] | None = None,
    window_overlap: float | None = None,
    flip: bool | None = None,
    scales: Sequence[float] | None = None,
    batch_size: int | None = None,
) -> None:
    """Overrides `config.eval` fields (and `eval_batch_size`) in place; None keeps a field."""
    for field, value in (
        ('mode', mode),
        ('window_size', None if window_size is None else tuple(int(s) for s in window_size)),
        ('window_overlap', window_overlap),
        ('flip', flip),
        ('scales', None if scales is None else tuple(float(s) for s in scales)),
    ):
        if value is not None:
            config.eval[field] = value
    if batch_size is not None:
        config.eval_batch_size = int(batch_size)


def find_inputs(path: str) -> list[str]:
    """Expands `path` (a file, a folder's image files or a glob) into sorted file paths.

    Raises:
      FileNotFoundError: when nothing matches.
    """
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        found = [os.path.join(path, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        found = [p for p in found if os.path.isfile(p)]
    else:
        found = sorted(p for p in glob.glob(path) if os.path.isfile(p))
    if not found:
        raise FileNotFoundError(f'No input images at {path!r}.')
    return found


def read_image(path: str) -> np.ndarray:
    """Reads any Pillow-readable image as uint8 RGB [H, W, 3] (grey is repeated to RGB).

    One-channel models get the grey value back: `preprocess_image` takes the luma of RGB.
    """
    with Image.open(path) as image:
        return np.asarray(image.convert('RGB'), np.uint8)


def _readable(paths: Sequence[str], failed: list) -> Iterator[tuple[str, np.ndarray]]:
    for path in paths:
        try:
            image = read_image(path)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            logging.warning(
                'Skipping %s: cannot read it (%s: %s).', path, type(error).__name__, error
            )
            failed.append((path, f'{type(error).__name__}: {error}'))
        else:
            yield path, image


def _same_size_batches(
    images: Iterator[tuple[str, np.ndarray]], batch_size: int
) -> Iterator[list[tuple[str, np.ndarray]]]:
    """Groups consecutive equal-size images, at most `batch_size` at a time."""
    batch: list[tuple[str, np.ndarray]] = []
    for item in images:
        if batch and (len(batch) == batch_size or item[1].shape != batch[0][1].shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def palette_of(config: ml_collections.ConfigDict) -> np.ndarray:
    """The dataset's uint8 [num_classes, 3] palette (from the builder's metadata).

    The builder's info is read without preparing the dataset, so a workdir can predict
    where only the builder's definition (not its data) is available.
    """
    metadata = builders.get_builder(config.dataset).info.metadata
    return np.asarray(metadata['palette'], np.uint8).reshape(-1, 3)


def output_names(paths: Sequence[str]) -> dict[str, str]:
    """A distinct output base name per input path, so no prediction overwrites another.

    The name is the file's stem (`a.jpg` -> `a`). Inputs that share a stem (`a.jpg` and
    `a.png`, or `x/a.png` and `y/a.png` from a glob) keep their extension (`a_jpg`), and
    any names still shared get a running number (`a_png_1`).

    Args:
      paths: input image paths.

    Returns:
      Mapping from each path to its output base name.
    """
    stems = {path: os.path.splitext(os.path.basename(path))[0] for path in paths}
    stem_counts = collections.Counter(stems.values())
    names = {}
    for path, stem in stems.items():
        if stem_counts[stem] > 1:
            stem = f'{stem}_{os.path.splitext(path)[1].lstrip(".").lower()}'
        names[path] = stem
    name_counts = collections.Counter(names.values())
    seen = collections.Counter()
    for path, name in names.items():
        if name_counts[name] > 1:
            seen[name] += 1
            names[path] = f'{name}_{seen[name]}'
    return names


def predict_paths(
    workdir: str,
    paths: Sequence[str],
    output_dir: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    **overrides,
) -> PredictionResult:
    """Segments image files with the newest checkpoint of `workdir` and writes the PNGs.

    Args:
      workdir: a training workdir.
      paths: image files (see `find_inputs`).
      output_dir: where `NAME.png`, `NAME_color.png` and `NAME_overlay.png` are written.
      mesh: the device mesh; default all devices on the 'data' axis.
      **overrides: keyword arguments of `override_eval` (mode, window_size, ...).

    Returns:
      The written masks and the inputs that failed.
    """
    config = workdir_files.read_config(workdir)
    override_eval(config, **overrides)
    if config.model.num_classes > 256:
        raise ValueError('Index masks are 8-bit PNGs; more than 256 classes do not fit.')
    model = models.build_model(config.model)
    variables = checkpointing.restore_variables(workdir)
    mesh = sharding.create_mesh() if mesh is None else mesh
    predictor = inference.Predictor(
        model, variables, inference.InferenceSettings.from_config(config), mesh
    )
    palette = palette_of(config)
    ignore_label = config.dataset.ignore_label
    os.makedirs(output_dir, exist_ok=True)
    names = output_names(paths)
    written, failed = [], []
    for batch in _same_size_batches(_readable(paths, failed), config.eval_batch_size):
        images = np.stack([image for _, image in batch])
        ids = np.asarray(predictor.predict(input_pipeline.preprocess_image(images, config)))
        for (path, image), label in zip(batch, ids, strict=True):
            stem = os.path.join(output_dir, names[path])
            Image.fromarray(label.astype(np.uint8)).save(stem + '.png')
            colour = visualize.colorize(label, palette, ignore_label=ignore_label)
            visualize.save_png(stem + '_color.png', colour)
            blended = visualize.overlay(image, label, palette, ignore_label=ignore_label)
            visualize.save_png(stem + '_overlay.png', blended)
            written.append(stem + '.png')
        logging.info('Predicted %d image(s) of size %s.', len(batch), images.shape[1:3])
    return PredictionResult(written=tuple(written), failed=tuple(failed))


def run(workdir: str, input_path: str, output_dir: str, **overrides) -> int:
    """Predicts every image at `input_path` (see `find_inputs`) and returns the exit status.

    Args:
      workdir: a training workdir.
      input_path: an image file, a folder or a glob pattern.
      output_dir: where the PNGs go.
      **overrides: keyword arguments of `override_eval`.

    Returns:
      0 when at least one image was written, else 1.
    """
    result = predict_paths(workdir, find_inputs(input_path), output_dir, **overrides)
    logging.info(
        'Wrote %d mask(s) to %s; %d input(s) skipped.',
        len(result.written),
        output_dir,
        len(result.failed),
    )
    return 0 if result.written else 1


_INFERENCE_FLAGS = ('mode', 'window_size', 'window_overlap', 'flip', 'scales', 'batch_size')


def define_inference_flags() -> None:
    """Defines the flags that override `config.eval` (shared with `predict_volume`)."""
    flags.DEFINE_enum('mode', None, list(inference.MODES), 'Overrides config.eval.mode.')
    flags.DEFINE_list('window_size', None, 'H,W: overrides config.eval.window_size.')
    flags.DEFINE_float('window_overlap', None, 'Overrides config.eval.window_overlap.')
    flags.DEFINE_bool('flip', None, 'Overrides config.eval.flip (left-right flip TTA).')
    flags.DEFINE_list('scales', None, 'Comma-separated scales: overrides config.eval.scales.')
    flags.DEFINE_integer(
        'batch_size', None, 'Overrides config.eval_batch_size (images or slices per call).'
    )


def inference_overrides() -> dict:
    """The values of the `define_inference_flags` flags, as `override_eval` keywords."""
    return {name: FLAGS[name].value for name in _INFERENCE_FLAGS}


def _define_flags() -> None:
    # Defined only when run as a program, so importing this module next to
    # `fcn_unet_jax.main` (which has --workdir and --mode too) cannot clash.
    flags.DEFINE_string('workdir', None, 'Training workdir (config.json and checkpoints).')
    flags.DEFINE_string('input', None, 'An image file, a folder of images or a glob pattern.')
    flags.DEFINE_string('output', None, 'Folder for the masks and overlays.')
    define_inference_flags()
    flags.mark_flags_as_required(['workdir', 'input', 'output'])


def main(argv: list[str]) -> None:
    """Runs `run` with the command-line flags and exits with its status."""
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    sys.exit(run(FLAGS.workdir, FLAGS.input, FLAGS.output, **inference_overrides()))


if __name__ == '__main__':
    xla_options.set_default_flags()  # Before JAX starts its backends.
    _define_flags()
    app.run(main)
