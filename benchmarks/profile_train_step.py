r"""Where the time of one train step goes: a per-operation profile of the compiled step.

(`--mode=infer` profiles the jitted inference forward pass instead.)

Compiles the project's train step (`train_steps.jit_train_step`) for one model (the set-up of
`model_setup.py`, shared with `model_benchmark.py`), runs a few steps under
`jax.profiler.trace`, and reads the trace back (`jax.profiler.ProfileData`): every XLA
operation the CPU runtime executed is an event named after its HLO instruction. Events are
matched to the optimised HLO module and grouped by what they compute:

* `conv kxk`: convolutions by window size: forward passes and input gradients (k = the
  kernel size), and filter gradients, which XLA emits as convolutions whose window is the
  activation map (k = its height and width, e.g. `conv 40x40` at 320 px / stride 8);
* `matmul`: dot products (e.g. 1x1 convs written as matrix products, classifier heads);
* `reduction`: reductions (BatchNorm statistics, loss, gradient sums);
* `layout copy`: transposes, copies and reversals (e.g. the flipped, transposed kernels
  of the backward pass's input-gradient convolutions);
* `elementwise`: every other fusion (BatchNorm normalisation, ReLU, optimiser update...).

Prints a Markdown table of the share of busy time per group and the slowest operations
with their HLO shapes; `--trace_dir` keeps the trace for TensorBoard / XProf.

    python -m benchmarks.profile_train_step --model=fcn_resnet50 [--size=320] [--steps=2] \
        [--mode=infer]

`--config` profiles a config's own step instead (its model, loss, optimiser, crop size and
batch size; `--model`, `--size`, `--batch_size` and `--num_classes` are then ignored), on a
random batch with a border weight map where the config trains on one:

    python -m benchmarks.profile_train_step --config=configs/skip_ablation_shapes.py:fcn

Before the profile, `--timed_steps` untraced steps are timed: the median step time and
images per second are the step's speed (the traced steps run slower).
"""

import collections
import functools
import glob
import re
import tempfile
import time

import numpy as np
from absl import app, flags

from benchmarks import model_setup
from fcn_unet_jax import config_files, errors, sharding, xla_options

