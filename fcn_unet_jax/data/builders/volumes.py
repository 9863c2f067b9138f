"""`volumes`: 2D slices of a user's 3D medical volumes (NIfTI or DICOM) and label volumes.

Layout under the root:

* `images/<case>.nii.gz` (or `.nii`), or `images/<case>/`: a folder holding the DICOM files
  of one series;
* `labels/<case>.nii.gz` (or `.nii`): class indices on the image's voxel grid (the same
  grid in another voxel order is fine); 255 is the ignore label;
* optional `classes.txt` (as in `folder`: `name`, `name r g b` or `name #rrggbb` a line;
  without it the class count is the largest label + 1);
* optional `splits/train.txt` and `splits/val.txt` (and `splits/test.txt`), one case id a
  line; when they exist they define the splits and cases not listed are left out.

Every image needs a label volume and vice versa. Splits are by volume, so slices of one
patient never land on both sides: without split lists, a case goes to `validation` when
`folder.stem_fraction(case)` (a SHA-256 of the case id) falls below `val_fraction`, which
does not change when cases are added. A split that would get no case is an error whose hint
is the fix (split lists, or a `volume_val_fraction` that leaves at least one case on each
side); `val_fraction` 0 asks for no validation split. Without `classes.txt` the build logs
each label value with its voxel count and flags a label far above the others
(`common.LabelCounts`).

Volumes are read with `volume_io.load_volume` (canonical RAS+ voxel order, DICOM slices
ordered by position, rescale slope/intercept applied), their intensities normalised with
`volume_io.normalize_intensity` (`intensity` = 'ct_window', 'percentile_zscore' or
'none') and each slice along `slice_axis` (0: sagittal, 1: coronal, 2: axial) becomes one
example, shown upright (`volume_io.slice_image`). With `skip_empty_slices`, slices whose
label holds nothing but background (0) and ignore (255) are left out.

Storage: the normalised slice is quantised to uint8 and stored in the common `image`
feature as three equal channels, so the input pipeline, augmentation and the 'unit'
normalisation work unchanged (`config.model.input_channels = 1` turns it back into one
channel). The quantisation range is [0, 1] for 'ct_window' (the window) and the volume's
own [min, max] after normalisation otherwise (the clipped z-score range, or the raw range),
and each example carries it: normalised value ~= `intensity_offset` + `intensity_scale` *
`image[..., 0]`, to within half a quantisation step (1/510 of the range).

Features: those of `common.features()` (`file_name` is `<case>_<slice index:04d>`) plus
`volume_id` (the case id), `slice_index` (int32, index along the canonical `slice_axis`),
`intensity_offset` and `intensity_scale` (float32). `info.metadata` holds `class_names`,
`palette`, `ignore_label` and the settings `slice_axis`, `intensity`, `ct_window`,
`percentiles` and `skip_empty_slices`.

Preparation raises a `UserError` (a ValueError) naming the file(s) for: an image without a
label or the reverse, a label volume whose shape or affine differs from its image's, a
label that is not an integer in [0, 255] or (with `classes.txt`) not below the class count
nor 255, and every reading error of `volume_io.load_volume`.

The root and the settings reach tfds through a `VolumesConfig` built at run time by
`config_for_root`; its name hashes the absolute root, the settings and the name, size and
mtime of every input file (DICOM folders included), like `folder`'s.
"""

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from fcn_unet_jax import errors
from fcn_unet_jax.data import volume_io
from fcn_unet_jax.data.builders import common, folder

_SPLIT_LISTS = {'train': 'train.txt', 'validation': 'val.txt', 'test': 'test.txt'}


@dataclasses.dataclass(eq=False)
class VolumesConfig(tfds.core.BuilderConfig):
    """A root of volumes and how to slice, normalise and split them; see `config_for_root`.

    Attributes:
      root: Absolute path of the root folder.
      val_fraction: Fraction of cases sent to `validation` when no split lists exist.
      slice_axis: Canonical axis the slices are taken along (0, 1 or 2).
      skip_empty_slices: Leave out slices whose label has no foreground.
      intensity: 'ct_window', 'percentile_zscore' or 'none'.
      ct_window: (level, width) in HU, for 'ct_window'.
      percentiles: (low, high) clipping percentiles, for 'percentile_zscore'.
    """

    root: str = ''
    val_fraction: float = 0.2
    slice_axis: int = 2
    skip_empty_slices: bool = False
    intensity: str = 'percentile_zscore'
    ct_window: tuple[float, float] = (40.0, 400.0)
    percentiles: tuple[float, float] = (0.5, 99.5)

    def intensity_params(self) -> dict:
        """The keyword arguments of `volume_io.normalize_intensity` for `intensity`."""
        if self.intensity == 'ct_window':
            return {'level': self.ct_window[0], 'width': self.ct_window[1]}
        if self.intensity == 'percentile_zscore':
            return {'percentiles': self.percentiles}
        return {}


