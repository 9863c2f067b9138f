r"""Volume prediction CLI: segment NIfTI / DICOM volumes slice by slice, write NIfTI labels.

    python -m fcn_unet_jax.predict_volume --workdir=DIR --input=PATH --output=OUTDIR \
        [--labels=LABELS_DIR] [--mode=whole|sliding --window_size=H,W --window_overlap=F \
         --flip --scales=... --batch_size=N]
    python -m fcn_unet_jax.predict_volume --workdir=DIR --split=validation --output=OUTDIR

`DIR` is a workdir of a run on the `volumes` dataset. `PATH` is a NIfTI file (`.nii`,
`.nii.gz`), a folder holding one DICOM series, or a folder of such cases (its NIfTI files
and sub-folders). Each volume is read with `volume_io.load_volume`, its intensities are
normalised and quantised to uint8 by `volumes.quantize_volume` with the run's
`config.dataset` settings (the very function that built the training slices), and its
slices along `config.dataset.slice_axis` are segmented in batches of `eval_batch_size`
through `inference.Predictor`, exactly as `predict.py` segments images. The labels go to
`OUTDIR/<case>_labels.nii.gz` in the input's own voxel order with its affine (and NIfTI
header), so they open aligned with the input in a viewer.

Evaluation: with `--labels`, `LABELS_DIR/<case>.nii.gz` (or `.nii`) is the ground truth of
each case; with `--split` (instead of `--input`), the cases are that split of the run's
`volumes` root as the builder planned it (whole cases, `volumes.plan_splits`). Confusion
matrices are computed per volume (`metrics.confusion_matrix`, the ignore label left out)
and summed over volumes for the overall row; `metrics.scores` turns them into Dice per
class and mean IoU. They are written to `OUTDIR/volume_metrics.json` (`{"cases": {case:
scores}, "overall": scores}`, undefined values as null) and printed as a Markdown table.

Inputs that cannot be read, or whose label volume is missing or misaligned, are logged and
skipped; the exit status is non-zero only when no volume could be processed. `OUTDIR` is
created only when the first label volume is written, so a failed command leaves no empty
folder. Errors in the input are printed as one `error: ...` line (plus a `hint: ...` line
where there is one) with exit status 1; `--traceback` adds the traceback (see
`fcn_unet_jax.errors`).
"""

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from fcn_unet_jax import (
    checkpointing,
    errors,
    inference,
    metrics,
    predict,
    sharding,
    xla_options,
)
from fcn_unet_jax import workdir as workdir_files
from fcn_unet_jax.data import builders, input_pipeline, volume_io
from fcn_unet_jax.data.builders import volumes

METRICS_FILE = 'volume_metrics.json'
OVERALL = 'overall'

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class VolumePredictionResult:
    """What `predict_volumes` did.

    Attributes:
      written: case id -> path of the label volume written, in input order.
      failed: (input path, error message) of every case that was skipped.
      scores: case id -> `metrics.scores` of the evaluated cases, plus `OVERALL` (summed
        confusion matrices); empty without ground truth.
    """

    written: dict[str, str]
    failed: tuple[tuple[str, str], ...]
    scores: dict[str, dict]


def find_volumes(path: str) -> list[str]:
    """Expands `path` into volume paths: a NIfTI file, a DICOM folder or a folder of cases.

    A folder holding NIfTI files or sub-folders is a folder of cases (its NIfTI files and
    sub-folders, sorted); any other folder is one DICOM series.

    Raises:
      MissingInputError: `path` does not exist (a FileNotFoundError).
    """
    if not os.path.exists(path):
        raise errors.MissingInputError(
            f'No input volume at {path!r}.',
            hint='give a NIfTI file, a DICOM folder or a folder of cases',
        )
    if not os.path.isdir(path):
        return [path]
    entries = [
        os.path.join(path, name) for name in sorted(os.listdir(path)) if not name.startswith('.')
    ]
    cases = [p for p in entries if os.path.isdir(p) or volume_io.is_nifti(p)]
    return cases or [path]


