"""Prediction CLI: segment image files with a trained run and write masks and overlays.

    python -m fcn_unet_jax.predict --workdir=DIR --input=PATH --output=OUTDIR \\
        [--mode=whole|sliding --window_size=H,W --window_overlap=F --flip \\
         --scales=0.75,1,1.25 --batch_size=N]

`DIR` is a training workdir: its resolved `config.json` (see `workdir.py`) rebuilds the
model and its newest checkpoint gives the variables. `PATH` is an image file, a folder (its
image files, not recursive) or a glob pattern. For each input `NAME.ext` three PNGs go to
`OUTDIR`: `NAME.png` (class ids, mode L), `NAME_color.png` (the dataset palette) and
`NAME_overlay.png` (the palette blended over the image, above a legend of the classes it
shows). The flags override the run's
`config.eval` (and `--batch_size` its `eval_batch_size`: images per call and windows per
network call).

Images keep their own size: consecutive inputs of equal size are batched, any other size is
a new call (and one compilation per distinct size). Sliding-window mode bounds device memory
for large images. Every call runs through `inference.Predictor` on a mesh of all
devices. Files that cannot be read are logged and skipped; the exit status is non-zero only
when no input could be processed. `OUTDIR` is created only when the first mask is written,
so a failed command leaves no empty folder.

Errors in the input (a missing workdir or input, a checkpoint that does not fit the run's
config.json, no readable image) are printed as one `error: ...` line, plus a `hint: ...`
line where there is one, with exit status 1; `--traceback` adds the traceback (see
`fcn_unet_jax.errors`).
"""

import collections
import dataclasses
import glob
import os
from collections.abc import Iterator, Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from PIL import Image