def quantize_volume(data: np.ndarray, config: VolumesConfig) -> tuple[np.ndarray, float, float]:
    """Normalises a volume's intensities and quantises them to uint8 as examples store them.

    Training (`Volumes`) and volume prediction (`fcn_unet_jax.predict_volume`) both call
    this, so a model sees the same pixel values at prediction time as in training.

    Args:
      data: Raw intensities, e.g. `Volume.data`.
      config: Reads `intensity` and its parameters (`intensity_params`).

    Returns:
      (uint8 volume of `data`'s shape, low, high): normalised value ~= low + (high - low) /
      255 * uint8 value.
    """
    values = volume_io.normalize_intensity(data, config.intensity, **config.intensity_params())
    if config.intensity == 'ct_window':
        low, high = 0.0, 1.0
    else:
        low, high = float(values.min()), float(values.max())
    return volume_io.to_uint8(values, low, high), low, high


def _cases(folder_path: str, dicom_folders: bool) -> dict[str, str]:
    """Maps case id -> path for the NIfTI files (and DICOM folders) in `folder_path`."""
    cases = {}
    for name in sorted(os.listdir(folder_path)):
        path = os.path.join(folder_path, name)
        if name.startswith('.') or not (
            volume_io.is_nifti(name) or (dicom_folders and os.path.isdir(path))
        ):
            continue
        case = volume_io.case_id(path)
        if case in cases:
            raise errors.UserError(
                f'Two volumes with the case id {case!r}: {cases[case]} and {path}.'
            )
        cases[case] = path
    return cases


def _input_files(root: str) -> list[str]:
    """Returns every file that preparation reads under `root`, sorted."""
    paths = [os.path.join(root, 'classes.txt')]
    paths += [os.path.join(root, 'splits', name) for name in _SPLIT_LISTS.values()]
    for sub, dicom in (('images', True), ('labels', False)):
        if not os.path.isdir(os.path.join(root, sub)):
            continue
        for path in _cases(os.path.join(root, sub), dicom).values():
            if os.path.isdir(path):
                paths += [os.path.join(path, name) for name in os.listdir(path)]
            else:
                paths.append(path)
    return sorted(path for path in paths if os.path.isfile(path))