def slice_settings(dataset_config: ml_collections.ConfigDict) -> volumes.VolumesConfig:
    """The slicing and intensity settings of a run's `config.dataset`, without its root.

    Prediction must not need the training root, so this does not call
    `volumes.config_from_dataset` (which hashes the root's files).
    """
    return volumes.VolumesConfig(
        name='prediction',
        slice_axis=int(dataset_config.slice_axis),
        intensity=dataset_config.intensity,
        ct_window=tuple(float(v) for v in dataset_config.ct_window),
        percentiles=tuple(float(v) for v in dataset_config.percentiles),
    )


def segment_volume(
    volume: volume_io.Volume,
    predictor: inference.Predictor,
    config: ml_collections.ConfigDict,
) -> np.ndarray:
    """Segments a volume slice by slice as the `volumes` builder sliced it for training.

    Args:
      volume: The image volume (canonical order).
      predictor: The run's predictor.
      config: The run's config (`dataset` slicing/intensity fields, `input.normalization`,
        `model.input_channels`, `eval_batch_size`).

    Returns:
      Class ids (uint8, or int16 beyond 256 classes) of `volume.data`'s shape.
    """
    settings = slice_settings(config.dataset)
    quantised, _, _ = volumes.quantize_volume(volume.data, settings)
    axis = settings.slice_axis
    dtype = np.uint8 if config.model.num_classes <= 256 else np.int16
    labels = np.zeros(volume.data.shape, dtype)
    batch_size = int(config.eval_batch_size)
    count = volume.data.shape[axis]
    for start in range(0, count, batch_size):
        indices = range(start, min(start + batch_size, count))
        gray = np.stack([volume_io.slice_image(quantised, axis, i) for i in indices])
        # A full last batch keeps one compilation per slice shape; the padding is dropped.
        gray = np.concatenate(
            [gray, np.zeros((batch_size - len(gray), *gray.shape[1:]), gray.dtype)]
        )
        # Three equal channels, as the builder stores slices; preprocess_image undoes it.
        images = input_pipeline.preprocess_image(np.repeat(gray[..., None], 3, axis=-1), config)
        ids = np.asarray(predictor.predict(images))
        for i, image in zip(indices, ids[: len(indices)], strict=True):
            volume_io.insert_slice(labels, axis, i, image.astype(dtype))
    return labels


def volume_confusion(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int, ignore_label: int
) -> np.ndarray:
    """[C, C] int64 confusion matrix of one volume (rows ground truth, ignore left out)."""
    confusion = metrics.confusion_matrix(
        np.asarray(labels, np.int32), np.asarray(predictions, np.int32), num_classes, ignore_label
    )
    return np.asarray(confusion, np.int64)


def summarize(confusions: dict[str, np.ndarray]) -> dict[str, dict]:
    """`metrics.scores` of each case and of all cases together (`OVERALL`).

    Args:
      confusions: case id -> [C, C] confusion matrix.

    Returns:
      case id -> scores, then `OVERALL` -> scores of the summed matrices.
    """
    summary = {case: metrics.scores(confusion) for case, confusion in confusions.items()}
    summary[OVERALL] = metrics.scores(sum(confusions.values()))
    return summary


def markdown_table(summary: dict[str, dict], class_names: Sequence[str]) -> str:
    """A Markdown table: case, Dice per class, mean IoU; the last row is `OVERALL`."""

    def number(value: float) -> str:
        return '-' if math.isnan(value) else f'{value:.4f}'

    header = ['case', *(f'Dice {name}' for name in class_names), 'mean IoU']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for case, scores in summary.items():
        cells = [case, *map(number, scores['per_class_dice']), number(scores['mean_iou'])]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def class_names_of(config: ml_collections.ConfigDict) -> list[str]:
    """The dataset's class names, or `class_<i>` where the training root is not available."""
    names = []
    if config.dataset.volume_root and os.path.isdir(config.dataset.volume_root):
        names = list(builders.get_builder(config.dataset).info.metadata['class_names'])
    if len(names) != config.model.num_classes:
        names = [f'class_{i}' for i in range(config.model.num_classes)]
    return names


