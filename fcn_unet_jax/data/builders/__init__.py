"""tfds builders for semantic segmentation, and the mapping from `config.dataset` to them.

Importing this package registers the builders with tfds, so `tfds.builder('shapes',
data_dir=...)` works afterwards:

* `shapes` (configs `default`, `small`): synthetic shapes, the embedded default.
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

import ml_collections
import tensorflow_datasets as tfds

from fcn_unet_jax.data.builders import (
    cityscapes,
    common,
    folder,
    manual,
    shapes,
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
      ValueError: `folder` without `folder_root`, `volumes` without `volume_root`.
    """
    if dataset_config.name == 'folder':
        if not dataset_config.folder_root:
            raise ValueError('config.dataset.folder_root must be set for the folder dataset.')
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
    return tfds.builder(
        dataset_config.name, data_dir=dataset_config.data_dir, file_format=FILE_FORMAT
    )


def prepare(dataset_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Prepares the dataset that `config.dataset` names, never downloading anything.

    Data that is already prepared in `data_dir` is reused. Datasets that need archives read
    them from `dataset_config.manual_dir` (None: `<data_dir>/downloads/manual`).

    Args:
      dataset_config: `config.dataset` (see `get_builder`; also reads `manual_dir`).

    Returns:
      The prepared builder.
    """
    builder = get_builder(dataset_config)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=dataset_config.manual_dir,
            # Our datasets are not on tfds' GCS bucket; asking for them would go online.
            try_download_gcs=False,
        )
    )
    return builder
