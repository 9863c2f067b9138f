"""Prepares the dataset a config names, from the archives in the manual dir; downloads nothing.

The project's equivalent of `tfds build` (whose CLI needs apache_beam), writing the
`array_record` format the input pipeline reads:

    python -m fcn_unet_jax.data.build --config=configs/default.py \
        --config.dataset.name=voc_segmentation/sbd_fcn \
        --config.dataset.manual_dir=~/tensorflow_datasets/downloads/manual

Any config works, so `--config=configs/NAME.py` prepares exactly what that experiment reads.
Training prepares its dataset on first use too; this command does it ahead of time and
prints the split sizes.
"""

from collections.abc import Sequence

import ml_collections
from absl import app, logging
from ml_collections import config_flags

from fcn_unet_jax.data import builders

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)


def build(dataset_config: ml_collections.ConfigDict) -> dict[str, int]:
    """Prepares `dataset_config`'s dataset and returns its split sizes.

    Args:
      dataset_config: `config.dataset`.

    Returns:
      The number of examples per split name.
    """
    builder = builders.prepare(dataset_config)
    return {name: split.num_examples for name, split in builder.info.splits.items()}


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if _CONFIG.value is None:
        raise app.UsageError('--config is required (e.g. --config=configs/default.py).')
    dataset_config = _CONFIG.value.dataset
    sizes = build(dataset_config)
    logging.info('Prepared %s in %s.', dataset_config.name, dataset_config.data_dir or 'tfds')
    for name, count in sorted(sizes.items()):
        print(f'{dataset_config.name} {name}: {count} examples')


if __name__ == '__main__':
    app.run(main)