from fcn_unet_jax import (
    checkpointing,
    errors,
    inference,
    metrics,
    sharding,
    visualize,
    xla_options,
)
from fcn_unet_jax import workdir as workdir_files
from fcn_unet_jax.data import builders, input_pipeline
from fcn_unet_jax.data.builders.common import decode_reason

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
      MissingInputError: when nothing matches (a FileNotFoundError).
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
        raise errors.MissingInputError(
            f'No input images at {path!r}.',
            hint=f'give an image file, a folder of {", ".join(IMAGE_EXTENSIONS)} files or a glob',
        )
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
            reason = decode_reason(error)
            logging.warning('Skipping %s: %s', path, reason)
            failed.append((path, reason))
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

    Raises:
      UserError: the workdir is not a training run, or its checkpoint does not fit its
        config (see `checkpointing.restore_model`).
    """
    config = workdir_files.read_config(workdir)
    override_eval(config, **overrides)
    if config.model.num_classes > 256:
        raise errors.UserError(
            f'The run in {workdir} has {config.model.num_classes} classes; index masks are '
            '8-bit PNGs, so more than 256 classes do not fit.'
        )
    model, variables = checkpointing.restore_model(workdir, config)
    mesh = sharding.create_mesh() if mesh is None else mesh
    predictor = inference.Predictor(
        model, variables, inference.InferenceSettings.from_config(config), mesh
    )
    palette = palette_of(config)
    class_names = builders.get_builder(config.dataset).info.metadata['class_names']
    ignore_label = config.dataset.ignore_label
    names = output_names(paths)
    written, failed = [], []
    for batch in _same_size_batches(_readable(paths, failed), config.eval_batch_size):
        images = np.stack([image for _, image in batch])
        ids = np.asarray(predictor.predict(input_pipeline.preprocess_image(images, config)))
        os.makedirs(output_dir, exist_ok=True)  # Only now: a failed command leaves no folder.
        for (path, image), label in zip(batch, ids, strict=True):
            stem = os.path.join(output_dir, names[path])
            Image.fromarray(label.astype(np.uint8)).save(stem + '.png')
            colour = visualize.colorize(label, palette, ignore_label=ignore_label)
            visualize.save_png(stem + '_color.png', colour)
            blended = visualize.overlay(image, label, palette, ignore_label=ignore_label)
            shown = visualize.present_classes(
                label, num_classes=len(class_names), ignore_label=ignore_label
            )
            blended = visualize.with_legend(blended, class_names, palette, classes=shown)
            visualize.save_png(stem + '_overlay.png', blended)
            written.append(stem + '.png')
        # A progress line, not one per batch: at most every 10 s.
        logging.log_every_n_seconds(logging.INFO, 'Predicted %d image(s) so far.', 10, len(written))
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
    return 0 if _predict(workdir, input_path, output_dir, **overrides).written else 1


def _predict(workdir: str, input_path: str, output_dir: str, **overrides) -> PredictionResult:
    result = predict_paths(workdir, find_inputs(input_path), output_dir, **overrides)
    logging.info(
        'Wrote %d mask(s) to %s; %d input(s) skipped.',
        len(result.written),
        output_dir,
        len(result.failed),
    )
    return result


def nothing_written_error(failed: Sequence[tuple[str, str]], output_dir: str) -> errors.UserError:
    """The error of a command that could read none of its `failed` inputs."""
    path, reason = failed[0]
    others = f' (and {len(failed) - 1} more input(s), see the warnings)' if len(failed) > 1 else ''
    return errors.UserError(
        f'No input could be read, nothing was written to {output_dir}: {path}: {reason}{others}.'
    )


LABELS_FILE = 'metrics.json'


def find_label(labels_dir: str, image_path: str) -> str | None:
    """The ground-truth mask in `labels_dir` with the stem of `image_path`, or None.

    `a.jpg` matches `labels_dir/a.png` (or any image extension; PNG first, as masks must be
    lossless).
    """
    stem = os.path.splitext(os.path.basename(image_path))[0]
    for extension in ('.png', *IMAGE_EXTENSIONS):
        candidate = os.path.join(labels_dir, stem + extension)
        if os.path.isfile(candidate):
            return candidate
    return None


def read_label(path: str) -> np.ndarray:
    """Reads a ground-truth mask of class ids (a single-channel or palette image) as int32.

    Raises:
      ValueError: an RGB(A) image, whose colours are not class ids.
    """
    with Image.open(path) as image:
        if image.mode not in ('1', 'L', 'P', 'I', 'I;16'):
            raise ValueError(
                f'{path} is a {image.mode} image; ground-truth masks must hold class ids in '
                'one channel (mode L or P, as the predicted NAME.png).'
            )
        return np.asarray(image, np.int32)


def score_with_labels(
    workdir: str, input_path: str, result: PredictionResult, labels_dir: str, output_dir: str
) -> dict:
    """Scores the masks `predict_paths` wrote against ground truth; writes `metrics.json`.

    Each processed input `NAME.ext` is matched with the mask of the same stem in
    `labels_dir` (see `find_label`); its predicted `NAME.png` is read back (class ids,
    lossless) and the two are counted with `metrics.segmentation_counts`, the ignore label
    of the run's dataset left out. The counts are summed over the images, so the metrics
    are those `--mode=eval` reports for a split: the FCN set, Dice, Boundary IoU and the
    trimap metrics.

    Args:
      workdir: the training workdir (its config gives classes and ignore label).
      input_path: the `--input` that `result` was predicted from.
      result: what `predict_paths` returned.
      labels_dir: folder of ground-truth masks.
      output_dir: where `metrics.json` is written (next to the masks).

    Returns:
      The report written to `output_dir/metrics.json`: every metric (per-class values by
      class name), `confusion_matrix`, `num_images`, `per_image` (input path -> its own
      mean IoU, Boundary IoU and pixel accuracy) and `unscored` (input path -> why).

    Raises:
      errors.MissingInputError: `labels_dir` is not a folder.
      errors.UserError: no image could be scored.
    """
    if not os.path.isdir(labels_dir):
        raise errors.MissingInputError(f'--labels={labels_dir} is not a folder.')
    config = workdir_files.read_config(workdir)
    num_classes, ignore_label = config.model.num_classes, config.dataset.ignore_label
    class_names = builders.get_builder(config.dataset).info.metadata['class_names']
    count = jax.jit(metrics.segmentation_counts, static_argnums=(2, 3))
    failed = {path for path, _ in result.failed}
    processed = [path for path in find_inputs(input_path) if path not in failed]
    totals = metrics.zero_counts(num_classes)
    per_image, unscored = {}, {}
    for path, mask_path in zip(processed, result.written, strict=True):
        label_path = find_label(labels_dir, path)
        if label_path is None:
            unscored[path] = f'no mask with its stem in {labels_dir}'
            continue
        try:
            label = read_label(label_path)
        except (OSError, ValueError) as error:
            unscored[path] = str(error)
            continue
        with Image.open(mask_path) as image:
            prediction = np.asarray(image, np.int32)
        if label.shape != prediction.shape:
            unscored[path] = f'{label_path} is {label.shape}, the image {prediction.shape}'
            continue
        counts = {
            k: np.asarray(v) for k, v in count(label, prediction, num_classes, ignore_label).items()
        }
        for key, value in counts.items():
            totals[key] += value
        image_scores = metrics.scores_from_counts(counts)
        per_image[path] = {
            key: image_scores[key] for key in ('mean_iou', 'boundary_iou', 'pixel_accuracy')
        }
    for path, reason in unscored.items():
        logging.warning('Not scored: %s (%s).', path, reason)
    if not per_image:
        raise errors.UserError(
            f'No prediction could be scored against {labels_dir}.',
            hint='Name each mask after its image (a.jpg -> a.png), with class ids as pixels.',
        )
    scores = metrics.scores_from_counts(totals)
    report = {
        key: dict(zip(class_names, value, strict=True)) if key.startswith('per_class_') else value
        for key, value in scores.items()
    }
    report |= {
        'confusion_matrix': totals['confusion'].tolist(),
        'class_names': list(class_names),
        'num_images': len(per_image),
        'labels': labels_dir,
        'per_image': per_image,
        'unscored': unscored,
    }
    report = workdir_files.jsonable(report)
    workdir_files.write_json(os.path.join(output_dir, LABELS_FILE), report)
    logging.info(
        'Scored %d image(s) against %s: mean IoU %.4f, Boundary IoU %.4f; wrote %s.',
        len(per_image),
        labels_dir,
        scores['mean_iou'],
        scores['boundary_iou'],
        os.path.join(output_dir, LABELS_FILE),
    )
    return report


_INFERENCE_FLAGS = ('mode', 'window_size', 'window_overlap', 'flip', 'scales', 'batch_size')


def define_inference_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines the flags that override `config.eval` (shared with `predict_volume`)."""
    fv = {'flag_values': flag_values}
    flags.DEFINE_enum('mode', None, list(inference.MODES), 'Overrides config.eval.mode.', **fv)
    flags.DEFINE_list('window_size', None, 'H,W: overrides config.eval.window_size.', **fv)
    flags.DEFINE_float('window_overlap', None, 'Overrides config.eval.window_overlap.', **fv)
    flags.DEFINE_bool('flip', None, 'Overrides config.eval.flip (left-right flip TTA).', **fv)
    flags.DEFINE_list('scales', None, 'Comma-separated scales: overrides config.eval.scales.', **fv)
    flags.DEFINE_integer(
        'batch_size', None, 'Overrides config.eval_batch_size (images or slices per call).', **fv
    )


