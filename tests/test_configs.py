"""Every file in configs/ loads, names a registered model and dataset, and builds its model.

Each config (every preset of the ones that take an argument, with and without `runlocal`)
must resolve `model.name` through `models.build_model` (which validates every model field)
and `dataset.name` to a registered tfds builder and builder config; its model is then
traced with `jax.eval_shape` at the config's own crop size, which costs no FLOPs.

Real datasets (VOC, SBD, Cityscapes, a user's folder) are not available to tests, so only
two configs, FCN-8s VGG16 (`fcn_voc.py:8s`, the staged VOC recipe: summed loss, bias lr,
frozen upsamplers) and FCN-ResNet50 (`fcn_resnet_voc.py:50`, the torchvision recipe: aux
head, poly schedule), train their `runlocal` variant
for 2 steps with everything but the data kept: the dataset is swapped for a tiny build of
the synthetic `shapes` data in a temporary data_dir (4 classes), and batches are sized for
the 4 devices that conftest simulates. A U-Net config's runlocal variant
(configs/skip_ablation_shapes.py) trains in tests/experiments/test_skip_ablation.py; the
other configs only trace, to keep the suite fast (one ResNet run compiles for ~30 s here).

The family configs' arguments are checked too (a missing or unknown one is a one-line
error naming the valid values), and so is the agreement of each replication config's
docstring with the paper's number it records in `config.reported`.
"""

import glob
import importlib
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import pytest
import tensorflow_datasets as tfds

from configs import fcn_resnet_voc, fcn_voc, folder_preset, skip_ablation_shapes
from fcn_unet_jax import models, train
from fcn_unet_jax.data import builders

pytestmark = pytest.mark.usefixtures('fast_compiles')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Configs whose argument string picks a preset: every preset is checked.
PRESETS = {
    'fcn_voc': list(fcn_voc.STAGES),
    'fcn_resnet_voc': list(fcn_resnet_voc.DEPTHS),
    'folder_preset': [f'{m},{s}' for m in folder_preset.MODELS for s in folder_preset.BATCH_SIZES],
    'skip_ablation_shapes': list(skip_ablation_shapes.FAMILY_RECIPES),
}
CONFIG_NAMES = sorted(
    os.path.basename(path)[:-3]
    for path in glob.glob(os.path.join(REPO, 'configs', '*.py'))
    if not path.endswith('__init__.py')
)
CASES = [(name, arg) for name in CONFIG_NAMES for arg in PRESETS.get(name, [None])]
# Builders whose config is made at run time from the user's root folder.
RUNTIME_CONFIG_BUILDERS = ('folder', 'volumes')


def load(name: str, arg: str | None) -> ml_collections.ConfigDict:
    config = importlib.import_module(f'configs.{name}').get_config(arg)
    if config.model.num_classes is None:  # Taken from the user's data when the run starts.
        config.model.num_classes = 3
    return config


def with_runlocal(arg: str | None) -> str:
    return f'{arg},runlocal' if arg else 'runlocal'


def check_dataset_name(dataset_name: str) -> None:
    """The name is `builder[/config]` of a registered builder (nothing is prepared)."""
    builder_name, _, config_name = dataset_name.partition('/')
    builder_cls = tfds.builder_cls(builder_name)
    if builder_name in RUNTIME_CONFIG_BUILDERS:
        assert not config_name, dataset_name
    elif config_name:
        assert config_name in {c.name for c in builder_cls.BUILDER_CONFIGS}, dataset_name


@pytest.mark.parametrize(('name', 'arg'), CASES)
def test_config_resolves_model_and_dataset(name, arg):
    for config in (load(name, arg), load(name, with_runlocal(arg))):
        assert config.model.name in models.MODELS
        models.build_model(config.model)
        check_dataset_name(config.dataset.name)
        if config.dataset.name == 'folder':
            # The user's data root is never baked into a config.
            with pytest.raises(ValueError, match='folder_root'):
                builders.get_builder(config.dataset)


