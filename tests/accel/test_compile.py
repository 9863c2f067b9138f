"""The real train and eval steps compile for a TPU slice (and 8 H100s, with the CUDA plugin).

Compile-only devices (`fcn_unet_jax.aot`) stand in for the hardware: libtpu's v5e-8
topology, and the CUDA plugin's 8 x H100 where `.[cuda12]` is installed. Every model family's
train step compiles at a small size; the eval step (the same `inference` code for every
model) and both BatchNorm choices compile for the BatchNorm-heavy encoder U-Net. The
results go to the JSON-lines file `$AOT_RESULTS` (default `workdirs/accel-check/results.jsonl`)
that `make accel-check` prints as a table. Marked `accel`: `make accel-check` runs them in
`.venv-accel` (jax[tpu]); `make test` leaves them out.

Compiling for a TPU is slow even for a small program (one to a few CPU-minutes per step,
growing with the number of layers), so the sizes are the smallest that keep every
kind of layer: width 1/8, 64-128 px crops, and ResNet-50 with 5 bottleneck blocks instead of
16 (the first block of each stage, which projects its input, and a later, dilated one).
Recipe-size compiles are `python -m benchmarks.aot_compile` (docs/accelerators.md).
"""

import os
import pathlib

import pytest

from configs import default
from fcn_unet_jax import aot
from fcn_unet_jax.models import resnet

pytestmark = pytest.mark.accel
pytest.importorskip('libtpu', reason="needs libtpu: pip install -e '.[tpu]' (make accel-check)")

RESULTS = pathlib.Path(os.environ.get('AOT_RESULTS', 'workdirs/accel-check/results.jsonl'))
SHORT_RESNET = (1, 1, 2, 1)
# One model per family (the VALID U-Net at 188 px, its smallest input), batch 8 (1 per
# device).
FAMILIES = [
    pytest.param('fcn8s_vgg16', {}, 64, id='fcn_vgg'),
    pytest.param('fcn_resnet50', {'aux_head': True}, 128, id='fcn_head'),
    pytest.param('fcn8s_resnet50', {}, 128, id='fcn_skips'),
    pytest.param('unet', {'padding': 'VALID'}, 188, id='unet_valid'),
]


@pytest.fixture(autouse=True)
def short_resnets(monkeypatch):
    monkeypatch.setitem(resnet.RESNET_LAYERS, 50, SHORT_RESNET)


def _config(name, overrides, size):
    config = default.get_config()
    config.model.update(name=name, num_classes=21, width=0.125, **overrides)
    config.batch_size = config.eval_batch_size = 8
    config.input.crop_size = (size, size)
    return config


def _compile(config, target_name, steps=('train',)):
    target = aot.get_target(target_name)
    try:
        devices = aot.compile_only_devices(target)
    except aot.TargetUnavailable as error:
        pytest.skip(str(error))
    reports = aot.compile_steps(config, devices, steps=steps)
    label = f'{config.model.name} width {config.model.width:g}'
    if 'resnet50' in config.model.name:
        label += f', ResNet-50 of {sum(SHORT_RESNET)} blocks'
    record = aot.result_record(label, config, target, len(devices), aot.eval_size(config), reports)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    aot.append_result(str(RESULTS), record)
    assert record['fits'], record['advice']
    for report in reports.values():
        # (Temporaries can be 0: XLA:TPU keeps a small program's in on-chip memory.)
        assert report.argument_bytes > 0 and report.peak_bytes >= report.argument_bytes
    return reports


@pytest.mark.parametrize(('name', 'overrides', 'size'), FAMILIES)
def test_every_family_trains_on_a_tpu_slice(name, overrides, size):
    train = _compile(_config(name, overrides, size), 'v5e-8')['train']
    assert train.flops > 0
    # Data parallel: the gradients (at least) are summed across the 8 devices.
    assert train.collectives.get('all-reduce', 0) >= 1


def test_both_batch_norm_choices_compile_and_per_device_sums_fewer_statistics():
    config = _config('unet_resnet50', {}, 128)
    synchronised = _compile(config, 'v5e-8', steps=('train', 'eval'))
    assert synchronised['eval'].flops > 0
    config.model.batch_norm_stats = 'per_device'
    per_device = _compile(config, 'v5e-8')
    counts = {
        'global': synchronised['train'].collectives.get('all-reduce', 0),
        'per_device': per_device['train'].collectives.get('all-reduce', 0),
    }
    # Synchronised BatchNorm sums each layer's statistics (forward) and their gradients
    # (backward) across devices, one after the other; per device, what is left is the
    # gradient sums and the running averages, which XLA combines.
    assert counts['per_device'] >= 1 and counts['per_device'] * 10 < counts['global'], counts


def test_steps_compile_for_8_h100s_where_the_cuda_plugin_is_installed():
    pytest.importorskip('jax_plugins.xla_cuda12', reason="needs '.[cuda12]' (about 5 GB)")
    train = _compile(_config('unet_resnet50', {}, 128), 'h100:8')['train']
    assert train.collectives.get('all-reduce', 0) >= 1
