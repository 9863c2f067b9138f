"""Skip ablations (`config.model.skip_strides`, `config.model.merge`) on every model.

Every combination of merge and a few skip subsets must build and trace at an odd input
size; removing a skip must remove the parameters that served it; and a skip must matter:
perturbing the encoder feature of a level changes the output iff that level is skipped.
"""

import itertools

import flax.linen as nn
import jax
import numpy as np
import pytest

from fcn_unet_jax import models
from tests.models.helpers import (
    abstract_apply,
    abstract_init,
    count,
    make_config,
    random_variables,
    run,
)

pytestmark = pytest.mark.usefixtures('fast_compiles')


def _combinations():
    for name, info in models.MODELS.items():
        if name.endswith('resnet101'):
            continue  # Same code as the ResNet-50 variant; only the block count differs.
        available = info.skip_strides
        subsets = {None, (), available[:1], available[-1:], available}
        yield pytest.param(name, 'none', None, id=f'{name}-none')
        for merge, strides in itertools.product(('sum', 'concat'), sorted(subsets, key=str)):
            yield pytest.param(name, merge, strides, id=f'{name}-{merge}-{strides}')


@pytest.mark.parametrize(('name', 'merge', 'strides'), list(_combinations()))
def test_every_skip_configuration_builds_and_traces(name, merge, strides):
    model = models.build_model(make_config(name, merge=merge, skip_strides=strides))
    shape = (1, 97, 131, 3)
    variables = abstract_init(model, shape)
    out = abstract_apply(model, variables, shape, train=True)
    assert out.shape == (1, 97, 131, 3)


@pytest.mark.parametrize(
    ('name', 'merge', 'strides'),
    [('fcn8s_vgg16', 'concat', (16, 8, 4, 2)), ('unet', 'sum', (1, 4)), ('unet', 'none', None)],
)
def test_skip_configurations_run(name, merge, strides):
    model = models.build_model(make_config(name, merge=merge, skip_strides=strides))
    x = jax.random.normal(jax.random.key(0), (2, 32, 40, 3))
    y = run(model, random_variables(model, x.shape), x, train=True)
    assert y.shape == (2, 32, 40, 3) and np.isfinite(np.asarray(y)).all()


def _params(name, **overrides):
    c = make_config(name, width=1.0, num_classes=21, **overrides)
    return abstract_init(models.build_model(c), (1, 64, 64, 3))


@pytest.mark.parametrize(
    ('name', 'merge', 'drop', 'gone', 'delta'),
    [
        # FCN: the level's score layer (and, for VGG, the upsampler after it) disappear.
        ('fcn8s_vgg16', 'sum', 8, {'score_pool3'}, 256 * 21 + 21),
        ('fcn8s_vgg16', 'concat', 8, {'score_pool3', 'fuse_pool3'}, 256 * 21 + 21 + 42 * 21 + 21),
        ('fcn8s_resnet50', 'sum', 8, {'score_layer2'}, 512 * 21 + 21),
        ('fcn8s_resnet50', 'concat', 16, {'score_layer3', 'fuse_layer3'}, 1024 * 21 + 21 + 903),
        # U-Net concat: the first conv of the level loses the skip's input channels.
        ('unet', 'concat', 1, set(), 3 * 3 * 64 * 64),
        ('unet_resnet50', 'concat', 4, set(), 3 * 3 * 256 * 64),
        ('unet_vgg16', 'concat', 16, set(), 3 * 3 * 512 * 256),
        # Encoder U-Net sum: the 1x1 projection of the skip disappears.
        ('unet_resnet50', 'sum', 4, set(), 256 * 128),
    ],
)
def test_removing_a_skip_removes_its_parameters(name, merge, drop, gone, delta):
    default = models.MODELS[name].default_skip_strides
    with_skip = _params(name, merge=merge, skip_strides=default)
    without = _params(name, merge=merge, skip_strides=tuple(s for s in default if s != drop))
    assert set(with_skip['params']) - set(without['params']) == gone
    assert count(with_skip['params']) - count(without['params']) == delta
    if name == 'fcn8s_vgg16':
        # The x2 upsampler that fed the pool3 fusion goes too.
        assert set(with_skip['frozen']) - set(without['frozen']) == {'upscore_pool4'}


