"""Compiling the real train and eval steps for accelerators this machine does not have.

JAX compiles for a device it can describe without owning it: `jax.experimental.topologies`
describes a Cloud TPU slice through libtpu (`pip install -e '.[tpu]'`), and the CUDA plugin
(`.[cuda12]`) describes GPUs given a target config of the GPU model
(`GpuTargetConfigProto`, as in XLA's `xla/backends/gpu/target_config/specs/`). Such
compile-only devices take a `Mesh` like real ones, so the train and eval steps are built
exactly as the `Trainer` builds them, from abstract shapes (`jax.eval_shape` for the state,
`jax.ShapeDtypeStruct` batches with the mesh's shardings), and compiled. XLA then reports
per-device memory (arguments, outputs, temporaries), its cost analysis (flops) and the
program with its collectives; nothing runs, so no speed is measured.

`trace_steps` stops before lowering: `.lower(lowering_platforms=...)` of its result for
'cpu', 'cuda' or 'tpu' needs no plugin at all (the tests lower every model family for all
three).

`python -m benchmarks.aot_compile --config=... --target=v5e-8` is the command-line front
end; `docs/accelerators.md` holds its results.
"""

import collections
import dataclasses
import json
import os
import pathlib
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from fcn_unet_jax import models, optimizers, sharding, train_steps

GIB = 2**30
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')
# A collective in XLA's HLO text: `... all-reduce(` or, asynchronous, `... all-reduce-start(`
# (its `-done` half is not counted again).
_COLLECTIVE = re.compile(r'\s(' + '|'.join(COLLECTIVES) + r')(?:-start)?\(')


class TargetUnavailable(RuntimeError):
    """The compile-only devices of a target cannot be made here (runtime not installed, or a
    private API changed); the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator system to compile for.

    Attributes:
      name: the user-facing name ('v5e-8', 'h100:8').
      platform: 'tpu' or 'cuda'.
      topology: libtpu's topology name ('v5e:2x4') or the CUDA plugin's
        'slices x hosts x devices per host' ('1x1x8').
      chip_config: libtpu's chip configuration: 'megacore' (v4, v5p: both cores of a chip
        are one JAX device) or 'default' (one core per chip).
      memory_gib: memory per JAX device, GiB (HBM per chip; the GPU's memory).
      description: one line about the system, for reports.
    """

    name: str
    platform: str
    topology: str
    chip_config: str
    memory_gib: float
    description: str


# TPU slices as maxtext's `accelerator_to_spec_map.py` names them; memory per chip from
# the Cloud TPU system architecture pages (v4: 32 GiB HBM2, v5e: 16 GiB, v5p: 95 GiB,
# v6e: 32 GiB). A v4 or v5p chip's two cores are one device (megacore), so v4-8 (8 cores)
# is 4 devices.
_TPU_SYSTEMS = {
    'v4': ('megacore', 32.0, 2, 'TPU v4, megacore (one device per chip of 2 cores)'),
    'v5e': ('default', 16.0, 1, 'TPU v5e (v5 lite), one core per chip'),
    'v5p': ('megacore', 95.0, 2, 'TPU v5p, megacore (one device per chip of 2 cores)'),
    'v6e': ('default', 32.0, 1, 'TPU v6e (Trillium), one core per chip'),
}
_TPU_TOPOLOGIES = {
    'v4-8': 'v4:2x2x1',
    'v4-16': 'v4:2x2x2',
    'v4-32': 'v4:2x2x4',
    'v5e-4': 'v5e:2x2',
    'v5e-8': 'v5e:2x4',
    'v5e-16': 'v5e:4x4',
    'v5e-32': 'v5e:4x8',
    'v5e-64': 'v5e:8x8',
    'v5p-8': 'v5p:2x2x1',
    'v5p-16': 'v5p:2x2x2',
    'v6e-4': 'v6e:2x2',
    'v6e-8': 'v6e:2x4',
    'v6e-16': 'v6e:4x4',
    'v6e-32': 'v6e:4x8',
}
# GPU models: the target config the CUDA plugin compiles for. The H100's is an abridged
# copy of XLA's `h100_sxm.txtpb`; its `device_memory_size` is the memory per device.
GPU_TARGET_CONFIGS = {
    'h100': pathlib.Path(__file__).resolve().parent / 'gpu_targets' / 'h100_sxm.txtpb',
}
TARGET_NAMES = (*_TPU_TOPOLOGIES, *(f'{gpu}:8' for gpu in GPU_TARGET_CONFIGS))


