r"""Prepares the dataset a config names, from the archives in the manual dir; downloads nothing.

The project's equivalent of `tfds build` (whose CLI needs apache_beam), writing the
`array_record` format the input pipeline reads:

    python -m fcn_unet_jax.data.build --config=configs/default.py \
        --config.dataset.name=voc_segmentation/sbd_fcn \
        --config.dataset.manual_dir=~/tensorflow_datasets/downloads/manual

Any config works, so `--config=configs/NAME.py` prepares exactly what that experiment reads.
Training prepares its dataset on first use too; this command does it ahead of time and
prints the split sizes.

Problems in the data (a missing archive or folder, a file that cannot be decoded, a label
outside classes.txt, a split without examples) stop the build with one `error: ...` line
naming the file, folder or split (plus a `hint: ...` line where there is one), exit status
1, and no new empty dataset folder left behind; `--traceback` adds the traceback. Without
classes.txt, the label values found and their pixel counts are logged, and a label far
above the others is flagged.
"""

from collections.abc import Sequence

import ml_collections
from absl import app, flags, logging

from fcn_unet_jax import config_files, errors
from fcn_unet_jax.data import builders

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS, sys_argv: list[str] | None = None) -> None:
    """Defines --config (when run as a program, or in a test's own FlagValues).

    Not at import, so that importing this module next to another entry point with a
    --config cannot clash.

    Args:
      flag_values: where to define it.
      sys_argv: the command line the `--config.*` overrides are read from; None: sys.argv.
    """
    config_files.define_config_flag(flag_values=flag_values, sys_argv=sys_argv)


def build(dataset_config: ml_collections.ConfigDict) -> dict[str, int]:
    """Prepares `dataset_config`'s dataset and returns its split sizes.

    Args:
      dataset_config: `config.dataset`.

    Returns:
      The number of examples per split name.
    """
    builder = builders.prepare(dataset_config)
    return {name: split.num_examples for name, split in builder.info.splits.items()}


def main(argv: Sequence[str], flag_values: flags.FlagValues = FLAGS) -> None:
    """Prepares the dataset of `--config` and prints its split sizes.

    Args:
      argv: the arguments left after flag parsing (the program name only).
      flag_values: the parsed flags (`define_flags`).
    """
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    config = errors.config_of(flag_values)
    if config is None:
        raise errors.UserError(
            '--config is required.', hint='e.g. --config=configs/default.py or a config of yours'
        )
    dataset_config = config.dataset
    sizes = build(dataset_config)
    logging.info('Prepared %s in %s.', dataset_config.name, dataset_config.data_dir or 'tfds')
    for name, count in sorted(sizes.items()):
        print(f'{dataset_config.name} {name}: {count} examples')


if __name__ == '__main__':
    define_flags()
    app.run(errors.guard(main), flags_parser=errors.parse_flags)