def config_for_root(
    root: str,
    val_fraction: float = 0.2,
    slice_axis: int = 2,
    skip_empty_slices: bool = False,
    intensity: str = 'percentile_zscore',
    ct_window: tuple[float, float] = (40.0, 400.0),
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> VolumesConfig:
    """Returns the VolumesConfig for `root`, named after the root, settings and content.

    Args:
      root: The user's root folder (see the module docstring for the layout).
      val_fraction: Fraction of cases sent to `validation` when no split lists exist.
      slice_axis: Canonical axis to slice along: 0 sagittal, 1 coronal, 2 axial.
      skip_empty_slices: Leave out slices whose label holds only background and ignore.
      intensity: 'ct_window', 'percentile_zscore' or 'none' (`normalize_intensity`).
      ct_window: (level, width) in HU for 'ct_window'.
      percentiles: (low, high) percentiles for 'percentile_zscore'.

    Returns:
      A config named `<sanitised base name>_<12 hex digits>`.

    Raises:
      ValueError: a setting is out of range (checked here, before any volume is read).
    """
    if slice_axis not in (0, 1, 2):
        raise errors.UserError(f'config.dataset.slice_axis must be 0, 1 or 2, got {slice_axis}.')
    root = os.path.abspath(os.path.expanduser(root))
    config = VolumesConfig(
        name='unnamed',
        root=root,
        val_fraction=float(val_fraction),
        slice_axis=int(slice_axis),
        skip_empty_slices=bool(skip_empty_slices),
        intensity=intensity,
        ct_window=tuple(float(v) for v in ct_window),
        percentiles=tuple(float(v) for v in percentiles),
    )
    # Validates the mode and its parameters on a dummy volume.
    volume_io.normalize_intensity(np.zeros(2), intensity, **config.intensity_params())
    settings = (
        config.val_fraction,
        config.slice_axis,
        config.skip_empty_slices,
        config.intensity,
        config.ct_window,
        config.percentiles,
    )
    digest = hashlib.sha256(f'{root}\n{settings!r}\n'.encode())
    for path in _input_files(root):
        stat = os.stat(path)
        digest.update(
            f'{os.path.relpath(path, root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n'.encode()
        )
    base = re.sub(r'[^a-z0-9_]+', '_', os.path.basename(root).lower()).strip('_') or 'root'
    return dataclasses.replace(
        config,
        name=f'{base}_{digest.hexdigest()[:12]}',
        description=f'Slices of the volumes under {root}.',
    )


def config_from_dataset(dataset_config: ml_collections.ConfigDict) -> VolumesConfig:
    """Returns the VolumesConfig that `config.dataset` describes (`volume_*` fields).

    Raises:
      ValueError: `volume_root` is not set, or a setting is out of range.
    """
    root = dataset_config.volume_root
    if not root:
        raise errors.UserError(
            'config.dataset.volume_root must be set for the volumes dataset.',
            hint='add --config.dataset.volume_root=DIR (the folder with images/ and labels/)',
        )
    return config_for_root(
        root,
        val_fraction=dataset_config.volume_val_fraction,
        slice_axis=dataset_config.slice_axis,
        skip_empty_slices=dataset_config.skip_empty_slices,
        intensity=dataset_config.intensity,
        ct_window=tuple(dataset_config.ct_window),
        percentiles=tuple(dataset_config.percentiles),
    )


def _read_list(path: str) -> list[str]:
    with open(path, encoding='utf-8') as f:
        return [line.split()[0] for line in f if line.strip()]


def plan_splits(root: str, val_fraction: float) -> dict[str, list[tuple[str, str, str]]]:
    """Matches image volumes with label volumes and assigns whole cases to splits.

    Args:
      root: The root folder.
      val_fraction: Fraction of cases sent to `validation` when no split lists exist.

    Returns:
      split name -> sorted `(case id, image path, label path)`; without split lists and with
      `val_fraction` 0 there is no `validation`.

    Raises:
      MissingInputError: `root` lacks `images/` or `labels/` (a FileNotFoundError).
      UserError: no case, unmatched volumes, a list naming an unknown case or none, a case in
        two lists, only one of train.txt / val.txt (the message names the files), or a split
        that would have no case (the hint gives the fix).
    """
    image_dir, label_dir = os.path.join(root, 'images'), os.path.join(root, 'labels')
    if not (os.path.isdir(image_dir) and os.path.isdir(label_dir)):
        raise errors.MissingInputError(
            f'The volumes root {root} must hold images/ and labels/.',
            hint='set --config.dataset.volume_root to the folder that holds them',
        )
    images = _cases(image_dir, dicom_folders=True)
    labels = _cases(label_dir, dicom_folders=False)
    unmatched = [images[c] for c in images if c not in labels]
    unmatched += [labels[c] for c in labels if c not in images]
    if unmatched:
        listing = ', '.join(unmatched[:10]) + (' ...' if len(unmatched) > 10 else '')
        raise errors.UserError(
            f'{len(unmatched)} volume(s) without a matching image or label (same case id in '
            f'{image_dir} and {label_dir}): {listing}'
        )
    if not images:
        raise errors.UserError(
            f'volumes {root} has no case: {image_dir} holds no NIfTI file or DICOM folder.'
        )
    split_dir = os.path.join(root, 'splits')
    lists = {
        split: os.path.join(split_dir, name)
        for split, name in _SPLIT_LISTS.items()
        if os.path.isfile(os.path.join(split_dir, name))
    }
    if lists:
        if not {'train', 'validation'} <= lists.keys():
            raise errors.UserError(f'Split lists in {split_dir} need both train.txt and val.txt.')
        cases = {split: _read_list(path) for split, path in lists.items()}
        seen = {}
        for split, path in lists.items():
            if not cases[split]:
                raise errors.UserError(
                    f'volumes {root}: split {split!r} has no case: {path} lists none.',
                    hint='list one case id a line',
                )
            for case in cases[split]:
                if case not in images:
                    raise errors.UserError(f'{path} lists {case!r}, which has no volumes.')
                if seen.setdefault(case, path) != path:
                    # Slices of one volume on both sides would leak into the evaluation.
                    raise errors.UserError(
                        f'Case {case!r} is listed in both {seen[case]} and {path}.'
                    )
    else:
        fractions = {case: folder.stem_fraction(case) for case in images}
        cases = {'train': [c for c in images if fractions[c] >= val_fraction]}
        if val_fraction > 0:  # 0 asks for no validation split.
            cases['validation'] = [c for c in images if fractions[c] < val_fraction]
        for split, split_cases in cases.items():
            if not split_cases:
                raise folder.empty_split_error(
                    f'volumes {root}',
                    split,
                    fractions,
                    val_fraction,
                    'config.dataset.volume_val_fraction',
                    f'{split_dir}/train.txt and val.txt',
                    'case',
                )
    return {
        split: [(c, images[c], labels[c]) for c in sorted(set(split_cases))]
        for split, split_cases in cases.items()
    }


def _label_volume(label: volume_io.Volume, num_classes: int | None) -> np.ndarray:
    """Checks a label volume's values and returns them as uint8."""
    data = label.data
    if not np.issubdtype(data.dtype, np.integer) and not np.array_equal(data, np.round(data)):
        raise errors.UserError(f'Label volume {label.source} holds non-integer values.')
    values = np.unique(data)
    if values.size and (values[0] < 0 or values[-1] > 255):
        raise errors.UserError(f'Label volume {label.source} holds values outside [0, 255].')
    if num_classes is not None:
        bad = values[(values >= num_classes) & (values != common.IGNORE_LABEL)]
        if bad.size:
            raise errors.UserError(
                f'Label volume {label.source} holds label(s) {bad.astype(int).tolist()} '
                f'outside [0, {num_classes}) (classes.txt) that are not the ignore label 255.'
            )
    return data.astype(np.uint8)


class Volumes(tfds.core.GeneratorBasedBuilder):
    """Slices of a user's volumes (see the module docstring); needs a `VolumesConfig`."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    _label_counts: common.LabelCounts | None = None  # Set while preparing.

    def _config(self) -> VolumesConfig:
        config = self.builder_config
        if not isinstance(config, VolumesConfig):
            raise errors.UserError(
                'The volumes dataset needs its root: build it with '
                'fcn_unet_jax.data.builders.get_builder (config.dataset.volume_root) or '
                'Volumes(config=volumes.config_for_root(root)).'
            )
        return config

    def _class_file(self) -> str:
        return os.path.join(self._config().root, 'classes.txt')

    def _info(self) -> tfds.core.DatasetInfo:
        config = self._config()
        if os.path.isfile(self._class_file()):
            metadata = common.metadata(*folder.parse_classes(self._class_file()))
        else:
            # Filled in while preparing (largest label + 1) and read back from the prepared
            # copy afterwards.
            metadata = common.metadata([], [])
        metadata.update(
            slice_axis=config.slice_axis,
            intensity=config.intensity,
            ct_window=list(config.ct_window),
            percentiles=list(config.percentiles),
            skip_empty_slices=config.skip_empty_slices,
        )
        features = dict(common.features().items())
        features.update(
            volume_id=tfds.features.Text(),
            slice_index=tfds.features.Scalar(dtype=tf.int32),
            intensity_offset=tfds.features.Scalar(dtype=tf.float32),
            intensity_scale=tfds.features.Scalar(dtype=tf.float32),
        )
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(features),
            supervised_keys=('image', 'segmentation_mask'),
            metadata=metadata,
        )

    def _download_and_prepare(self, dl_manager, download_config=None) -> None:
        self._label_counts = common.LabelCounts()
        super()._download_and_prepare(dl_manager, download_config)
        if not os.path.isfile(self._class_file()):  # The labels alone define the classes.
            self._label_counts.report(f'volumes {self._config().root}')

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # The data is the user's folder; nothing to download.
        config = self._config()
        plan = plan_splits(config.root, config.val_fraction)
        num_classes = None
        if os.path.isfile(self._class_file()):
            num_classes = len(folder.parse_classes(self._class_file())[0])
        return {split: self._generate_examples(items, num_classes) for split, items in plan.items()}

    def _generate_examples(self, items: list, num_classes: int | None) -> Iterator:
        config = self._config()
        axis = config.slice_axis
        for case, image_path, label_path in items:
            image = volume_io.load_volume(image_path)
            label = volume_io.load_volume(label_path)
            volume_io.check_aligned(image, label)
            labels = _label_volume(label, num_classes)
            if self._label_counts is not None:
                self._label_counts.add(labels)
            foreground = labels[(labels != 0) & (labels != common.IGNORE_LABEL)]
            if num_classes is None and foreground.size:
                largest = int(foreground.max())
                if largest >= len(self.info.metadata['class_names']):
                    self._grow_classes(largest + 1, label_path)
            quantised, low, high = quantize_volume(image.data, config)
            for index in range(labels.shape[axis]):
                mask = volume_io.slice_image(labels, axis, index)
                if config.skip_empty_slices and not np.any(
                    (mask != 0) & (mask != common.IGNORE_LABEL)
                ):
                    continue
                gray = volume_io.slice_image(quantised, axis, index)
                name = f'{case}_{index:04d}'
                example = common.example(np.repeat(gray[..., None], 3, axis=-1), mask, name)
                example.update(
                    volume_id=case,
                    slice_index=index,
                    intensity_offset=low,
                    intensity_scale=(high - low) / 255.0,
                )
                yield name, example

    def _grow_classes(self, num_classes: int, label_path: str) -> None:
        """Raises the inferred class count; the metadata is saved when preparation ends."""
        logging.info(
            'volumes %s: no classes.txt; %s holds label %d, so %d classes are assumed.',
            self._config().root,
            label_path,
            num_classes - 1,
            num_classes,
        )
        self.info.metadata['class_names'] = [f'class_{i}' for i in range(num_classes)]
        self.info.metadata['palette'] = common.voc_palette(num_classes)