def get_target(name: str) -> Target:
    """The `Target` called `name`: a TPU slice ('v5e-8', 'v4-8', ...) or 'GPU:N' ('h100:8').

    Raises:
      ValueError: for an unknown name (the message lists the known ones).
    """
    if name in _TPU_TOPOLOGIES:
        generation = name.split('-')[0]
        chip_config, memory, _, description = _TPU_SYSTEMS[generation]
        return Target(name, 'tpu', _TPU_TOPOLOGIES[name], chip_config, memory, description)
    gpu, _, count = name.partition(':')
    if gpu in GPU_TARGET_CONFIGS and count.isdigit() and 1 <= int(count) <= 8:
        text = GPU_TARGET_CONFIGS[gpu].read_text()
        memory = int(re.search(r'device_memory_size:\s*(\d+)', text).group(1)) / GIB
        description = re.search(r'device_description_str:\s*"([^"]*)"', text).group(1)
        return Target(name, 'cuda', f'1x1x{count}', '', memory, f'{count} x {description}')
    raise ValueError(
        f'Unknown target {name!r}; known: {", ".join(TARGET_NAMES)} (GPUs: NAME:N, N <= 8 '
        f'on one host, NAME one of {sorted(GPU_TARGET_CONFIGS)}).'
    )


def compile_only_devices(target: Target) -> list[jax.Device]:
    """Devices of `target` that JAX compiles for without owning them.

    Raises:
      TargetUnavailable: when the platform's runtime is not installed here or (CUDA) the
        private API this uses has changed.
    """
    if target.platform == 'tpu':
        return _tpu_devices(target)
    return _cuda_devices(target)


def _tpu_devices(target: Target) -> list[jax.Device]:
    from jax.experimental import topologies

    # Several processes may load libtpu at once (pytest workers, one compile per config);
    # without this libtpu refuses all but the first ("multi-process lockfile").
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    try:
        import libtpu  # noqa: F401  (only to tell a missing runtime from a failure)
    except ImportError as error:
        raise TargetUnavailable(
            f"{target.name} needs libtpu: pip install -e '.[tpu]' (jax[tpu]=={jax.__version__})"
        ) from error
    topology = topologies.get_topology_desc(
        platform='tpu',
        topology_name=target.topology,
        chip_config_name=target.chip_config,
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
    )
    return list(topology.devices)


def _cuda_devices(target: Target) -> list[jax.Device]:
    # Private JAX APIs (jax 0.10.2): the CUDA plugin's compile-only topology. Guarded, so a
    # JAX release that moves them reports why instead of failing obscurely.
    os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')  # No GPU driver here.
    try:
        from jax._src import xla_bridge
        from jax._src.lib import xla_client
        from jax.experimental import topologies

        xla_bridge._discover_and_register_pjrt_plugins()
        factory = xla_bridge._backend_factories.get('cuda')
    except (ImportError, AttributeError) as error:
        raise TargetUnavailable(
            f'JAX {jax.__version__} moved the private APIs of the CUDA compile-only '
            f'topology: {error!r}'
        ) from error
    if factory is None or getattr(factory, 'c_api', None) is None:
        raise TargetUnavailable(
            f"{target.name} needs the CUDA plugin: pip install -e '.[cuda12]' "
            f'(jax[cuda12]=={jax.__version__}, about 5 GB)'
        )
    gpu = target.name.partition(':')[0]
    options = {'topology': target.topology, 'target_config': GPU_TARGET_CONFIGS[gpu].read_text()}
    try:
        topology = xla_client._xla.get_c_api_topology(factory.c_api, 'cuda', options)
        return list(topologies.TopologyDescription(topology._make_compile_only_devices()).devices)
    except (AttributeError, TypeError) as error:
        raise TargetUnavailable(
            f'JAX {jax.__version__} changed the CUDA compile-only topology API: {error!r}'
        ) from error


def abstract_train_state(
    config: ml_collections.ConfigDict, mesh: Mesh
) -> tuple[train_steps.TrainState, Any, Any]:
    """The train state of `train_steps.create_train_state` as shapes, with its shardings.

    The variables are those of the plain-ops model: the same tree whatever
    `config.model.plain_ops` (tests/models/test_plain_ops.py), and it traces faster.

    Returns:
      (state of `jax.ShapeDtypeStruct`s, replicated over `mesh`; optimiser; schedule).
    """
    model_config = ml_collections.ConfigDict(config.model.to_dict())
    model_config.plain_ops = True
    model = models.build_model(model_config)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    abstract = jax.eval_shape(lambda r: train_steps.initial_variables(model, config, r), rng)
    tx, schedule = optimizers.create_optimizer(config, abstract['params'])

    state = jax.eval_shape(lambda v: train_steps.TrainState.create(v, tx), abstract)
    return _with_sharding(state, sharding.replicated_sharding(mesh)), tx, schedule


