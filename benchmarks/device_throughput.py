r"""Train-step throughput and model FLOPs utilisation (MFU) on the local accelerator.

For each config (and batch size), on random images and labels at the config's crop size:

* train img/s: the trainer's jitted step (`train_steps.jit_train_step`: forward, loss,
  backward, optimiser, BatchNorm statistics) over all local devices, the batch sharded as
  in training; median of the timed steps, each ended by `block_until_ready`;
* MFU: those FLOPs per second over the peak rate of the chip in the step's compute dtype:
  the datasheet's dense rate (`--peak_tflops`, else the table below for known chips) and,
  beside it, the rate of the best large matrix product this process measures on the same
  chip at start (what XLA reaches on it in that dtype);
* TFLOP/step: the cost analysis of the step as written (the model's FLOPs, before XLA's
  rewrites), the usual basis of MFU;
* compile s: lowering and compiling the step; step GiB: XLA's buffer assignment of the step
  per device (arguments, outputs, temporaries).

No dataset, no checkpoint and no TensorFlow are needed: the state is the trainer's
(`train_steps.create_train_state`, pretrained weights off), so the numbers are those of the
step that training runs.

    python -m benchmarks.device_throughput --config=fcn_voc:8s@16 --config=unet_paper \
        --dtypes=float32,bfloat16 --steps=20 --output=workdirs/benchmarks/device
    # `--config=CONFIG[@BATCH]`, repeatable: BATCH replaces the config's global batch size

Results (one JSON line per measurement, and a Markdown table) go to `--output`.jsonl/.md.
"""

import importlib.util
import json
import pathlib
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from fcn_unet_jax import config_files, errors, models, sharding, train_steps

FLAGS = flags.FLAGS
flags.DEFINE_multi_string(
    'config',
    ['fcn_voc:8s@16', 'fcn_resnet_voc:50', 'unet_paper@8', 'folder_preset:unet_resnet50,320'],
    'CONFIG[@BATCH], repeatable: a config name or path (as --config takes it) and optionally '
    "a global batch size that replaces the config's.",
)
flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes (config.model.dtype).')
flags.DEFINE_integer('steps', 20, 'Timed steps per measurement (after two warm-up steps).')
flags.DEFINE_float('peak_tflops', None, 'Datasheet dense peak of one chip; default: table.')
flags.DEFINE_integer('matmul_size', 8192, 'Side of the square matrices of the peak-rate check.')
flags.DEFINE_string('output', None, 'Write OUTPUT.jsonl (appended per row) and OUTPUT.md.')

# Datasheet dense (no sparsity) peaks per chip in TFLOP/s, by compute dtype. float32 is the
# TF32 tensor-core rate on GPUs, as XLA runs float32 convolutions and matmuls there by
# default; on TPUs XLA runs them as bf16 passes.
DATASHEET_TFLOPS = {
    'NVIDIA H100 80GB HBM3': {'bfloat16': 989.4, 'float32': 494.7},
    'NVIDIA H200': {'bfloat16': 989.4, 'float32': 494.7},
    'NVIDIA A100-SXM4-80GB': {'bfloat16': 312.0, 'float32': 156.0},
    'TPU v5 lite': {'bfloat16': 197.0, 'float32': 197.0},
    'TPU v4': {'bfloat16': 275.0, 'float32': 275.0},
}


def datasheet_peak(device: jax.Device, dtype: str) -> float | None:
    """The table's dense peak of `device` in `dtype` (TFLOP/s), `--peak_tflops` first."""
    if FLAGS.peak_tflops:
        return FLAGS.peak_tflops
    return DATASHEET_TFLOPS.get(device.device_kind, {}).get(dtype)


def measured_matmul_tflops(dtype: str, n: int = 8192, repeats: int = 10) -> float:
    """Best rate of an n x n x n matrix product on the first device (TFLOP/s)."""
    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.dtype(dtype))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def load_config(entry: str, dtype: str):
    """The config of `CONFIG[@BATCH]` with the dtype set and pretrained weights off."""
    name, _, batch = entry.partition('@')
    path, _, arg = config_files.resolve(name).partition('.py:')
    path = path if path.endswith('.py') else path + '.py'
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    config.model.dtype = dtype
    config.init_from = None  # Random weights: throughput does not depend on them.
    if batch:
        config.batch_size = int(batch)
    if config.model.num_classes is None:
        config.model.num_classes = 21  # Set from the dataset in training; any count here.
    return config


def random_batch(config, mesh) -> dict[str, jax.Array]:
    """A global batch of random images and labels at the config's crop size."""
    height, width = config.input.crop_size
    rng = np.random.default_rng(0)
    shape = (config.batch_size, height, width)
    images = rng.standard_normal((*shape, config.model.input_channels), np.float32)
    labels = rng.integers(0, config.model.num_classes, shape).astype(np.int32)
    batch = {'image': images, 'label': labels}
    if config.input.get('border_weights'):
        batch['weight'] = np.ones(shape, np.float32)  # U-Net's weight map: its cost is here.
    return sharding.global_batch(batch, sharding.batch_sharding(mesh))