@pytest.mark.parametrize(('name', 'arg'), CASES)
def test_model_traces_at_config_crop_size(name, arg):
    config = load(name, arg)
    model = models.build_model(config.model)
    height, width = config.input.crop_size
    images = jax.ShapeDtypeStruct((1, height, width, config.model.input_channels), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    logits = logits['out'] if isinstance(logits, dict) else logits
    assert logits.shape[-1] == config.model.num_classes
    if config.model.padding == 'SAME' or config.model.name != 'unet':
        assert logits.shape[1:3] == (height, width)


def test_fcn_voc_stages_follow_the_reference_solvers():
    stages = {stage: load('fcn_voc', stage) for stage in ('32s', '16s', '8s')}
    assert stages['32s'].init_from == 'weights/vgg16_fcn'
    assert stages['16s'].init_from == 'workdirs/fcn_voc_32s'
    assert stages['8s'].init_from == 'workdirs/fcn_voc_16s'
    for stage, config in stages.items():
        assert config.optimizer.learning_rate == fcn_voc.STAGES[stage].learning_rate
        assert config.optimizer.momentum == 0.99
        assert config.loss.normalization == 'sum'
        assert config.batch_size == 1
        assert min(config.input.crop_size) >= 500, stage
        assert load('fcn_voc', f'{stage},runlocal').init_from is None
    learning_rates = {s: c.optimizer.learning_rate for s, c in stages.items()}
    assert learning_rates == {'32s': 1e-10, '16s': 1e-12, '8s': 1e-14}
    assert load('fcn_voc', '8s_atonce').init_from == 'weights/vgg16_fcn8s_atonce'
    assert load('fcn_voc', '8s_atonce').optimizer.learning_rate == 1e-10


def test_fcn_voc_launch_commands_chain_the_stages():
    # Each stage's documented workdir is where the next stage's init_from looks.
    for stage in fcn_voc.STAGES:
        workdir = fcn_voc.WORKDIR.format(stage=stage)
        command = f'--config=configs/fcn_voc.py:{stage}'
        assert re.search(rf'{re.escape(command)} \\?\s*--workdir={workdir}\n', fcn_voc.__doc__)
    assert fcn_voc.STAGES['16s'].init_from == fcn_voc.WORKDIR.format(stage='32s')
    assert fcn_voc.STAGES['8s'].init_from == fcn_voc.WORKDIR.format(stage='16s')
    for stage in ('32s', '8s_atonce'):
        assert f'--output={fcn_voc.STAGES[stage].init_from}\n' in fcn_voc.__doc__
    for depth in fcn_resnet_voc.DEPTHS.values():
        assert f'--output={depth.init_from}\n' in fcn_resnet_voc.__doc__


@pytest.mark.parametrize(
    ('name', 'arg'),
    [
        ('fcn_voc', None),
        ('fcn_voc', 'runlocal'),
        ('fcn_voc', '4s'),
        ('fcn_voc', '32s,16s'),
        ('fcn_resnet_voc', None),
        ('fcn_resnet_voc', '152,runlocal'),
    ],
)
def test_family_config_refuses_a_missing_or_unknown_argument(name, arg):
    valid = PRESETS[name]
    with pytest.raises(ValueError, match=re.escape(', '.join(valid))) as error:
        load(name, arg)
    assert '\n' not in str(error.value)
    assert f'configs/{name}.py' in str(error.value)


def test_runlocal_combines_with_the_argument_in_any_order():
    for name in ('fcn_voc', 'fcn_resnet_voc'):
        for arg in PRESETS[name]:
            first = load(name, f'runlocal,{arg}').to_dict()
            assert first == load(name, f'{arg},runlocal').to_dict()
            assert first['num_train_steps'] == 4 and first['init_from'] is None


def _number(value: float) -> str:
    return f'{value:.1f}'


def _docstring_rows(doc: str, keys) -> dict[str, list[str]]:
    """The words of the docstring's table rows: the first line each argument value opens."""
    rows = {}
    for words in (line.split() for line in doc.splitlines()):
        if words and words[0] in keys:
            rows.setdefault(words[0], words)
    return rows


def test_docstrings_state_the_reported_numbers_of_the_config():
    # The number is written once, in config.reported; the docstrings repeat it for readers.
    rows = _docstring_rows(fcn_voc.__doc__, fcn_voc.STAGES)
    assert list(rows) == list(fcn_voc.STAGES)
    for stage, spec in fcn_voc.STAGES.items():
        reported = load('fcn_voc', stage).reported
        row = rows[stage]
        assert row[1:4] == [spec.model, f'{spec.learning_rate:.0e}', spec.init_from], row
        if reported.mean_iou is None:
            assert row[4:] == ['none', 'of', 'its', 'own']
        else:
            assert row[4:] == [_number(reported.mean_iou)]
    for depth in fcn_resnet_voc.DEPTHS:
        reported = load('fcn_resnet_voc', depth).reported
        line = ' '.join(_docstring_rows(fcn_resnet_voc.__doc__, [depth])[depth])
        assert (
            f'mean IoU {_number(reported.mean_iou)}, '
            f'pixel accuracy {_number(reported.pixel_accuracy)}'
        ) in line
    unet_paper = importlib.import_module('configs.unet_paper')
    assert f'IoU {unet_paper.IOU_PHC_U373} on PhC-U373' in unet_paper.__doc__
    assert f'{unet_paper.IOU_DIC_HELA} on DIC-HeLa' in unet_paper.__doc__
    cityscapes = load('fcn8s_cityscapes', None).reported
    assert f'Table 4: {_number(cityscapes.mean_iou)} class IoU' in re.sub(
        r'\s+', ' ', importlib.import_module('configs.fcn8s_cityscapes').__doc__
    )


def test_replication_configs_record_what_their_number_applies_to():
    recorded = {}
    for name, arg in CASES:
        config = load(name, arg)
        if not config.reported.recipe:
            assert config.reported.to_dict() == load('default', None).reported.to_dict()
            continue
        recorded[config.reported.recipe] = config
        applies_to = dict(config.reported.applies_to)
        assert {'model.name', 'dataset.name', 'dataset.eval_split'} <= set(applies_to)
        assert applies_to['model.name'] == config.model.name
        assert applies_to['dataset.name'] == config.dataset.name
        assert applies_to['dataset.eval_split'] == config.dataset.eval_split
        # A smoke run keeps the recipe's identity.
        runlocal = load(name, with_runlocal(arg)).reported.to_dict()
        assert runlocal == config.reported.to_dict()
    assert sorted(recorded) == [
        'configs/fcn8s_cityscapes.py',
        'configs/fcn_resnet_voc.py:101',
        'configs/fcn_resnet_voc.py:50',
        'configs/fcn_voc.py:16s',
        'configs/fcn_voc.py:32s',
        'configs/fcn_voc.py:8s',
        'configs/fcn_voc.py:8s_atonce',
        'configs/unet_paper.py',
    ]
    assert dict(recorded['configs/unet_paper.py'].reported.applies_to)['model.padding'] == 'VALID'


@pytest.mark.parametrize(
    ('name', 'arg'),
    [('fcn_voc', '8s'), pytest.param('fcn_resnet_voc', '50', marks=pytest.mark.slow)],
)
def test_runlocal_trains_on_shapes(name, arg, shapes_small_data_dir, tmp_path):
    config = load(name, with_runlocal(arg))
    config.dataset.name = 'shapes/small'
    config.dataset.data_dir = shapes_small_data_dir
    config.dataset.train_split = 'train[:8]'
    config.dataset.eval_split = 'validation[:4]'
    config.model.num_classes = 4
    config.input.eval_pad_size = (64, 64)
    config.batch_size = 4
    config.eval_batch_size = 4
    config.num_train_steps = 2
    config.eval.tensorboard_images = 0  # Pictures are tests/test_console_logs.py's.
    summaries = train.train_and_evaluate(config, str(tmp_path))
    assert summaries['step'] == 2
    assert math.isfinite(summaries['train_loss'])
    assert 0.0 <= summaries['eval']['mean_iou'] <= 1.0