FLAGS = flags.FLAGS
flags.DEFINE_string('model', 'fcn_resnet50', 'Model name (a key of fcn_unet_jax.models.MODELS).')
flags.DEFINE_integer('size', 320, 'Square input size.')
flags.DEFINE_integer('batch_size', 4, 'Batch size.')
flags.DEFINE_integer('steps', 2, 'Profiled steps (after one warm-up step).')
flags.DEFINE_integer('num_classes', 21, 'Output classes.')
flags.DEFINE_integer('top', 15, 'Slowest operations listed.')
flags.DEFINE_enum('mode', 'train', ['train', 'infer'], 'Profile the train step or inference.')
flags.DEFINE_string('trace_dir', None, 'Keep the trace here (default: a temporary folder).')
flags.DEFINE_integer('timed_steps', 5, 'Untraced steps timed before the profile.')
config_files.define_config_flag(
    help_string="Profile this config's step instead of --model's (a file or a name)."
)

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\((.*)$')


def parse_hlo(hlo_text: str) -> dict[str, dict[str, str]]:
    """Maps each HLO instruction name to its opcode, shape, called ops and attributes.

    For a fusion, `ops` lists the opcodes inside its fused computation, which tells what
    the fused kernel computes.
    """
    computations: dict[str, list[str]] = collections.defaultdict(list)
    instructions: dict[str, dict[str, str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
        if header and not line.startswith(' '):
            current = header.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, rest = match.groups()
        computations[current].append(opcode)
        called = re.search(r'calls=%?([\w.\-]+)', rest)
        window = re.search(r'window=\{size=(\w+)', rest)
        instructions[name] = {
            'opcode': opcode,
            'shape': shape,
            'calls': called.group(1) if called else '',
            'window': window.group(1) if window else '',
        }
    for info in instructions.values():
        info['ops'] = ' '.join(computations.get(info['calls'], [])) or info['opcode']
    return instructions


def _inner_conv_windows(hlo_text: str) -> dict[str, str]:
    """Fused computation name -> window size of the convolution inside it."""
    windows, current = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r'^%?([\w.\-]+) .*\{$', line)
        if header:
            current = header.group(1)
            continue
        if ' convolution(' in line and current:
            window = re.search(r'window=\{size=(\w+)', line)
            windows[current] = window.group(1) if window else '1x1'
    return windows


def classify(info: dict[str, str], windows: dict[str, str]) -> str:
    """The group of an HLO instruction (see the module docstring)."""
    ops = info['ops'].split()
    if 'convolution' in ops:
        window = info['window'] or windows.get(info['calls'], '1x1')
        return f'conv {window}'
    if 'dot' in ops:
        return 'matmul'
    if 'reduce' in ops or 'reduce-window' in ops or 'select-and-scatter' in ops:
        return 'reduction'
    if set(ops) <= {'transpose', 'copy', 'reverse', 'parameter', 'bitcast', 'tuple'}:
        return 'layout copy'
    return 'elementwise'


def profile_events(trace_dir: str) -> collections.Counter:
    """Total duration (ns) per event name of the XLA executor threads in the trace.

    The CPU runtime runs some operations asynchronously (XLA's own convolutions, on the
    Eigen thread pool): the event named after the operation then only covers its launch,
    and a later `end: NAME` event marks its completion. Such an operation is timed from
    its launch to its completion.
    """
    from jax.profiler import ProfileData

    launches: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    completions: dict[str, list[int]] = collections.defaultdict(list)
    for path in glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True):
        for plane in ProfileData.from_file(path).planes:
            for line in plane.lines:
                if not line.name.startswith('tf_XLA'):  # Python and other host threads.
                    continue
                for event in line.events:
                    if event.name.startswith('end: '):
                        completions[event.name[len('end: ') :]].append(event.end_ns)
                    else:
                        launches[event.name].append((event.start_ns, event.end_ns))
    totals: collections.Counter = collections.Counter()
    for name, spans in launches.items():
        spans.sort()
        ends = sorted(completions.get(name, []))
        if len(ends) == len(spans):  # Asynchronous: each launch pairs with the next end.
            pairs = zip(spans, ends, strict=True)
            spans = [(start, max(end, done)) for (start, end), done in pairs]
        totals[name] = sum(end - start for start, end in spans)
    return totals


def main(argv):
    del argv
    import jax

    from fcn_unet_jax import models, train_steps

    if FLAGS.config is not None:
        config = FLAGS.config
    else:
        config = model_setup.benchmark_config(
            FLAGS.model, FLAGS.size, FLAGS.batch_size, FLAGS.num_classes
        )
    images, labels = model_setup.random_batch(
        config.input.crop_size, config.batch_size, config.model.num_classes
    )
    arrays = {'image': images, 'label': labels}
    if config.input.get('border_weights'):
        # Any positive weights: the step's cost does not depend on their values.
        arrays['weight'] = np.ones(labels.shape, np.float32)

    mesh = sharding.create_mesh()
    model = models.build_model(config.model)
    state, tx, schedule = train_steps.create_train_state(config, model, mesh, jax.random.key(0))
    replicated, batched = sharding.replicated_sharding(mesh), sharding.batch_sharding(mesh)
    batch = jax.device_put(arrays, batched)
    key = jax.device_put(jax.random.key(1), replicated)
    if FLAGS.mode == 'train':
        compiled = (
            train_steps.jit_train_step(config, model, tx, schedule, mesh)
            .lower(state, batch, key)
            .compile()
        )
        holder = {'state': state}

        def run():
            holder['state'], summary = compiled(holder['state'], batch, key)
            jax.block_until_ready(summary)

    else:
        variables = state.variables()
        compiled = (
            jax.jit(functools.partial(model.apply, train=False))
            .lower(variables, batch['image'])
            .compile()
        )

        def run():
            jax.block_until_ready(compiled(variables, batch['image']))

    run()
    times = []
    for _ in range(FLAGS.timed_steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    trace_dir = FLAGS.trace_dir or tempfile.mkdtemp(prefix='train_step_trace_')
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(FLAGS.steps):
            run()
    wall_ms = (time.perf_counter() - start) * 1e3 / FLAGS.steps

    hlo = compiled.as_text()
    instructions, windows = parse_hlo(hlo), _inner_conv_windows(hlo)
    totals = profile_events(trace_dir)
    groups: collections.Counter = collections.Counter()
    rows = []
    for name, ns in totals.items():
        info = instructions.get(name)
        if info is None:  # Runtime bookkeeping, not an HLO operation.
            continue
        group = classify(info, windows)
        groups[group] += ns
        rows.append((ns, name, group, info['shape']))
    busy = sum(groups.values())
    steps = FLAGS.steps
    step_s = float(np.median(times)) if times else float('nan')
    print(
        f'{config.model.name} {FLAGS.mode}, {config.input.crop_size[0]} px, batch '
        f'{config.batch_size}: {1e3 * step_s:.0f} ms per step untraced (median of '
        f'{len(times)}, {config.batch_size / step_s:.1f} img/s); {wall_ms:.0f} ms per step '
        f'with tracing, {busy / 1e6 / steps:.0f} ms of operations per step '
        f'(summed over threads; operations also run concurrently)\n'
    )
    print('| group | ms / step | share |\n| --- | --- | --- |')
    for group, ns in groups.most_common():
        print(f'| {group} | {ns / 1e6 / steps:.0f} | {100 * ns / busy:.1f}% |')
    print('\n| slowest operations | group | output shape | ms / step |\n| --- | --- | --- | --- |')
    for ns, name, group, shape in sorted(rows, reverse=True)[: FLAGS.top]:
        print(f'| {name} | {group} | {shape} | {ns / 1e6 / steps:.1f} |')
    print(f'\nTrace: {trace_dir}')


if __name__ == '__main__':
    xla_options.set_default_flags()  # Before JAX starts its backends.
    app.run(errors.guard(main), flags_parser=errors.parse_flags)
