"""Command-line entry point: train and evaluate, or evaluate the latest checkpoint.

    python -m fcn_unet_jax.main --config=configs/NAME.py --workdir=DIR [--config.key=value]
    python -m fcn_unet_jax.main --config=configs/NAME.py --workdir=DIR --mode=eval [--split=S]

Rerunning the same command resumes from DIR. A command whose config changes the model, the
optimiser's state tree or the data of the run in DIR is refused with the differing fields
named (see `fcn_unet_jax.workdir.RUN_DEFINING_FIELDS`); `--restart_from_scratch` moves that
run to DIR/previous_runs/<n>/ (nothing is deleted) and trains afresh. Other changes (steps,
cadences, schedule, evaluation, ...) resume and are recorded in DIR/config_history.jsonl.

Errors in the input (flags, config overrides, data, a workdir that does not fit) are
printed as one `error: ...` line, plus a `hint: ...` line where there is one, with exit
status 1; `--traceback` adds the traceback (see `fcn_unet_jax.errors`). Multi-process runs call
`jax.distributed.initialize` (`fcn_unet_jax.distributed`): with explicit `--coordinator_address
--num_processes --process_id`, or with no arguments (JAX's own cluster detection) under
`--distributed` or when a SLURM, Open MPI, multi-host TPU or Cloud TPU VM launch is detected.
"""

import functools

import jax
from absl import app, flags, logging

from fcn_unet_jax import config_files, distributed, errors, train, xla_options

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS, sys_argv: list[str] | None = None) -> None:
    """Defines the program's flags (when run as a program, or in a test's own FlagValues).

    Not at import, so that importing this module next to another entry point (which may
    define --config or --workdir too) cannot clash.

    Args:
      flag_values: where to define them.
      sys_argv: the command line the `--config.*` overrides are read from; None: sys.argv.
    """
    config_files.define_config_flag(flag_values=flag_values, sys_argv=sys_argv)
    string = functools.partial(flags.DEFINE_string, flag_values=flag_values)
    string('workdir', None, 'Directory for checkpoints, logs and results.')
    flags.DEFINE_enum(
        'mode',
        'train',
        ['train', 'eval'],
        'Train and evaluate, or evaluate only.',
        flag_values=flag_values,
    )
    string('split', None, 'Split for --mode=eval (default config.dataset.eval_split).')
    flags.DEFINE_bool(
        'restart_from_scratch',
        False,
        'Train from step 0 even if --workdir holds a run: that run is moved to '
        'WORKDIR/previous_runs/<n>/ first (nothing is deleted).',
        flag_values=flag_values,
    )
    string('coordinator_address', None, 'host:port of process 0 (multi-process).')
    flags.DEFINE_integer(
        'num_processes', None, 'Number of processes (multi-process).', flag_values=flag_values
    )
    flags.DEFINE_integer(
        'process_id', None, 'Index of this process (multi-process).', flag_values=flag_values
    )
    flags.DEFINE_bool(
        'distributed',
        False,
        'Start the multi-process runtime with JAX cluster detection (SLURM, Open MPI, Cloud '
        'TPU VMs, ...) even where fcn_unet_jax.distributed detects no launcher.',
        flag_values=flag_values,
    )
    flags.mark_flags_as_required(['config', 'workdir'], flag_values=flag_values)


def initialize_distributed(flag_values: flags.FlagValues = FLAGS) -> None:
    """Starts JAX's multi-process runtime when this run is one of several processes."""
    try:
        how = distributed.initialize(
            flag_values.coordinator_address,
            flag_values.num_processes,
            flag_values.process_id,
            auto=flag_values.distributed,
        )
    except ValueError as error:
        raise errors.UserError(str(error)) from error
    logging.info('Multi-process runtime: %s.', how)


def main(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> None:
    """Initialises the runtime, then trains or evaluates `--config` in `--workdir`.

    Args:
      argv: the arguments left after flag parsing (the program name only).
      flag_values: the parsed flags (`define_flags`).
    """
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    initialize_distributed(flag_values)
    logging.info(
        'Process %d of %d; %d local devices of %d: %s',
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices(),
    )
    config, workdir = errors.config_of(flag_values), flag_values.workdir
    if flag_values.mode == 'train':
        train.train_and_evaluate(
            config, workdir, restart_from_scratch=flag_values.restart_from_scratch
        )
    else:
        if flag_values.restart_from_scratch:
            raise errors.UserError('--restart_from_scratch only applies to --mode=train.')
        train.evaluate_checkpoint(config, workdir, split=flag_values.split)


if __name__ == '__main__':
    xla_options.set_default_flags()  # Before JAX starts its backends.
    define_flags()
    app.run(errors.guard(main), flags_parser=errors.parse_flags)
