"""`models.build_encoder`: one place builds every backbone, and every model uses it."""

import flax
import jax
import numpy as np
import pytest

from fcn_unet_jax import models
from fcn_unet_jax.models import encoders, vgg
from fcn_unet_jax.models.resnet import ResNet
from fcn_unet_jax.models.vgg import VGG16
from tests.models.helpers import TINY, abstract_init, make_config

pytestmark = pytest.mark.usefixtures('fast_compiles')

# The encoder options each head asks for (`fcn.py`, `unet.py`).
HEAD_OPTIONS = {
    'fcn_vgg': {'fcn_form': True},
    'fcn_head': {'dilate': (False, True, True)},
    'fcn_skips': {},
    'smp_unet': {},
}


def test_encoder_names():
    assert models.ENCODERS == ('vgg16', 'resnet50', 'resnet101')
    assert {info.encoder for info in models.MODELS.values()} == {*models.ENCODERS, None}


@pytest.mark.parametrize(
    ('name', 'options', 'kind', 'fields'),
    [
        ('vgg16', {}, VGG16, {'fcn': False}),
        (
            'vgg16',
            {'fcn_form': True, 'dropout_rate': 0.2},
            VGG16,
            {'fcn': True, 'dropout_rate': 0.2},
        ),
        ('resnet50', {}, ResNet, {'depth': 50, 'variant': 'torchvision'}),
        (
            'resnet101',
            {'resnet_variant': 'caffe', 'dilate': (False, True, True)},
            ResNet,
            {'depth': 101, 'variant': 'caffe', 'dilate': (False, True, True)},
        ),
    ],
)
def test_build_encoder_makes_the_named_backbone(name, options, kind, fields):
    encoder = models.build_encoder(name, width=TINY, dtype='bfloat16', remat=True, **options)
    assert type(encoder) is kind and encoder.name == encoders.ENCODER_SCOPE == 'backbone'
    assert (encoder.width, encoder.dtype, encoder.remat) == (TINY, 'bfloat16', True)
    assert {field: getattr(encoder, field) for field in fields} == fields


@pytest.mark.parametrize(
    ('name', 'options', 'message'),
    [
        ('resnet34', {}, r"Unknown encoder 'resnet34'; valid encoders: \('vgg16', 'resnet50'"),
        ('resnet50', {'fcn_form': True}, 'fcn_form applies to the vgg16 encoder'),
        ('vgg16', {'dilate': (False, True, True)}, 'applies to ResNet encoders'),
    ],
)
def test_build_encoder_rejects_what_the_encoder_does_not_have(name, options, message):
    with pytest.raises(ValueError, match=message):
        models.build_encoder(name, **options)


@pytest.mark.parametrize('name', [n for n, info in models.MODELS.items() if info.encoder])
def test_every_model_backbone_is_its_registered_encoder(name):
    info = models.MODELS[name]
    shape = (1, 32, 32, 3)
    backbone = abstract_init(models.build_model(make_config(name)), shape)
    encoder = models.build_encoder(info.encoder, width=TINY, **HEAD_OPTIONS[info.head])
    variables = jax.eval_shape(
        lambda: encoder.init(jax.random.key(0), jax.numpy.zeros(shape), train=False)
    )
    for collection, tree in flax.core.unfreeze(variables).items():
        assert flax.core.unfreeze(backbone[collection]['backbone']) == tree, collection


def test_fc_init_keeps_the_full_width_gain_at_any_width():
    """fc6/fc7 start with torchvision's per-layer gain whatever the channel multiplier."""
    assert vgg.fc_init_std(1.0) == 0.01  # torchvision's N(0, 0.01) at the paper's widths
    encoder = models.build_encoder('vgg16', width=TINY, fcn_form=True)
    variables = encoder.init(jax.random.key(0), jax.numpy.zeros((1, 32, 32, 3)), train=False)
    for name, full_fan_in in (('fc6', 7 * 7 * 512), ('fc7', 4096)):
        kernel = np.asarray(variables['params'][name]['kernel'])
        fan_in = int(np.prod(kernel.shape[:-1]))
        assert fan_in == full_fan_in * TINY
        # std x sqrt(fan-in) as at full width (1.58 for fc6, 0.64 for fc7), not 4x less.
        np.testing.assert_allclose(
            kernel.std() * np.sqrt(fan_in), 0.01 * np.sqrt(full_fan_in), rtol=0.03
        )