def _label_path(labels_dir: str, case: str) -> str:
    for suffix in volume_io.NIFTI_SUFFIXES:
        path = os.path.join(labels_dir, case + suffix)
        if os.path.isfile(path):
            return path
    raise ValueError(f'No label volume {case}.nii.gz or {case}.nii in {labels_dir}.')


def split_cases(config: ml_collections.ConfigDict, split: str) -> list[tuple[str, str]]:
    """(image path, label path) of a split of the run's `volumes` root, as the builder splits.

    Raises:
      UserError: the run is not on the `volumes` dataset, or the split has no cases.
    """
    if config.dataset.name != 'volumes' or not config.dataset.volume_root:
        raise errors.UserError(
            f'--split needs a run on the volumes dataset with its volume_root; this run is on '
            f'{config.dataset.name!r}.',
            hint='give the volumes with --input instead',
        )
    plan = volumes.plan_splits(
        os.path.abspath(os.path.expanduser(config.dataset.volume_root)),
        config.dataset.volume_val_fraction,
    )
    if split not in plan:
        raise errors.UserError(
            f'Split {split!r} of {config.dataset.volume_root} has no cases; it has '
            f'{", ".join(sorted(plan))}.'
        )
    return [(image, label) for _, image, label in plan[split]]


def predict_volumes(
    workdir: str,
    cases: Sequence[tuple[str, str | None]],
    output_dir: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    **overrides,
) -> VolumePredictionResult:
    """Segments volumes with the newest checkpoint of `workdir`; evaluates labelled ones.

    Args:
      workdir: A training workdir of a `volumes` run.
      cases: (image volume path, label volume path or None) pairs; case ids (output names)
        come from the image paths (`volume_io.case_id`).
      output_dir: Where `<case>_labels.nii.gz` and, when any case has labels,
        `volume_metrics.json` are written.
      mesh: The device mesh; default all devices on the 'data' axis.
      **overrides: Keyword arguments of `predict.override_eval` (mode, window_size, ...).

    Returns:
      The written volumes, the skipped cases and the scores.

    Raises:
      UserError: two inputs share a case id (their outputs would overwrite each other), or
        the workdir's checkpoint does not fit its config
        (`checkpointing.restore_model`).
    """
    case_ids = [volume_io.case_id(image) for image, _ in cases]
    repeated = sorted({c for c in case_ids if case_ids.count(c) > 1})
    if repeated:
        raise errors.UserError(f'Several inputs share the case id(s) {repeated}.')
    config = workdir_files.read_config(workdir)
    predict.override_eval(config, **overrides)
    model, variables = checkpointing.restore_model(workdir, config)
    mesh = sharding.create_mesh() if mesh is None else mesh
    predictor = inference.Predictor(
        model, variables, inference.InferenceSettings.from_config(config), mesh
    )
    written, failed, confusions = {}, [], {}
    for case, (image_path, label_path) in zip(case_ids, cases, strict=True):
        try:
            image = volume_io.load_volume(image_path)
            label = None
            if label_path is not None:
                label = volume_io.load_volume(label_path)
                volume_io.check_aligned(image, label)
        except ValueError as error:
            logging.warning('Skipping %s: %s', image_path, error)
            failed.append((image_path, str(error)))
            continue
        predictions = segment_volume(image, predictor, config)
        os.makedirs(output_dir, exist_ok=True)  # Only now: a failed command leaves no folder.
        path = os.path.join(output_dir, f'{case}_labels.nii.gz')
        volume_io.write_label_volume(predictions, image, path)
        written[case] = path
        if label is not None:
            confusions[case] = volume_confusion(
                label.data, predictions, config.model.num_classes, config.dataset.ignore_label
            )
        logging.info('Segmented %s (%s) -> %s', case, image.data.shape, path)
    summary = summarize(confusions) if confusions else {}
    if summary:
        with open(os.path.join(output_dir, METRICS_FILE), 'w') as f:
            json.dump(
                {
                    'cases': workdir_files.jsonable({c: summary[c] for c in confusions}),
                    OVERALL: workdir_files.jsonable(summary[OVERALL]),
                },
                f,
                indent=2,
            )
        print(markdown_table(summary, class_names_of(config)))
    return VolumePredictionResult(written=written, failed=tuple(failed), scores=summary)


