"""Command-line entry point: train and evaluate, or evaluate the latest checkpoint.

    python -m fcn_unet_jax.main --config=configs/NAME.py --workdir=DIR [--config.key=value]
    python -m fcn_unet_jax.main --config=configs/NAME.py --workdir=DIR --mode=eval [--split=S]

Rerunning the same command resumes from DIR. Multi-process runs call
`jax.distributed.initialize`: with explicit `--coordinator_address --num_processes
--process_id`, or with no arguments (JAX's own cluster detection) when a SLURM, Open MPI or
multi-host TPU environment with several processes is detected.
"""

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fcn_unet_jax import train, xla_options

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'Train and evaluate, or evaluate only.')
flags.DEFINE_string('split', None, 'Split for --mode=eval (default config.dataset.eval_split).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process).')
flags.DEFINE_integer('process_id', None, 'Index of this process (multi-process).')
flags.mark_flags_as_required(['config', 'workdir'])


def _cluster_detected() -> bool:
    """Whether a launcher started several processes that JAX can detect on its own."""
    for variable in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
        if int(os.environ.get(variable, '1')) > 1:
            return True
    return ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')


def initialize_distributed() -> None:
    """Starts JAX's multi-process runtime when this run is one of several processes."""
    if FLAGS.coordinator_address:
        # CPU-only runs need a collectives backend for cross-process computations.
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    elif _cluster_detected():
        jax.distributed.initialize()


def main(argv: list[str]) -> None:
    """Initialises the runtime, then trains or evaluates `FLAGS.config` in `FLAGS.workdir`."""
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    initialize_distributed()
    logging.info(
        'Process %d of %d; %d local devices of %d: %s',
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices(),
    )
    if FLAGS.mode == 'train':
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
        train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, split=FLAGS.split)


if __name__ == '__main__':
    xla_options.set_default_flags()  # Before JAX starts its backends.
    app.run(main)