def _with_sharding(tree: Any, placement) -> Any:
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), tree
    )


def train_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global train batch the input pipeline feeds, as shapes sharded over `mesh`."""
    b, (h, w) = config.batch_size, config.input.crop_size
    batch = {
        'image': jax.ShapeDtypeStruct((b, h, w, config.model.input_channels), jnp.float32),
        'label': jax.ShapeDtypeStruct((b, h, w), jnp.int32),
    }
    if config.input.border_weights:
        batch['weight'] = jax.ShapeDtypeStruct((b, h, w), jnp.float32)
    return _with_sharding(batch, sharding.batch_sharding(mesh))


def eval_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """The eval batch's padded (height, width) when no dataset is at hand.

    `config.input.eval_pad_size` when set; otherwise the dataset decides (its largest image,
    rounded up to a multiple of 32), and the crop size rounded up the same way stands in.
    """
    if config.input.eval_pad_size is not None:
        return tuple(config.input.eval_pad_size)
    return tuple(-(-side // 32) * 32 for side in config.input.crop_size)


def eval_batch(
    config: ml_collections.ConfigDict, mesh: Mesh, size: Sequence[int] | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
    """The padded global eval batch, as shapes sharded over `mesh`.

    Args:
      config: the full config.
      mesh: the data-parallel mesh.
      size: the padded (height, width); default `eval_size(config)`.
    """
    b, (h, w) = config.eval_batch_size, tuple(size or eval_size(config))
    batch = {
        'image': jax.ShapeDtypeStruct((b, h, w, config.model.input_channels), jnp.float32),
        'label': jax.ShapeDtypeStruct((b, h, w), jnp.int32),
        'mask': jax.ShapeDtypeStruct((b, h, w), jnp.bool_),
    }
    return _with_sharding(batch, sharding.batch_sharding(mesh))


def check_batch_sizes(config: ml_collections.ConfigDict, devices: int) -> None:
    """Raises ValueError, naming the fix, unless both batch sizes divide over the devices."""
    for name in ('batch_size', 'eval_batch_size'):
        if config[name] % devices:
            fixed = -(-config[name] // devices) * devices
            raise ValueError(
                f'config.{name}={config[name]} does not split over {devices} devices (the '
                f'global batch is sharded on the data axis); e.g. --config.{name}={fixed}.'
            )


def trace_steps(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    eval_image_size: Sequence[int] | None = None,
) -> dict[str, jax.stages.Traced]:
    """Traces the train and eval steps of `config` on `mesh`, as the `Trainer` builds them.

    From abstract state and batches (nothing is allocated), under the mesh
    (`jax.sharding.use_abstract_mesh`), as per-device BatchNorm statistics need. Lower the
    result for the mesh's platform (`.lower()`) or, without its devices, for any platform
    (`.lower(lowering_platforms=('tpu',))`).

    Args:
      config: the full config.
      mesh: a mesh with a 'data' axis, of real or compile-only devices.
      eval_image_size: the eval batch's (height, width); default `eval_size(config)`.

    Returns:
      {'train': traced train step, 'eval': traced eval step}.

    Raises:
      ValueError: when a batch size does not split over the mesh's devices.
    """
    check_batch_sizes(config, sharding.data_axis_size(mesh))
    model = models.build_model(config.model)
    state, tx, schedule = abstract_train_state(config, mesh)
    rng = _with_sharding(
        jax.eval_shape(lambda: jax.random.key(0)), sharding.replicated_sharding(mesh)
    )
    train_step = train_steps.jit_train_step(config, model, tx, schedule, mesh)
    eval_step = train_steps.jit_eval_step(config, model, mesh)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return {
            'train': train_step.trace(state, train_batch(config, mesh), rng),
            'eval': eval_step.trace(state, eval_batch(config, mesh, eval_image_size)),
        }


@dataclasses.dataclass
class StepReport:
    """What XLA reports about one compiled step, per device.

    Attributes:
      compile_seconds: lowering and compiling (tracing excluded).
      argument_bytes, output_bytes, alias_bytes, temp_bytes: XLA's buffer assignment
        (`compiled.memory_analysis()`); aliased bytes are outputs written into donated
        arguments (the train state).
      flops: XLA's cost analysis of the per-device program (None where not reported).
      collectives: count of each collective in the optimised program.
    """

    compile_seconds: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    flops: float | None
    collectives: dict[str, int]

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs - aliases + temporaries: what the step needs resident."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Occurrences of each collective (`COLLECTIVES`) in an HLO module's text."""
    counts = collections.Counter(_COLLECTIVE.findall(hlo_text))
    return {kind: counts[kind] for kind in COLLECTIVES if counts[kind]}


