r"""Train-step and inference speed of the model zoo, next to the PyTorch counterparts.

For each model, at one resolution and batch size, on random images and labels (the same
NumPy arrays for both frameworks):

* train img/s: the trainer's jitted step, `train_steps.jit_train_step` (forward, cross-entropy,
  backward, SGD with momentum 0.9, BatchNorm statistics update), median of the timed steps;
* infer img/s: the jitted `model.apply(..., train=False)` (logits at input size);
* compile s: tracing, lowering and compiling the train step;
* GFLOP/img: XLA's cost analysis of the forward pass with direct convolutions (lowered
  for a GPU, so not the CPU's Winograd convolutions, which do about half the work); a
  train step counts 3x that (forward, input gradients, kernel gradients), the usual
  convention, whichever way `models/convolutions.py` computes the backward pass;
* GFLOP/s and % peak: FLOPs of the train step over its measured time, as a share of the
  machine's fp32 matmul ceiling (the best 4096 x 4096 matmul of NumPy, XLA and torch,
  measured at start, or `--peak_gflops`);
* train MiB: the peak resident memory during the timed train steps minus the resident
  memory before the model was built (parameters, optimiser state, activations, gradients
  and allocator caches; freed heap pages are returned to the OS with `malloc_trim` before
  both readings, so set-up and compilation do not count), sampled every 2 ms; `XLA MiB`
  is XLA's own buffer-assignment size of the train step (arguments + outputs +
  temporaries - donated aliases);
* page faults per train step (in the JSON results, not the table): the process's minor
  faults over the warm-up and timed steps, averaged; each is a fresh page mapped on first
  touch, the cost `--jax_huge_pages` cuts.

Where torch is importable (the parity environment: `make parity` creates `.venv-parity`)
the same figures are measured for the counterparts: torchvision `fcn_resnet50/101` (random
init, no auxiliary head, as our models here) and segmentation_models_pytorch `Unet` with a
ResNet-50 / VGG16 encoder (torch has no cost analysis, so FLOPs come from ours). PyTorch
trains in its default memory format and infers in channels-last, as PyTorch users tune it.
Every (framework, model) pair runs in a fresh subprocess so memory figures do not mix.

    python -m benchmarks.model_benchmark                      # JAX only (.venv)
    .venv-parity/bin/python -m benchmarks.model_benchmark     # with the PyTorch columns
    python -m benchmarks.model_benchmark --models=fcn_resnet50,unet_resnet50 --steps=5 \
        --output=workdirs/benchmarks/models.md
    .venv-parity/bin/python -m benchmarks.model_benchmark --jax_huge_pages   # JAX on 2 MiB pages

The classic `unet` is a VALID-padded network: it runs at the valid input size nearest to
`--size` (shown in the table) and is trained on its smaller output window.
"""

import contextlib
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import app, flags

from benchmarks import model_setup
from fcn_unet_jax import errors, sharding, xla_options
from fcn_unet_jax import huge_pages as huge_pages_lib

FLAGS = flags.FLAGS
DEFAULT_MODELS = [
    'fcn8s_vgg16',
    'fcn_resnet50',
    'fcn_resnet101',
    'fcn8s_resnet50',
    'unet',
    'unet_resnet50',
    'unet_vgg16',
]
flags.DEFINE_list('models', DEFAULT_MODELS, 'Model names (keys of fcn_unet_jax.models.MODELS).')
flags.DEFINE_integer('size', 320, 'Square input size.')
flags.DEFINE_integer('batch_size', 4, 'Batch size of every step.')
flags.DEFINE_integer('steps', 3, 'Timed steps per measurement (after one warm-up step).')
flags.DEFINE_integer('num_classes', 21, 'Output classes (21: PASCAL VOC).')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'JAX compute dtype.')
flags.DEFINE_bool('remat', False, 'Rematerialise blocks in the JAX backward pass.')
flags.DEFINE_enum('torch', 'auto', ['auto', 'yes', 'no'], 'Measure the PyTorch counterparts.')
flags.DEFINE_float('peak_gflops', None, 'fp32 matmul ceiling; default: measured with NumPy.')
flags.DEFINE_string('output', None, 'Also write the Markdown table here (and .json beside).')
flags.DEFINE_bool(
    'jax_huge_pages',
    False,
    'Run the JAX workers with glibc malloc on transparent huge pages '
    f'(GLIBC_TUNABLES={huge_pages_lib.TUNABLE}); the PyTorch workers keep the defaults.',
)
flags.DEFINE_string('worker', None, 'Internal: "jax:MODEL" or "torch:MODEL" in a subprocess.')

