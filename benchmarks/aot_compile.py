r"""Will a config fit a TPU slice or GPUs? Compile its real steps for them, without them.

Compiles the train and eval steps of `--config`, built as the Trainer builds them, for the
compile-only devices of `--target` (`fcn_unet_jax/aot.py`), and prints per device what XLA
reports: peak memory (arguments + outputs - donated aliases + temporaries) and its parts,
flops of the per-device program where XLA reports them (TPU; the CUDA compiler does not),
compile time and the collectives in the optimised program. Then whether the peak fits the
device's memory and, if not, what to change. Nothing runs: no speed is measured.

    pip install -e '.[tpu]'      # libtpu, for TPU targets (in .venv-accel: make accel-check)
    pip install -e '.[cuda12]'   # the CUDA plugin, for GPU targets (about 5 GB)
    python -m benchmarks.aot_compile --config=configs/fcn_voc.py:8s --target=v5e-8 \
        --config.batch_size=16 --config.eval_batch_size=8 --eval_size=512,512
    python -m benchmarks.aot_compile --config=configs/unet_paper.py --target=h100:8 \
        --config.batch_size=8 --config.eval_batch_size=8 --json=workdirs/aot.jsonl
    python -m benchmarks.aot_compile --table=workdirs/aot.jsonl   # markdown table of results

Targets: v4-8/16/32, v5e-4/8/16/32/64, v5p-8/16, v6e-4/8/16/32 (libtpu topologies, as
maxtext's `train_compile.py` names them) and `h100:N` (N <= 8 GPUs on one host).
`--config.KEY=VALUE` overrides any config field, as for training; the global batch must
split over the target's devices (`--one_per_device` raises a smaller batch, such as the
paper recipes' 1, to one example per device). The eval batch is padded to
`config.input.eval_pad_size`, or where that is None (the dataset decides) to `--eval_size`,
by default the crop size rounded up to a multiple of 32. Each compile takes 1-15 minutes on
2 CPU cores; run one process per config to use more cores.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from fcn_unet_jax import config_files, errors, xla_options

FLAGS = flags.FLAGS
config_files.define_config_flag()
flags.DEFINE_string('target', 'v5e-8', 'Target system: v5e-8, v4-8, v6e-8, h100:8, ...')
flags.DEFINE_list('steps', ['train', 'eval'], 'Steps to compile: train, eval.')
flags.DEFINE_bool(
    'one_per_device',
    False,
    'Raise a global batch smaller than the device count to one example per device (the '
    "paper recipes' batch 1 cannot split over several devices).",
)
flags.DEFINE_list('eval_size', None, 'H,W the eval batch is padded to when eval_pad_size is None.')
flags.DEFINE_string('json', None, 'Append the results as one JSON line to this file.')
flags.DEFINE_string('table', None, 'Print the markdown table of a --json file and exit.')


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise errors.UserError(f'Unexpected arguments: {argv[1:]}')
    # Imported here, after `xla_options.set_default_flags()`: JAX reads XLA_FLAGS once.
    import jax

    from fcn_unet_jax import aot

    if FLAGS.table:
        print(aot.results_table(aot.read_results(FLAGS.table)))
        return
    if FLAGS.config is None:
        raise errors.UserError('--config is required (or --table).')

    config = FLAGS.config
    try:
        target = aot.get_target(FLAGS.target)
    except ValueError as error:
        errors.exit_with(errors.UserError(str(error)))
    try:
        devices = aot.compile_only_devices(target)
        if FLAGS.one_per_device:
            for field in ('batch_size', 'eval_batch_size'):
                if config[field] < len(devices):
                    print(
                        f'note: config.{field} {config[field]} -> {len(devices)} (--one_per_device)'
                    )
                    config[field] = len(devices)
        aot.check_batch_sizes(config, len(devices))
    except (aot.TargetUnavailable, ValueError) as error:
        errors.exit_with(errors.UserError(f'cannot compile for {target.name}: {error}'))
    size = tuple(int(v) for v in FLAGS.eval_size) if FLAGS.eval_size else None
    if size is None and config.input.eval_pad_size is None:
        size = aot.eval_size(config)
        print(
            f'note: config.input.eval_pad_size is None (the dataset decides); the eval batch '
            f'is padded to {size[0]}x{size[1]} here (--eval_size to change).'
        )
    eval_hw = size or tuple(config.input.eval_pad_size)
    label = config_flags.get_config_filename(FLAGS['config'])  # With its ':ARG'.
    per_device = config.batch_size // len(devices)
    print(
        f'{label} for {target.name} ({target.description}; {len(devices)} devices of '
        f'{target.memory_gib:g} GiB): {config.model.name}, {config.model.dtype}, '
        f'remat={config.model.remat}, BatchNorm statistics '
        f'{config.model.get("batch_norm_stats", "global")}; train batch {config.batch_size} '
        f'({per_device} per device) at {config.input.crop_size[0]}x{config.input.crop_size[1]}, '
        f'eval batch {config.eval_batch_size} at {eval_hw[0]}x{eval_hw[1]}',
        flush=True,
    )
    with errors.handled():  # A config the models refuse: one line naming the field.
        try:
            reports = aot.compile_steps(config, devices, size, FLAGS.steps)
        except jax.errors.JaxRuntimeError as error:
            if target.platform != 'cuda' or "Couldn't find output tile sizes" not in str(error):
                raise
            # XLA:GPU's Triton GEMM emitter, untuned without a GPU, cannot tile some
            # matrix products (FCN-ResNet's bilinear resize at 480 px, docs/accelerators.md).
            raise errors.UserError(
                f'XLA cannot compile this step for {target.name}: {str(error).splitlines()[0]}',
                hint='rerun with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false',
            ) from error
    print(aot.steps_table(reports))
    result = aot.result_record(label, config, target, len(devices), eval_hw, reports)
    print(result['advice'])
    if FLAGS.json:
        aot.append_result(FLAGS.json, result)


if __name__ == '__main__':
    xla_options.set_default_flags()  # Before JAX starts its backends.
    # Compile-only: JAX itself runs on the CPU; the target's runtime (libtpu, the CUDA
    # plugin) only compiles. Several compiles may load libtpu at once.
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    app.run(errors.guard(main), flags_parser=errors.parse_flags)