def run(
    workdir: str,
    input_path: str | None,
    output_dir: str,
    labels_dir: str | None = None,
    split: str | None = None,
    **overrides,
) -> int:
    """Predicts (and evaluates) the volumes the command line names; returns the exit status.

    Args:
      workdir: A training workdir.
      input_path: A volume or a folder of cases (see `find_volumes`); None with `split`.
      output_dir: Where the outputs go.
      labels_dir: Folder of ground-truth label volumes named by case id, or None.
      split: A split of the run's `volumes` root to predict and evaluate instead of
        `input_path`.
      **overrides: Keyword arguments of `predict.override_eval`.

    Returns:
      0 when at least one volume was written, else 1.
    """
    result = _predict(workdir, input_path, output_dir, labels_dir, split, **overrides)
    return 0 if result is not None and result.written else 1


def _predict(
    workdir: str,
    input_path: str | None,
    output_dir: str,
    labels_dir: str | None = None,
    split: str | None = None,
    **overrides,
) -> VolumePredictionResult | None:
    """`run`'s work: the result, or None when no case was left to predict."""
    if (input_path is None) == (split is None):
        raise app.UsageError('Give exactly one of --input and --split.')
    if split is not None:
        cases = split_cases(workdir_files.read_config(workdir), split)
    else:
        cases = []
        for image in find_volumes(input_path):
            try:
                label = None
                if labels_dir is not None:
                    label = _label_path(labels_dir, volume_io.case_id(image))
            except ValueError as error:
                logging.warning('Skipping %s: %s', image, error)
                continue
            cases.append((image, label))
    if not cases:
        return None
    result = predict_volumes(workdir, cases, output_dir, **overrides)
    logging.info('Wrote %d label volume(s) to %s.', len(result.written), output_dir)
    return result


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines the program's flags (when run as a program, or in a test's own FlagValues).

    Not at import, so that importing this module next to `fcn_unet_jax.main` (which has
    --workdir and --mode too) cannot clash.
    """
    fv = {'flag_values': flag_values}
    flags.DEFINE_string('workdir', None, 'Training workdir (config.json and checkpoints).', **fv)
    flags.DEFINE_string('input', None, 'A NIfTI file, a DICOM folder or a folder of cases.', **fv)
    flags.DEFINE_string('output', None, 'Folder for the label volumes and metrics.', **fv)
    flags.DEFINE_string('labels', None, 'Folder of ground-truth label volumes <case>.nii.gz.', **fv)
    flags.DEFINE_string('split', None, "A split of the run's volumes root, e.g. validation.", **fv)
    predict.define_inference_flags(flag_values)
    flags.mark_flags_as_required(['workdir', 'output'], flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> None:
    """Predicts with the command-line flags; no volume written at all is an error.

    Args:
      argv: the arguments left after flag parsing (the program name only).
      flag_values: the parsed flags (`define_flags`).
    """
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    fv = flag_values
    result = _predict(
        fv.workdir,
        fv.input,
        fv.output,
        labels_dir=fv.labels,
        split=fv.split,
        **predict.inference_overrides(fv),
    )
    if result is not None and result.failed and not result.written:
        raise predict.nothing_written_error(result.failed, fv.output)
    if result is None or not result.written:
        raise errors.UserError(
            f'No volume to predict, nothing was written to {fv.output}: every input was '
            'skipped (see the warnings above).'
        )


if __name__ == '__main__':
    xla_options.set_default_flags()  # Before JAX starts its backends.
    define_flags()
    app.run(errors.guard(main), flags_parser=errors.parse_flags)