def _report(lowered: jax.stages.Lowered, began: float) -> StepReport:
    compiled = lowered.compile()
    seconds = time.perf_counter() - began
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # One entry per program in older JAX releases.
        cost = cost[0] if cost else None
    flops = cost.get('flops') if cost else None
    return StepReport(
        compile_seconds=seconds,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        flops=float(flops) if flops is not None and flops > 0 else None,
        collectives=count_collectives(compiled.as_text()),
    )


def compile_steps(
    config: ml_collections.ConfigDict,
    devices: Sequence[jax.Device],
    eval_image_size: Sequence[int] | None = None,
    steps: Sequence[str] = ('train', 'eval'),
) -> dict[str, StepReport]:
    """Compiles the train and eval steps of `config` for `devices` (compile-only or real).

    Args:
      config: the full config.
      devices: the devices of the data-parallel mesh.
      eval_image_size: the eval batch's (height, width); default `eval_size(config)`.
      steps: which of 'train' and 'eval' to compile.

    Returns:
      {step name: its `StepReport`}.
    """
    traced = trace_steps(config, sharding.create_mesh(devices), eval_image_size)
    reports = {}
    for name in steps:
        began = time.perf_counter()
        reports[name] = _report(traced[name].lower(), began)
    return reports


def fit_advice(config: ml_collections.ConfigDict, target: Target, peak_bytes: int) -> str:
    """One line: whether `peak_bytes` per device fits `target`, and what to change if not."""
    need, have = peak_bytes / GIB, target.memory_gib
    if need <= have:
        return f'fits: {need:.2f} GiB of {have:g} GiB per device ({100 * need / have:.0f}%).'
    per_device = config.batch_size // device_count(target)
    changes = [
        f'a smaller global batch (--config.batch_size; now {config.batch_size}, '
        f'{per_device} per device)'
    ]
    if config.model.dtype != 'bfloat16':
        changes.append('bfloat16 compute (--config.model.dtype=bfloat16)')
    if not config.model.remat:
        changes.append('rematerialisation (--config.model.remat=True)')
    changes.append('a smaller crop (--config.input.crop_size)')
    return (
        f'DOES NOT FIT: needs {need:.1f} GiB per device, {target.name} has {have:g} GiB. '
        f'Try {", ".join(changes)}.'
    )


def device_count(target: Target) -> int:
    """Number of JAX devices of `target` (a v4 or v5p slice counts chips, not cores)."""
    if target.platform == 'cuda':
        return int(target.topology.split('x')[-1])
    generation, cores = target.name.split('-')
    return int(cores) // _TPU_SYSTEMS[generation][2]


def summarize(reports: Mapping[str, StepReport]) -> dict[str, Any]:
    """Plain numbers of `reports` for JSON output (GiB, seconds, flops, collectives)."""
    return {
        name: {
            'peak_gib': r.peak_bytes / GIB,
            'argument_gib': r.argument_bytes / GIB,
            'output_gib': r.output_bytes / GIB,
            'alias_gib': r.alias_bytes / GIB,
            'temp_gib': r.temp_bytes / GIB,
            'flops_per_device': r.flops,
            'compile_seconds': r.compile_seconds,
            'collectives': r.collectives,
        }
        for name, r in reports.items()
    }


def steps_table(reports: Mapping[str, StepReport]) -> str:
    """The per-device figures of compiled steps, one line per step, for a terminal."""
    lines = [
        f'{"step":6} {"peak GiB":>9} {"args GiB":>9} {"out GiB":>8} {"alias GiB":>9} '
        f'{"temp GiB":>9} {"GFLOP/dev":>10} {"compile s":>9}  collectives'
    ]
    for step, r in reports.items():
        flops = f'{r.flops / 1e9:,.1f}' if r.flops else 'n/a'
        lines.append(
            f'{step:6} {r.peak_bytes / GIB:9.2f} {r.argument_bytes / GIB:9.2f} '
            f'{r.output_bytes / GIB:8.2f} {r.alias_bytes / GIB:9.2f} {r.temp_bytes / GIB:9.2f} '
            f'{flops:>10} {r.compile_seconds:9.1f}  {_collective_list(r.collectives)}'
        )
    return '\n'.join(lines)


