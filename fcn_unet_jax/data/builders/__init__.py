"""tfds builders for semantic segmentation, and the mapping from `config.dataset` to them.

Importing this package registers the builders with tfds, so `tfds.builder('shapes',
data_dir=...)` works afterwards:

* `shapes` (configs `default`, `small`): synthetic shapes, the embedded default.
* `shapes_fine` (configs `default`, `small`): small, thin and touching objects (skip ablation).
* `folder`: a user's images and masks; its config is built at run time from
  `config.dataset.folder_root` (see `folder.config_for_root`).
* `voc_segmentation` (configs `voc2012`, `sbd_fcn`, `train_aug`): PASCAL VOC 2012 and SBD,
  from archives in the manual dir.
* `cityscapes_trainids`: Cityscapes fine annotations as the 19 train ids, from the
  archives in the manual dir.
* `volumes`: 2D slices of a user's NIfTI / DICOM volumes and NIfTI label volumes; its
  config is built at run time from `config.dataset.volume_root` (see
  `volumes.config_from_dataset`).

Every builder yields the features of `common.features()` (`image`, `segmentation_mask`,
`file_name`) and stores `class_names`, `palette` and `ignore_label` in `info.metadata`.
`get_builder` returns builders that write the `array_record` file format: the input
pipeline reads examples by index (`builder.as_data_source(split)`), which needs it, and
which is then the way to read them (tfds' `as_dataset` does not read array_record).
"""

import os
import time

import ml_collections
import tensorflow_datasets as tfds
from absl import logging

from fcn_unet_jax import console, errors
from fcn_unet_jax.data.builders import (
    cityscapes,
    common,
    folder,
    manual,
    shapes,
    shapes_fine,
    voc_segmentation,
    volumes,
)

FILE_FORMAT = 'array_record'

__all__ = [
    'FILE_FORMAT',
    'cityscapes',
    'common',
    'folder',
    'get_builder',
    'manual',
    'prepare',
    'shapes',
    'shapes_fine',
    'voc_segmentation',
    'volumes',
]


def get_builder(dataset_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Returns the tfds builder that `config.dataset` names.

    Args:
      dataset_config: `config.dataset`; reads `name` (`builder` or `builder/config`),
        `data_dir` (None: tfds' default) and, for `folder`, `folder_root` and
        `folder_val_fraction`; for `volumes`, `volume_root` and the other fields that
        `volumes.config_from_dataset` reads.

    Returns:
      The builder; call `prepare` (or `download_and_prepare`) before reading from it.

    Raises:
      UserError: `folder` without `folder_root`, `volumes` without `volume_root`, or a name
        that no builder has (the message lists the project's datasets).
    """
    if dataset_config.name == 'folder':
        if not dataset_config.folder_root:
            raise errors.UserError(
                'config.dataset.folder_root must be set for the folder dataset.',
                hint='add --config.dataset.folder_root=DIR (the folder with images/ and masks/)',
            )
        config = folder.config_for_root(
            dataset_config.folder_root, dataset_config.folder_val_fraction
        )
        return folder.Folder(
            config=config, data_dir=dataset_config.data_dir, file_format=FILE_FORMAT
        )
    if dataset_config.name == 'volumes':
        return volumes.Volumes(
            config=volumes.config_from_dataset(dataset_config),
            data_dir=dataset_config.data_dir,
            file_format=FILE_FORMAT,
        )
    try:
        return tfds.builder(
            dataset_config.name, data_dir=dataset_config.data_dir, file_format=FILE_FORMAT
        )
    except tfds.core.registered.DatasetNotFoundError as error:
        raise errors.UserError(
            f'Unknown config.dataset.name {dataset_config.name!r}: no such tfds dataset.',
            hint='the project builds shapes, shapes/small, folder, volumes, voc_segmentation/'
            '{voc2012,sbd_fcn,train_aug} and cityscapes_trainids',
        ) from error


def prepare(dataset_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Prepares the dataset that `config.dataset` names, never downloading anything.

    Data that is already prepared in `data_dir` is reused. Datasets that need archives read
    them from `dataset_config.manual_dir` (None: `<data_dir>/downloads/manual`). A build
    that fails leaves none of the empty folders it created behind (tfds creates the dataset
    and download folders before it reads any input).

    Args:
      dataset_config: `config.dataset` (see `get_builder`; also reads `manual_dir`).

    Returns:
      The prepared builder.

    Raises:
      UserError: the input data is missing or wrong (the message names the file or folder).
    """
    builder = get_builder(dataset_config)
    created = _missing_folders(builder)
    began = time.time()
    fresh = not builder.is_prepared()
    if fresh:
        logging.info('preparing dataset %s in %s ...', dataset_config.name, builder.data_dir)
    try:
        # tfds prints download sizes ('Unknown size' for local data) to stdout: not ours.
        with console.quiet_prints():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(
                    manual_dir=dataset_config.manual_dir,
                    # Our datasets are not on tfds' GCS bucket; asking for them would go online.
                    try_download_gcs=False,
                )
            )
    except AssertionError as error:
        _remove_empty(created)
        text = str(error)
        if isinstance(error, errors.UserError) or not text.startswith('Manual directory'):
            raise
        # tfds' own check of the manual dir: its first sentence, then the instructions.
        first, _, instructions = text.partition('. ')
        raise manual.MissingArchivesError(f'{first}.', hint=instructions) from error
    except BaseException:
        _remove_empty(created)
        raise
    if fresh:
        logging.info(
            'prepared dataset %s in %s', dataset_config.name, console.duration(time.time() - began)
        )
    return builder


def _missing_folders(builder: tfds.core.DatasetBuilder) -> list[str]:
    """The folders a build may create that do not exist yet, deepest first.

    The dataset's folders from the data_dir root down to its version folder, and the
    download folders tfds makes in the data_dir.
    """
    root = os.path.abspath(os.fspath(builder.data_dir_root))
    path = os.path.abspath(os.fspath(builder.data_path))
    candidates = []
    while path.startswith(root + os.sep):  # version, config and dataset folders
        candidates.append(path)
        path = os.path.dirname(path)
    candidates += [os.path.join(root, 'downloads', 'extracted'), os.path.join(root, 'downloads')]
    while not os.path.exists(root):  # the data_dir and its missing parents
        candidates.append(root)
        root = os.path.dirname(root)
    return [path for path in candidates if not os.path.exists(path)]


def _remove_empty(folders: list[str]) -> None:
    """Removes each of `folders` (deepest first) that exists and is empty."""
    for folder_path in folders:
        if os.path.isdir(folder_path) and not os.listdir(folder_path):
            os.rmdir(folder_path)