def test_classic_unet_sum_needs_no_projection():
    # The up-convolution halves the channels to the skip's count, so the sum is free.
    with_skip = _params('unet', merge='sum')
    without = _params('unet', merge='sum', skip_strides=(2, 4, 8))
    assert count(with_skip['params']) == count(without['params'])
    concat = _params('unet')
    # Concat doubles the input channels of each up level's first conv instead.
    delta = sum(9 * c * c for c in (64, 128, 256, 512))
    assert count(concat['params']) - count(with_skip['params']) == delta


def _perturbed_output(model, variables, x, stride):
    """Output after adding noise to the encoder's feature at `stride` only.

    The backbone's returned features are intercepted: deeper encoder stages were already
    computed from the clean tensor, so the noise can reach the output only through a skip.
    """

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name != 'backbone' or context.method_name != '__call__':
            return out
        noise = jax.random.normal(jax.random.key(7), out[stride].shape, out[stride].dtype)
        return {**out, stride: out[stride] + noise}

    with nn.intercept_methods(interceptor):
        return run(model, variables, x, train=False)


@pytest.mark.parametrize(
    ('name', 'merge', 'stride'),
    [
        ('fcn8s_vgg16', 'sum', 8),
        ('fcn8s_vgg16', 'concat', 16),
        ('fcn8s_resnet50', 'sum', 16),
        ('unet_resnet50', 'concat', 4),
        ('unet_vgg16', 'sum', 2),
    ],
)
def test_encoder_feature_reaches_output_iff_skipped(name, merge, stride):
    x = jax.random.normal(jax.random.key(0), (2, 32, 40, 3))
    default = models.MODELS[name].default_skip_strides
    for strides in (default, tuple(s for s in default if s != stride)):
        model = models.build_model(make_config(name, merge=merge, skip_strides=strides))
        variables = random_variables(model, x.shape)  # Random, so score layers are non-zero.
        clean = run(model, variables, x, train=False)
        perturbed = _perturbed_output(model, variables, x, stride)
        changed = np.abs(np.asarray(perturbed) - np.asarray(clean)).max()
        if stride in strides:
            assert changed > 1e-3
        else:
            assert changed == 0


@pytest.mark.parametrize('merge', ['concat', 'sum'])
def test_classic_unet_skip_reaches_output_iff_skipped(merge):
    """The classic U-Net's skip tensor is perturbed where its up level receives it."""
    x = jax.random.normal(jax.random.key(0), (2, 32, 40, 3))
    seen = []

    def interceptor(next_fun, args, kwargs, context):
        if context.module.name == 'up2' and context.method_name == '__call__':
            seen.append(args[1] is not None)
            if args[1] is not None:
                args = (args[0], args[1] + 1.0, *args[2:])
        return next_fun(*args, **kwargs)

    for strides in ((1, 2, 4, 8), (1, 4, 8)):
        model = models.build_model(make_config('unet', merge=merge, skip_strides=strides))
        variables = random_variables(model, x.shape)
        clean = run(model, variables, x, train=False)
        with nn.intercept_methods(interceptor):
            perturbed = run(model, variables, x, train=False)
        changed = np.abs(np.asarray(perturbed) - np.asarray(clean)).max()
        assert (changed > 1e-3) == (2 in strides)
    assert seen == [True, False]


def test_merge_none_is_an_encoder_decoder():
    for name in ('fcn8s_vgg16', 'unet', 'unet_vgg16'):
        none = _params(name, merge='none')
        empty = _params(name, skip_strides=())
        assert jax.tree_util.tree_structure(none) == jax.tree_util.tree_structure(empty)
    fcn32 = _params('fcn32s_vgg16')
    assert count(_params('fcn8s_vgg16', merge='none')['params']) == count(fcn32['params'])
