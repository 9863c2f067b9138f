"""The train and eval steps of every model family lower for CPU, TPU and CUDA.

`.lower(lowering_platforms=...)` needs no accelerator and no plugin, so every family's real
steps (built by `fcn_unet_jax.aot.trace_steps` as the Trainer builds them, on the 4
simulated devices, at width 1/16) are lowered for all three platforms here. The rewrites of
`fcn_unet_jax.ops` were measured on XLA:CPU only, so the accelerator programs must hold the
plain Flax/XLA ops: the same convolutions, matrix products and poolings as the program of
`plain_ops=True`, and none of XLA:CPU's fusion barriers (`stablehlo.rng`). The CPU program
must keep its rewrites. Compiling for a TPU or GPU is `tests/accel/` (`make accel-check`).
"""

import collections
import re

import pytest

from configs import default
from fcn_unet_jax import aot, sharding
from fcn_unet_jax.models import resnet
from tests.models.helpers import make_config

# One model per family (the registry's `head`), at the smallest inputs that keep every
# stage's map at least 1 x 1; the batch splits over the 4 simulated devices.
FAMILIES = [
    pytest.param('fcn8s_vgg16', {}, 32, id='fcn_vgg'),
    pytest.param('fcn_resnet50', {}, 64, id='fcn_head'),
    pytest.param('fcn8s_resnet50', {}, 64, id='fcn_skips'),
    pytest.param('unet', {'padding': 'VALID'}, 188, id='unet_valid'),
    pytest.param('unet_resnet50', {'batch_norm_stats': 'per_device'}, 64, id='smp_unet'),
]
PLATFORMS = ('cpu', 'tpu', 'cuda')
# What tells a rewrite from the plain op in StableHLO: 1x1 convolutions and up-convolutions
# become matrix products, Winograd adds products, phase-wise gradients add convolutions,
# the pooling gradient replaces select_and_scatter; `rng` is the fusion barriers' draw.
STRUCTURE = ('convolution', 'dot_general', 'reduce_window', 'select_and_scatter', 'rng')


def _config(name, overrides, size, **model_overrides):
    config = default.get_config()
    config.model = make_config(name, **overrides, **model_overrides)
    config.batch_size = config.eval_batch_size = 4
    config.input.crop_size = (size, size)
    return config


def _structure(lowered) -> dict[str, int]:
    counts = collections.Counter(re.findall(r'stablehlo\.(\w+)', lowered.as_text()))
    return {op: counts[op] for op in STRUCTURE}


@pytest.fixture
def short_resnets(monkeypatch):
    """ResNet-50 with 5 bottleneck blocks instead of 16, for tracing time: every kind of
    block stays (the first of a stage, which projects its input, and a later one; the
    dilated ones of torchvision's FCN in stages 3 and 4)."""
    monkeypatch.setitem(resnet.RESNET_LAYERS, 50, (1, 1, 2, 1))


@pytest.mark.parametrize(('name', 'overrides', 'size'), FAMILIES)
@pytest.mark.usefixtures('short_resnets')
def test_steps_lower_for_every_platform_with_the_plain_ops_on_accelerators(name, overrides, size):
    mesh = sharding.create_mesh()
    tuned = aot.trace_steps(_config(name, overrides, size), mesh)
    plain = aot.trace_steps(_config(name, overrides, size, plain_ops=True), mesh)
    for step in ('train', 'eval'):
        reference = _structure(plain[step].lower(lowering_platforms=('tpu',)))
        programs = {p: tuned[step].lower(lowering_platforms=(p,)) for p in PLATFORMS}
        for platform in ('tpu', 'cuda'):
            assert _structure(programs[platform]) == reference, (step, platform)
        if step == 'train':
            # The CPU program keeps its rewrites: 1x1 convolutions as matrix products.
            cpu = _structure(programs['cpu'])
            assert cpu['dot_general'] > reference['dot_general'], cpu
            assert cpu['convolution'] < reference['convolution'], cpu


def test_targets_name_their_topology_devices_and_memory():
    v5e, v4 = aot.get_target('v5e-8'), aot.get_target('v4-8')
    assert (v5e.platform, v5e.topology, v5e.memory_gib, aot.device_count(v5e)) == (
        'tpu',
        'v5e:2x4',
        16.0,
        8,
    )
    # A v4 chip's two cores are one device: v4-8 is 4 devices of 32 GiB.
    assert (v4.topology, v4.chip_config, aot.device_count(v4)) == ('v4:2x2x1', 'megacore', 4)
    h100 = aot.get_target('h100:8')
    assert (h100.platform, h100.topology, aot.device_count(h100)) == ('cuda', '1x1x8', 8)
    assert 79 < h100.memory_gib < 80  # 80 GB: the target config's device_memory_size.
    with pytest.raises(ValueError, match='known: v4-8'):
        aot.get_target('v9-8')


def test_fit_advice_says_what_to_change():
    config = default.get_config()
    config.batch_size = 64
    target = aot.get_target('v5e-8')
    assert aot.fit_advice(config, target, 4 * aot.GIB).startswith('fits: 4.00 GiB of 16 GiB')
    advice = aot.fit_advice(config, target, int(17.2 * aot.GIB))
    assert 'needs 17.2 GiB per device, v5e-8 has 16 GiB' in advice
    for change in ('--config.batch_size; now 64, 8 per device', 'bfloat16', 'remat=True'):
        assert change in advice


def test_collectives_are_counted_by_kind():
    text = (
        '%a = f32[4]{0} all-reduce(f32[4]{0} %x)\n'
        '%b = (f32[2]{0}, f32[2]{0}) all-reduce-start(f32[2]{0} %y, f32[2]{0} %z)\n'
        '%c = (f32[2]{0}, f32[2]{0}) all-reduce-done(%b)\n'
        '%d = f32[8]{0} all-gather(f32[1]{0} %w)\n'
    )
    assert aot.count_collectives(text) == {'all-reduce': 2, 'all-gather': 1}


def test_batches_must_split_over_the_devices():
    config = default.get_config()
    config.batch_size = 1
    with pytest.raises(ValueError, match='--config.batch_size=8'):
        aot.check_batch_sizes(config, 8)
