"""Every file in configs/ loads, names a registered model and dataset, and builds its model.

Each config (every preset of the ones that take an argument, with and without `runlocal`)
must resolve `model.name` through `models.build_model` (which validates every model field)
and `dataset.name` to a registered tfds builder and builder config; its model is then
traced with `jax.eval_shape` at the config's own crop size, which costs no FLOPs.

Real datasets (VOC, SBD, Cityscapes, a user's folder) are not available to tests, so only
two configs, FCN-8s VGG16 (staged VOC recipe: summed loss, bias lr, frozen upsamplers) and
FCN-ResNet50 (torchvision recipe: aux head, poly schedule), train their `runlocal` variant
for 2 steps with everything but the data kept: the dataset is swapped for a tiny build of
the synthetic `shapes` data in a temporary data_dir (4 classes), and batches are sized for
the 4 devices that conftest simulates. A U-Net config's runlocal variant
(configs/skip_ablation_shapes.py) trains in tests/test_skip_ablation_experiment.py; the
other configs only trace, to keep the suite fast (one ResNet run compiles for ~30 s here).
"""

import glob
import importlib
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest
import tensorflow_datasets as tfds

from configs import fcn_voc_recipe, folder_preset, skip_ablation_shapes
from fcn_unet_jax import models, train
from fcn_unet_jax.data import builders

pytestmark = pytest.mark.usefixtures('fast_compiles')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Configs whose argument string picks a preset: every preset is checked.
PRESETS = {
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
    return importlib.import_module(f'configs.{name}').get_config(arg)


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
    stages = {name: load(name, None) for name in ('fcn32s_voc', 'fcn16s_voc', 'fcn8s_voc')}
    assert stages['fcn32s_voc'].init_from == 'weights/vgg16_fcn'
    assert stages['fcn16s_voc'].init_from == 'workdirs/fcn32s_voc'
    assert stages['fcn8s_voc'].init_from == 'workdirs/fcn16s_voc'
    for name, config in stages.items():
        assert config.optimizer.learning_rate == fcn_voc_recipe.LEARNING_RATES[config.model.name]
        assert config.optimizer.momentum == 0.99
        assert config.loss.normalization == 'sum'
        assert config.batch_size == 1
        assert min(config.input.crop_size) >= 500, name
        assert load(name, 'runlocal').init_from is None


@pytest.mark.parametrize(
    ('name', 'arg'),
    [('fcn8s_voc', None), ('fcn_resnet50_voc', None)],
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
    summaries = train.train_and_evaluate(config, str(tmp_path))
    assert summaries['step'] == 2
    assert math.isfinite(summaries['train_loss'])
    assert 0.0 <= summaries['eval']['mean_iou'] <= 1.0