_RESULT_PREFIX = 'BENCHMARK_RESULT '
# PyTorch counterparts: our model name -> (label, constructor taking num_classes).
TORCH_LABELS = {
    'fcn_resnet50': 'torchvision fcn_resnet50',
    'fcn_resnet101': 'torchvision fcn_resnet101',
    'unet_resnet50': 'smp Unet resnet50',
    'unet_vgg16': 'smp Unet vgg16',
}


def _torch_model(name: str, num_classes: int):
    """Builds the randomly initialised PyTorch counterpart of model `name`."""
    from fcn_unet_jax import torch_interop

    # First, so that smp (through timm) finds torchvision already imported.
    torchvision = torch_interop.import_torchvision()
    if name.startswith('fcn_resnet'):
        build = getattr(torchvision.models.segmentation, name)
        return build(weights=None, weights_backbone=None, num_classes=num_classes)
    import segmentation_models_pytorch as smp

    encoder = name.split('_', 1)[1]
    return smp.Unet(encoder, encoder_weights=None, classes=num_classes)


class _MemoryWatch:
    """The process's memory over a `with` block.

    `peak`: the most resident bytes seen (sampled in a thread); `page_faults`: the minor
    page faults taken in the block (fresh pages mapped on first touch).
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak = _rss_bytes()
        self.page_faults = 0
        self._faults_before = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self):
        self._faults_before = _minor_page_faults()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.page_faults = _minor_page_faults() - self._faults_before


def _release_free_memory() -> None:
    """Returns freed heap pages to the OS (glibc `malloc_trim`), so that memory freed after
    compilation or set-up does not count as resident during the timed steps."""
    # Without glibc the figures include freed memory.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL('libc.so.6').malloc_trim(0)


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _time_steps(step: Callable[[], Any], steps: int) -> list[float]:
    """Runs one warm-up call, then `steps` timed calls; returns their durations."""
    step()
    durations = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        durations.append(time.perf_counter() - start)
    return durations


def _minor_page_faults() -> int:
    """Minor page faults of this process so far (fresh pages mapped on first touch)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _cost_flops(computation) -> float:
    """FLOPs in XLA's cost analysis of a lowered or compiled computation."""
    cost = computation.cost_analysis()
    if isinstance(cost, list | tuple):  # Older jax returns one dict per computation.
        cost = cost[0]
    return float(cost.get('flops', float('nan')))


def _jax_worker(name: str) -> dict[str, Any]:
    """Measures our model `name` (runs in its own process)."""

    import jax

    from fcn_unet_jax import inference, models, train_steps

    _release_free_memory()
    base_rss = _rss_bytes()
    config = model_setup.benchmark_config(
        name, FLAGS.size, FLAGS.batch_size, FLAGS.num_classes, FLAGS.dtype, FLAGS.remat
    )
    size = config.input.crop_size
    images, labels = model_setup.random_batch(size, FLAGS.batch_size, FLAGS.num_classes)

    mesh = sharding.create_mesh()
    model = models.build_model(config.model)
    state, tx, schedule = train_steps.create_train_state(config, model, mesh, jax.random.key(0))
    batch = jax.device_put({'image': images, 'label': labels}, sharding.batch_sharding(mesh))
    rng = jax.device_put(jax.random.key(1), sharding.replicated_sharding(mesh))
    step_fn = train_steps.jit_train_step(config, model, tx, schedule, mesh)
    start = time.perf_counter()
    compiled_step = step_fn.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    memory = compiled_step.memory_analysis()
    xla_bytes = None
    if memory is not None:
        xla_bytes = (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes
        )

    holder = {'state': state}
    _release_free_memory()

    def run_train_step():
        holder['state'], summary = compiled_step(holder['state'], batch, rng)
        jax.block_until_ready(summary)

    with _MemoryWatch() as memory_watch:
        train_times = _time_steps(run_train_step, FLAGS.steps)

    variables = holder['state'].variables()
    forward = jax.jit(lambda v, x: inference.main_logits(model.apply(v, x, train=False)))
    compiled_forward = forward.lower(variables, batch['image']).compile()
    infer_times = _time_steps(
        lambda: compiled_forward(variables, batch['image']).block_until_ready(), FLAGS.steps
    )
    # The model's FLOPs are those of its direct convolutions, whichever algorithm runs
    # them here: lowered for a GPU, the CPU's Winograd convolutions
    # (`models/winograd.py`, about half the multiply-adds) are not taken.
    model_flops = _cost_flops(
        forward.trace(variables, batch['image']).lower(lowering_platforms=('cuda',))
    )
    return {
        'input_size': size[0],
        'params': models.count_params(config.model),
        'train_s': statistics.median(train_times),
        'infer_s': statistics.median(infer_times),
        'compile_s': compile_s,
        # The usual 3x the forward pass (forward, input and kernel gradients), not XLA's
        # count of the train step, which depends on how the gradients are rewritten.
        'train_flops': 3 * model_flops,
        'infer_flops': model_flops,
        'train_mib': (memory_watch.peak - base_rss) / 2**20,
        # Over the warm-up and the timed steps.
        'train_page_faults': memory_watch.page_faults / (FLAGS.steps + 1),
        'xla_mib': None if xla_bytes is None else xla_bytes / 2**20,
        'device': jax.devices()[0].device_kind,
    }