def measure(entry: str, dtype: str) -> dict[str, Any]:
    """Compiles and times the train step of one config on all local devices."""
    config = load_config(entry, dtype)
    mesh = sharding.create_mesh(jax.local_devices())
    model = models.build_model(config.model)
    state, tx, schedule = train_steps.create_train_state(config, model, mesh, jax.random.key(0))
    step = train_steps.jit_train_step(config, model, tx, schedule, mesh)
    batch = random_batch(config, mesh)
    rng = jax.device_put(jax.random.key(1), sharding.replicated_sharding(mesh))
    start = time.perf_counter()
    lowered = step.lower(state, batch, rng)
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - start
    # Model FLOPs: the cost analysis of the program as written (the global step, before
    # XLA's rewrites; the compiled program's own count misses convolutions that GPUs run as
    # library calls).
    flops = float((lowered.cost_analysis() or {}).get('flops', 0.0))
    memory = compiled.memory_analysis()
    for _ in range(2):  # Warm-up: autotuning and first-touch allocations.
        state, summary = compiled(state, batch, rng)
    jax.block_until_ready(summary)
    times = []
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        state, summary = compiled(state, batch, rng)
        jax.block_until_ready((state, summary))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    device = mesh.devices.flat[0]
    peak = datasheet_peak(device, dtype)
    achieved = flops / seconds / 1e12 / mesh.size  # Per chip.
    return {
        'config': entry,
        'model': config.model.name,
        'dtype': dtype,
        'batch_size': config.batch_size,
        'crop_size': list(config.input.crop_size),
        'devices': mesh.size,
        'device_kind': device.device_kind,
        'jax': jax.__version__,
        'compile_seconds': compile_seconds,
        'step_seconds': seconds,
        'images_per_second': config.batch_size / seconds,
        'tflop_per_step': flops / 1e12,
        'tflops_per_chip': achieved,
        'datasheet_tflops': peak,
        'mfu_datasheet': achieved / peak if peak else None,
        # XLA's buffer assignment of the step per device: arguments, outputs not written
        # into donated arguments, temporaries.
        'step_gib': (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes
        )
        / 2**30
        if memory
        else None,
        'final_loss': float(summary['loss']),
    }


def markdown_table(rows: list[dict[str, Any]], matmul: dict[str, float]) -> str:
    """The results as a Markdown table (MFU against the datasheet and the measured matmul)."""
    lines = [
        '| config | model | dtype | batch | crop | img/s | step ms | TFLOP/step | TFLOP/s '
        '| MFU datasheet | MFU measured matmul | compile s | step GiB |',
        '|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for r in rows:
        mfu = f'{r["mfu_datasheet"]:.1%}' if r['mfu_datasheet'] else '—'
        of_matmul = r['tflops_per_chip'] / matmul[r['dtype']]
        peak = f'{r["step_gib"]:.2f}' if r['step_gib'] else '—'
        lines.append(
            f'| {r["config"]} | {r["model"]} | {r["dtype"]} | {r["batch_size"]} '
            f'| {r["crop_size"][0]}x{r["crop_size"][1]} | {r["images_per_second"]:.1f} '
            f'| {r["step_seconds"] * 1e3:.1f} | {r["tflop_per_step"]:.3f} '
            f'| {r["tflops_per_chip"]:.1f} | {mfu} | {of_matmul:.1%} '
            f'| {r["compile_seconds"]:.1f} | {peak} |'
        )
    return '\n'.join(lines)


def main(argv):
    del argv
    device = jax.local_devices()[0]
    logging.info('%d x %s, jax %s', jax.local_device_count(), device.device_kind, jax.__version__)
    matmul = {dtype: measured_matmul_tflops(dtype, FLAGS.matmul_size) for dtype in FLAGS.dtypes}
    header = ', '.join(f'{d} {v:.1f} TFLOP/s' for d, v in matmul.items())
    print(f'{jax.local_device_count()} x {device.device_kind}; measured matmul: {header}')
    if FLAGS.output:
        pathlib.Path(FLAGS.output).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry in FLAGS.config:
        for dtype in FLAGS.dtypes:
            row = measure(entry, dtype)
            row['matmul_tflops'] = matmul[dtype]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if FLAGS.output:
                with open(FLAGS.output + '.jsonl', 'a') as f:
                    f.write(json.dumps(row) + '\n')
    table = markdown_table(rows, matmul)
    print(table)
    if FLAGS.output:
        with open(FLAGS.output + '.md', 'w') as f:
            f.write(
                f'{jax.local_device_count()} x {device.device_kind}, jax {jax.__version__}; '
                f'measured matmul: {header}\n\n{table}\n'
            )


if __name__ == '__main__':
    app.run(errors.guard(main), flags_parser=errors.parse_flags)