def _collective_list(counts: Mapping[str, int]) -> str:
    return ', '.join(f'{n} {kind}' for kind, n in counts.items()) or 'none'


def result_record(
    label: str,
    config: ml_collections.ConfigDict,
    target: Target,
    devices: int,
    eval_image_size: Sequence[int],
    reports: Mapping[str, StepReport],
) -> dict[str, Any]:
    """Everything a results table row needs, as JSON-ready values.

    Args:
      label: the config as given (`configs/fcn_voc.py:8s`).
      config: the config compiled (with any overrides).
      target: the target compiled for.
      devices: its device count.
      eval_image_size: the eval batch's padded (height, width).
      reports: `compile_steps`'s result.
    """
    peak = max(r.peak_bytes for r in reports.values())
    return {
        'config': label,
        'target': target.name,
        'devices': devices,
        'model': config.model.name,
        'dtype': config.model.dtype,
        'remat': bool(config.model.remat),
        'batch_norm_stats': config.model.get('batch_norm_stats', 'global'),
        'batch_size': config.batch_size,
        'eval_batch_size': config.eval_batch_size,
        'crop': list(config.input.crop_size),
        'eval_size': list(eval_image_size),
        'memory_gib': target.memory_gib,
        'fits': peak / GIB <= target.memory_gib,
        'advice': fit_advice(config, target, peak),
        'steps': summarize(reports),
    }


def append_result(path: str, result: Mapping[str, Any]) -> None:
    """Appends `result` (`result_record`) to a JSON-lines file."""
    with open(path, 'a') as f:
        f.write(json.dumps(result) + '\n')


def read_results(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; of several with the same config, target, batch
    and BatchNorm choice, the last."""
    records = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                records[(r['config'], r['target'], r['batch_size'], r['batch_norm_stats'])] = r
    return list(records.values())


def results_table(records: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of `result_record`s: per-device memory, flops, collectives, fit."""
    lines = [
        '| config | model, dtype | BatchNorm | target | batch (per device) | crop | train peak '
        'GiB (args / temp) | train GFLOP/device | eval peak GiB (eval size) | fits | train '
        'collectives | compile s (train + eval) |',
        '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ]
    for r in records:
        train, evaluation = r['steps'].get('train'), r['steps'].get('eval')
        flops = train and train['flops_per_device']
        compile_s = ' + '.join(f'{s["compile_seconds"]:.0f}' for s in r['steps'].values())
        eval_peak = (
            f'{_gib(evaluation["peak_gib"])} ({r["eval_size"][0]}x{r["eval_size"][1]})'
            if evaluation
            else '-'
        )
        lines.append(
            f'| {r["config"]} | {r["model"]}, {r["dtype"]} | {r["batch_norm_stats"]} '
            f'| {r["target"]} | {r["batch_size"]} ({r["batch_size"] // r["devices"]}) '
            f'| {r["crop"][0]}x{r["crop"][1]} '
            f'| {_peak(train)} | {_gflop(flops)} | {eval_peak} '
            f'| {"yes" if r["fits"] else "**no**"} '
            f'| {_collective_list(train["collectives"]) if train else "-"} | {compile_s} |'
        )
    return '\n'.join(lines)


def _peak(step: Mapping[str, Any] | None) -> str:
    if step is None:
        return '-'
    return f'{_gib(step["peak_gib"])} ({_gib(step["argument_gib"])} / {_gib(step["temp_gib"])})'


def _gib(value: float) -> str:
    # Two decimals, or three significant digits for the small programs of `make accel-check`.
    return f'{value:.2f}' if value >= 0.1 or value == 0 else f'{value:.3g}'


def _gflop(flops: float | None) -> str:
    if not flops:
        return 'n/a'
    return f'{flops / 1e9:,.0f}' if flops >= 1e10 else f'{flops / 1e9:.3g}'


__all__ = [
    'COLLECTIVES',
    'GPU_TARGET_CONFIGS',
    'StepReport',
    'TARGET_NAMES',
    'Target',
    'TargetUnavailable',
    'abstract_train_state',
    'append_result',
    'check_batch_sizes',
    'compile_only_devices',
    'compile_steps',
    'count_collectives',
    'device_count',
    'eval_batch',
    'eval_size',
    'fit_advice',
    'get_target',
    'read_results',
    'result_record',
    'results_table',
    'steps_table',
    'summarize',
    'trace_steps',
    'train_batch',
]