def inference_overrides(flag_values: flags.FlagValues = FLAGS) -> dict:
    """The values of the `define_inference_flags` flags, as `override_eval` keywords."""
    return {name: flag_values[name].value for name in _INFERENCE_FLAGS}


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines the program's flags (when run as a program, or in a test's own FlagValues).

    Not at import, so that importing this module next to `fcn_unet_jax.main` (which has
    --workdir and --mode too) cannot clash.
    """
    fv = {'flag_values': flag_values}
    flags.DEFINE_string('workdir', None, 'Training workdir (config.json and checkpoints).', **fv)
    flags.DEFINE_string('input', None, 'An image file, a folder of images or a glob pattern.', **fv)
    flags.DEFINE_string('output', None, 'Folder for the masks and overlays.', **fv)
    flags.DEFINE_string(
        'labels',
        None,
        'Folder of ground-truth masks (class ids), matched to the inputs by '
        'file stem: scores the predictions and writes OUTPUT/metrics.json.',
        **fv,
    )
    define_inference_flags(flag_values)
    flags.mark_flags_as_required(['workdir', 'input', 'output'], flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> None:
    """Predicts with the command-line flags; no readable input at all is an error.

    Args:
      argv: the arguments left after flag parsing (the program name only).
      flag_values: the parsed flags (`define_flags`).
    """
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    fv = flag_values
    result = _predict(fv.workdir, fv.input, fv.output, **inference_overrides(fv))
    if not result.written:
        raise nothing_written_error(result.failed, fv.output)
    if fv.labels:
        score_with_labels(fv.workdir, fv.input, result, fv.labels, fv.output)


if __name__ == '__main__':
    xla_options.set_default_flags()  # Before JAX starts its backends.
    define_flags()
    app.run(errors.guard(main), flags_parser=errors.parse_flags)