def _torch_worker(name: str) -> dict[str, Any]:
    """Measures the PyTorch counterpart of `name` (runs in its own process)."""
    import torch
    import torch.nn.functional as F

    _release_free_memory()
    base_rss = _rss_bytes()
    torch.manual_seed(0)
    model = _torch_model(name, FLAGS.num_classes)
    images, labels = model_setup.random_batch(
        (FLAGS.size, FLAGS.size), FLAGS.batch_size, FLAGS.num_classes
    )
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels).long()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def logits(out):
        return out['out'] if isinstance(out, dict) else out

    def run_train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(logits(model(x)), y, ignore_index=255)
        loss.backward()
        optimizer.step()

    model.train()
    _release_free_memory()
    with _MemoryWatch() as memory_watch:
        train_times = _time_steps(run_train_step, FLAGS.steps)

    model.eval()
    model = model.to(memory_format=torch.channels_last)
    x_last = x.contiguous(memory_format=torch.channels_last)

    def run_forward():
        with torch.inference_mode():
            logits(model(x_last))

    infer_times = _time_steps(run_forward, FLAGS.steps)
    return {
        'input_size': FLAGS.size,
        'params': sum(p.numel() for p in model.parameters()),
        'train_s': statistics.median(train_times),
        'infer_s': statistics.median(infer_times),
        'train_mib': (memory_watch.peak - base_rss) / 2**20,
        # Over the warm-up and the timed steps.
        'train_page_faults': memory_watch.page_faults / (FLAGS.steps + 1),
        'threads': torch.get_num_threads(),
        'torch': torch.__version__,
    }


def worker_environment(kind: str, huge_pages: bool) -> dict[str, str]:
    """The environment of a `kind` ('jax' / 'torch') worker: ours, plus huge pages if asked.

    Each step's XLA buffers are fresh allocations, so on 4 KiB pages a U-Net-ResNet50 train
    step takes about 250,000 page faults; with glibc's huge-page tunable 2,000-3,400. Only
    the JAX workers get it: it slowed PyTorch's steps by 13-25% on our Xeon CI host.
    """
    if huge_pages and kind == 'jax':
        return huge_pages_lib.environment_with_huge_pages(os.environ)  # The user's value kept.
    return dict(os.environ)


def _run_worker(kind: str, name: str) -> dict[str, Any]:
    """Runs one measurement in a fresh interpreter and returns its result."""
    argv = [
        sys.executable,
        '-m',
        'benchmarks.model_benchmark',
        f'--worker={kind}:{name}',
        f'--size={FLAGS.size}',
        f'--batch_size={FLAGS.batch_size}',
        f'--steps={FLAGS.steps}',
        f'--num_classes={FLAGS.num_classes}',
        f'--dtype={FLAGS.dtype}',
        f'--remat={FLAGS.remat}',
    ]
    env = worker_environment(kind, FLAGS.jax_huge_pages)
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX) :])
    raise RuntimeError(
        f'{kind} benchmark of {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}'
    )


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def measure_matmul_gflops(n: int = 4096, repeats: int = 3) -> float:
    """Best fp32 GFLOP/s of an n x n matmul over NumPy's BLAS, XLA and torch (if installed).

    The best library sets the ceiling: NumPy's bundled OpenBLAS may lack the kernels for
    this CPU's widest vector units, so it alone can understate what the machine does.
    """
    a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    candidates = [lambda: a @ a]
    import jax

    on_device = jax.device_put(a)
    matmul = jax.jit(lambda x: x @ x)
    candidates.append(lambda: matmul(on_device).block_until_ready())
    if _torch_available():
        import torch

        t = torch.from_numpy(a)
        candidates.append(lambda: torch.mm(t, t))
    best = min(min(_time_steps(run, repeats)) for run in candidates)
    return 2 * n**3 / best / 1e9


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:  # None or NaN.
        return '—'
    return f'{value:.{digits}f}'


def markdown_table(rows: list[dict[str, Any]], peak_gflops: float) -> str:
    """Formats the results (one dict per model) as a Markdown table."""
    header = (
        '| model | input | train img/s | infer img/s | compile s | GFLOP/img train / infer '
        f'| train GFLOP/s (% of {peak_gflops:.0f}) | train MiB (XLA MiB) '
        '| PyTorch counterpart | PyTorch train / infer img/s | ratio train / infer '
        '| PyTorch train MiB |'
    )
    lines = [header, '| ' + ' | '.join(['---'] * (header.count('|') - 1)) + ' |']
    for row in rows:
        ours, theirs = row['jax'], row.get('torch')
        batch = row['batch_size']
        train_ips, infer_ips = batch / ours['train_s'], batch / ours['infer_s']
        gflops = ours['train_flops'] / ours['train_s'] / 1e9
        cells = [
            row['model'],
            str(ours['input_size']),
            _fmt(train_ips),
            _fmt(infer_ips),
            _fmt(ours['compile_s'], 1),
            f'{_fmt(ours["train_flops"] / batch / 1e9, 0)} / '
            f'{_fmt(ours["infer_flops"] / batch / 1e9, 0)}',
            f'{gflops:.0f} ({100 * gflops / peak_gflops:.0f}%)',
            f'{_fmt(ours["train_mib"], 0)} ({_fmt(ours["xla_mib"], 0)})',
        ]
        if theirs:
            t_train, t_infer = batch / theirs['train_s'], batch / theirs['infer_s']
            cells += [
                TORCH_LABELS[row['model']],
                f'{_fmt(t_train)} / {_fmt(t_infer)}',
                f'{_fmt(train_ips / t_train)} / {_fmt(infer_ips / t_infer)}',
                _fmt(theirs['train_mib'], 0),
            ]
        else:
            cells += ['—'] * 4
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv):
    del argv
    if FLAGS.worker:
        kind, name = FLAGS.worker.split(':')
        result = _jax_worker(name) if kind == 'jax' else _torch_worker(name)
        print(_RESULT_PREFIX + json.dumps(result), flush=True)
        return
    from fcn_unet_jax import models

    unknown = [m for m in FLAGS.models if m not in models.MODELS]
    if unknown:
        raise errors.UserError(f'Unknown --models {unknown}; known: {sorted(models.MODELS)}.')
    use_torch = FLAGS.torch == 'yes' or (FLAGS.torch == 'auto' and _torch_available())
    if FLAGS.torch == 'yes' and not _torch_available():
        raise errors.UserError('--torch=yes but torch is not importable in this environment.')
    peak = FLAGS.peak_gflops or measure_matmul_gflops()
    print(f'fp32 matmul ceiling: {peak:.0f} GFLOP/s', flush=True)
    rows = []
    for name in FLAGS.models:
        row = {'model': name, 'batch_size': FLAGS.batch_size, 'jax': _run_worker('jax', name)}
        print(f'{name}: {row["jax"]}', flush=True)
        if use_torch and name in TORCH_LABELS:
            try:
                row['torch'] = _run_worker('torch', name)
            except RuntimeError as error:  # Our figures still count; the table shows '—'.
                print(f'WARNING: {error}', file=sys.stderr, flush=True)
            else:
                print(f'{TORCH_LABELS[name]}: {row["torch"]}', flush=True)
        rows.append(row)
    table = markdown_table(rows, peak)
    caption = (
        f'{FLAGS.size} px, batch {FLAGS.batch_size}, {FLAGS.dtype}, '
        f'{os.cpu_count()} CPU threads, median of {FLAGS.steps} steps; '
        f'device: {rows[0]["jax"]["device"]}'
        + ('; JAX on huge pages' if FLAGS.jax_huge_pages else '')
    )
    print(f'\n{caption}\n\n{table}')
    if FLAGS.output:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
        with open(FLAGS.output, 'w') as f:
            f.write(f'{caption}\n\n{table}\n')
        with open(os.path.splitext(FLAGS.output)[0] + '.json', 'w') as f:
            json.dump({'peak_gflops': peak, 'caption': caption, 'rows': rows}, f, indent=2)


if __name__ == '__main__':
    xla_options.set_default_flags()  # Before JAX starts its backends.
    app.run(errors.guard(main), flags_parser=errors.parse_flags)
