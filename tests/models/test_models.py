"""Tests of the model zoo: registry, shapes, parameter counts and layouts, paper details.

Real compute runs jitted at width 1/16 on small inputs; full-size shapes and exact
parameter counts use `jax.eval_shape`, which allocates nothing.
"""

import functools
import math

import flax
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from fcn_unet_jax import models
from fcn_unet_jax.models import fcn, layers, unet
from fcn_unet_jax.models.resnet import ResNet
from fcn_unet_jax.ops import convolutions, kernel_gradient

TINY = 1 / 16
NAMES = list(models.MODELS)


pytestmark = pytest.mark.usefixtures('fast_compiles')


def make_config(name, **overrides):
    """A model config: 3 classes, 3 channels, tiny width unless overridden."""
    c = default.get_config().model
    c.update({'name': name, 'num_classes': 3, 'input_channels': 3, 'width': TINY, **overrides})
    return c


def jaxpr_eqns(jaxpr, primitives=('conv_general_dilated',)):
    """The equations of a closed jaxpr using `primitives`, sub-jaxprs included."""
    found = []

    def visit(j):
        for eqn in j.eqns:
            if eqn.primitive.name in primitives:
                found.append(eqn)
            for value in eqn.params.values():
                for sub in value if isinstance(value, list | tuple) else [value]:
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        visit(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        visit(sub)

    visit(jaxpr.jaxpr)
    return found


def abstract_init(model, shape):
    return jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct(shape, jnp.float32),
    )


def abstract_apply(model, variables, shape, train=False):
    mutable = ['batch_stats'] if train and 'batch_stats' in variables else False
    out = jax.eval_shape(
        functools.partial(
            model.apply, train=train, rngs={'dropout': jax.random.key(1)}, mutable=mutable
        ),
        variables,
        jax.ShapeDtypeStruct(shape, jnp.float32),
    )
    return out[0] if mutable else out


def random_variables(model, shape, seed=0):
    """Variables with the model's structure, filled by NumPy (no JAX RNG compilations).

    Kernels ~ N(0, 1 / fan_in), BN scale and variance 1, biases and means 0.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == 'kernel':
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)
        return jnp.full(leaf.shape, 1.0 if name in ('scale', 'var') else 0.0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract_init(model, shape))


def run(model, variables, x, train):
    """Jitted apply; returns the output (BN statistics are updated and dropped in training)."""

    def apply(variables, x):
        if not train:
            return model.apply(variables, x, train=False)
        return model.apply(
            variables, x, train=True, rngs={'dropout': jax.random.key(2)}, mutable=['batch_stats']
        )[0]

    return jax.jit(apply)(variables, x)


def real_init(model, shape):
    """Jitted `init_with_output` (cheaper than eager init, which compiles per parameter shape)."""
    init = jax.jit(functools.partial(model.init_with_output, train=False))
    return init(jax.random.key(0), jnp.ones(shape))


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def paths(tree):
    return {'/'.join(k) for k in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))}


def test_registry_has_every_model_name():
    assert set(NAMES) == {
        'fcn32s_vgg16',
        'fcn16s_vgg16',
        'fcn8s_vgg16',
        'fcn8s_atonce_vgg16',
        'fcn_resnet50',
        'fcn_resnet101',
        'fcn8s_resnet50',
        'fcn8s_resnet101',
        'unet',
        'unet_resnet50',
        'unet_vgg16',
    }
    with pytest.raises(ValueError, match='fcn8s_vgg16.*unet_vgg16'):
        models.build_model(make_config('fcn9s'))


@pytest.mark.parametrize(
    ('name', 'overrides', 'field'),
    [
        ('unet', {'dtype': 'float16'}, 'dtype'),
        ('unet', {'width': 0.0}, 'width'),
        ('unet', {'merge': 'add'}, 'merge'),
        ('unet', {'padding': 'same'}, 'padding'),
        ('unet', {'num_classes': 0}, 'num_classes'),
        ('unet', {'dropout_rate': 1.5}, 'dropout_rate'),
        ('unet', {'skip_strides': (16,)}, 'skip_strides'),
        ('unet', {'skip_strides': (8, 8)}, 'skip_strides'),
        ('unet', {'merge': 'none', 'skip_strides': (8,)}, 'skip_strides'),
        ('fcn8s_vgg16', {'skip_strides': (32,)}, 'skip_strides'),
        ('fcn8s_atonce_vgg16', {'skip_strides': (4,)}, 'skip_strides'),
        ('fcn_resnet50', {'skip_strides': (16,)}, 'skip_strides'),
        ('fcn_resnet50', {'resnet_variant': 'keras'}, 'resnet_variant'),
        ('unet_vgg16', {'decoder_channels': (16, 8)}, 'decoder_channels'),
    ],
)
def test_invalid_config_values_name_the_field(name, overrides, field):
    with pytest.raises(ValueError, match=f'config.model.{field}'):
        models.build_model(make_config(name, **overrides))


def test_input_channels_are_checked():
    model = models.build_model(make_config('unet', input_channels=1))
    with pytest.raises(ValueError, match='input_channels is 1'):
        abstract_init(model, (1, 32, 32, 3))


@pytest.mark.parametrize('name', NAMES)
def test_forward_at_tiny_width(name):
    model = models.build_model(make_config(name))
    x = jax.random.normal(jax.random.key(0), (2, 32, 40, 3))
    variables = random_variables(model, x.shape)
    assert set(variables) <= {'params', 'batch_stats', 'frozen'}
    for train in (False, True):
        y = run(model, variables, x, train)
        assert y.shape == (2, 32, 40, 3) and y.dtype == jnp.float32
        assert np.isfinite(np.asarray(y)).all()


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('size', [(97, 131), (500, 375), (64, 64)])
def test_full_width_output_has_input_size(name, size):
    c = make_config(name, width=1.0, num_classes=21)
    model = models.build_model(c)
    shape = (1, *size, 3)
    variables = abstract_init(model, shape)
    out = abstract_apply(model, variables, shape, train=True)
    assert out.shape == shape[:3] + (21,) and out.dtype == jnp.float32


@pytest.mark.parametrize(
    ('name', 'expected'),
    [
        ('fcn32s_vgg16', 134_346_581),
        ('fcn16s_vgg16', 134_357_354),
        ('fcn8s_vgg16', 134_362_751),
        ('fcn8s_atonce_vgg16', 134_362_751),
        ('fcn_resnet50', 32_957_013),
        ('fcn_resnet101', 51_949_141),
        # torchvision ResNet-50 without fc (23,508,032) + score convs on layer4/3/2.
        ('fcn8s_resnet50', 23_508_032 + 43_029 + 21_525 + 10_773),
        # smp 0.6 Unet('resnet50', classes=21): encoder + decoder blocks + 3x3 head.
        ('unet_resnet50', 23_508_032 + 9_012_928 + 3_045),
        # smp 0.6 Unet('vgg16', classes=21): features + center block + decoder + head.
        ('unet_vgg16', 14_714_688 + 4_720_640 + 4_312_768 + 3_045),
    ],
)
def test_parameter_counts_with_21_classes(name, expected):
    c = make_config(name, width=1.0, num_classes=21)
    variables = abstract_init(models.build_model(c), (1, 64, 64, 3))
    assert count(variables['params']) == expected
    assert models.count_params(c) == expected


def test_fcn_vgg_frozen_upsamplers():
    for name, frozen, size in [
        ('fcn32s_vgg16', {'upscore'}, 1_806_336),
        ('fcn16s_vgg16', {'upscore2', 'upscore'}, 4 * 4 * 21 * 21 + 32 * 32 * 21 * 21),
        ('fcn8s_vgg16', {'upscore2', 'upscore_pool4', 'upscore'}, 127_008),
    ]:
        variables = abstract_init(
            models.build_model(make_config(name, width=1.0, num_classes=21)), (1, 64, 64, 3)
        )
        assert set(variables['frozen']) == frozen
        assert count(variables['frozen']) == size
        assert not frozen & set(variables['params'])


def test_fcn_vgg_learnable_upsampling_moves_intermediate_upsamplers_to_params():
    c = make_config('fcn8s_vgg16', width=1.0, num_classes=21, learnable_upsampling=True)
    variables = abstract_init(models.build_model(c), (1, 64, 64, 3))
    assert set(variables['frozen']) == {'upscore'}
    assert paths(variables['params']) >= {'upscore2/kernel', 'upscore_pool4/kernel'}
    assert count(variables['params']) == 134_362_751 + 2 * 4 * 4 * 21 * 21


def test_fcn_vgg_parameter_layout():
    variables = abstract_init(models.build_model(make_config('fcn8s_vgg16')), (1, 32, 32, 3))
    convs = [f'conv{b}_{i}' for b, n in enumerate((2, 2, 3, 3, 3), 1) for i in range(1, n + 1)]
    expected = {f'backbone/{n}/{p}' for n in [*convs, 'fc6', 'fc7'] for p in ('kernel', 'bias')}
    expected |= {
        f'{n}/{p}' for n in ('score_fr', 'score_pool4', 'score_pool3') for p in ('kernel', 'bias')
    }  # noqa: E501
    assert paths(variables['params']) == expected
    assert variables['params']['backbone']['fc6']['kernel'].shape == (7, 7, 32, 256)
    assert variables['frozen']['upscore']['kernel'].shape == (16, 16, 3, 3)


def test_fcn_vgg_crop_offsets_match_the_reference_nets():
    assert fcn.vgg_fcn_crop_offsets(()) == {'final': 19}
    assert fcn.vgg_fcn_crop_offsets((16,)) == {'pool4': 5, 'final': 27}
    assert fcn.vgg_fcn_crop_offsets((16, 8)) == {'pool4': 5, 'pool3': 9, 'final': 31}


def test_bilinear_kernel_values():
    np.testing.assert_allclose(layers.bilinear_filter(4)[0], [1, 3, 3, 1] / np.float32(16))
    np.testing.assert_allclose(layers.bilinear_filter(4)[1], [3, 9, 9, 3] / np.float32(16))
    kernel = layers.bilinear_kernel(16, 3)
    assert kernel[:, :, 0, 1].max() == 0  # No cross-channel mixing.
    np.testing.assert_array_equal(kernel[:, :, 2, 2], layers.bilinear_filter(16))
    np.testing.assert_allclose(layers.bilinear_filter(16)[7, 8], (15 / 16) ** 2)


def test_bilinear_upsample_interpolates_linear_ramps():
    """A stride-f bilinear deconv reproduces a linear ramp f times finer (away from borders)."""
    ramp = jnp.arange(6.0)[None, :, None, None] * jnp.ones((1, 6, 5, 2))
    up = layers.BilinearUpsample(2, 4)
    variables = up.init(jax.random.key(0), ramp)
    assert set(variables) == {'frozen'} and variables['frozen']['kernel'].shape == (8, 8, 2, 2)
    y = np.asarray(up.apply(variables, ramp))
    assert y.shape == (1, 28, 24, 2)
    inner = y[0, 4:24, 8:16, 0]  # Rows/columns the kernels of two neighbours cover fully.
    np.testing.assert_allclose(np.diff(inner, axis=0), 0.25, atol=1e-6)
    np.testing.assert_allclose(np.diff(inner, axis=1), 0.0, atol=1e-6)


@pytest.mark.parametrize(
    'kwargs',
    [
        {},
        {'strides': (2, 2)},
        {'strides': 2, 'use_bias': False, 'padding': 'VALID'},
        {'padding': ((0, 0), (0, 0)), 'dtype': jnp.bfloat16},
    ],
)
# Fewer and more output than input channels: the kernel gradient is formed either way round.
@pytest.mark.parametrize('features', [3, 8])
def test_pointwise_conv_equals_nn_conv_forward_and_backward(kwargs, features):
    # Odd sizes: a strided 1x1 conv keeps rows/columns 0, s, 2s, ... (output ceil(n / s)).
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 7, 5)), jnp.float32)
    ref, ours = nn_conv(kwargs, features), convolutions.Conv(features, (1, 1), **kwargs)
    variables = ref.init(jax.random.key(0), x)
    ours_variables = ours.init(jax.random.key(0), x)
    assert jax.tree_util.tree_map(jnp.shape, ours_variables) == jax.tree_util.tree_map(
        jnp.shape, variables
    )
    np.testing.assert_array_equal(ours_variables['params']['kernel'], variables['params']['kernel'])
    y_ref, y = ref.apply(variables, x), ours.apply(variables, x)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    tol = 2e-2 if kwargs.get('dtype') == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.float32(y), np.float32(y_ref), rtol=tol, atol=tol)

    def loss(module, v, inputs):
        return jnp.sum(jnp.sin(module.apply(v, inputs).astype(jnp.float32)))

    g_ref = jax.grad(functools.partial(loss, ref), argnums=(0, 1))(variables, x)
    g = jax.grad(functools.partial(loss, ours), argnums=(0, 1))(variables, x)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref), strict=True):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ('kernel', 'strides', 'padding', 'dilation', 'size', 'channels'),
    [
        (3, (1, 1), ((1, 1), (1, 1)), (1, 1), (11, 9), (3, 4)),
        # Strided, odd input: a row is dropped.
        (3, (2, 2), ((1, 1), (1, 1)), (1, 1), (11, 9), (3, 4)),
        # Dilated, as in the FCN-ResNet layer3/4.
        (3, (1, 1), ((2, 2), (2, 2)), (2, 2), (11, 9), (3, 4)),
        (7, (2, 2), ((3, 3), (3, 3)), (1, 1), (11, 9), (3, 4)),  # The ResNet stem.
        (2, (1, 2), ((0, 1), (1, 0)), (1, 1), (11, 9), (3, 4)),  # Asymmetric everything.
        # Stride and dilation sharing no factor.
        (3, (3, 3), ((2, 1), (0, 2)), (2, 2), (11, 9), (3, 4)),
        # Kernel smaller than the stride: empty phases.
        (2, (3, 2), ((0, 0), (1, 1)), (1, 1), (11, 9), (3, 4)),
        # Narrowing, on a map large enough: the CPU's swapped kernel gradient.
        (3, (1, 1), ((1, 1), (1, 1)), (1, 1), (20, 20), (16, 4)),
    ],
)
def test_conv2d_gradients_equal_xla(kernel, strides, padding, dilation, size, channels):
    rng = np.random.default_rng(kernel)
    c_in, c_out = channels
    x = jnp.asarray(rng.normal(size=(2, *size, c_in)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, c_in, c_out)), jnp.float32)

    def reference(x, k):
        dims = ('NHWC', 'HWIO', 'NHWC')
        return jax.lax.conv_general_dilated(
            x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=dims
        )

    def ours(x, k):
        return convolutions.conv2d(x, k, strides, padding, dilation)

    y = reference(x, k)
    np.testing.assert_allclose(ours(x, k), y, rtol=1e-5, atol=1e-5)
    cotangent = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    got = jax.vjp(ours, x, k)[1](cotangent)
    want = jax.vjp(reference, x, k)[1](cotangent)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # The CPU's phase-wise input gradient (used for strided convs) must also match alone.
    np.testing.assert_allclose(
        convolutions.input_grad_by_phases(cotangent, k, x.shape[1:3], strides, padding, dilation),
        want[0],
        rtol=1e-4,
        atol=1e-4,
    )


def test_stride1_kernel_gradient_is_taken_over_the_padded_input():
    # XLA:CPU runs the kernel gradient of a convolution with its padding inside far slower
    # than that of a VALID convolution of the padded input (`models/kernel_gradient.py`).
    x = jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 4, 4), jnp.float32)

    def kernel_grad(x, k):
        conv = functools.partial(
            convolutions.conv2d, strides=(1, 1), padding=((1, 1), (2, 0)), dilation=(1, 1)
        )
        return jax.grad(lambda k_: conv(x, k_).sum())(k)

    convs = jaxpr_eqns(jax.make_jaxpr(kernel_grad)(x, k))
    pads = jaxpr_eqns(jax.make_jaxpr(kernel_grad)(x, k), ('pad',))
    # Forward, and the kernel gradient's convolution without padding of its own.
    assert any(e.params['padding'] == ((0, 0), (0, 0)) for e in convs)
    assert any(e.params['padding_config'][1:3] == ((1, 1, 0), (2, 0, 0)) for e in pads)


@pytest.mark.parametrize(
    ('kernel', 'padding', 'dilation', 'dtype'),
    [
        (3, ((1, 1), (1, 1)), (1, 1), jnp.float32),
        (3, ((2, 2), (2, 2)), (2, 2), jnp.float32),  # Dilated: taps at stride 2.
        (2, ((1, 1), (1, 1)), (1, 1), jnp.float32),  # The decoder's 2x2 phase conv.
        (3, ((1, 2), (0, 1)), (1, 3), jnp.float32),  # Asymmetric padding and dilation.
        (3, ((1, 1), (1, 1)), (1, 1), jnp.bfloat16),
    ],
)
def test_kernel_gradient_over_the_output_gradient_equals_xla(kernel, padding, dilation, dtype):
    rng = np.random.default_rng(kernel)
    x = jnp.asarray(rng.normal(size=(3, 12, 10, 6)), dtype)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, 6, 5)), dtype)

    def conv(k_):
        dims = ('NHWC', 'HWIO', 'NHWC')
        return jax.lax.conv_general_dilated(
            x, k_, (1, 1), padding, rhs_dilation=dilation, dimension_numbers=dims
        )

    y, vjp = jax.vjp(conv, k)
    dy = jnp.asarray(rng.normal(size=y.shape), dtype)
    want = vjp(dy)[0]
    got = kernel_gradient.kernel_grad_over_output_gradient(x, k, dy, padding, dilation)
    assert got.shape == k.shape and got.dtype == dtype
    tol = 1e-4 if dtype == jnp.float32 else 0.2
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ('channels', 'side', 'swapped'),
    [
        ((256, 64), 80, True),  # U-Net-ResNet50's 80 x 80 skip conv.
        ((64, 32), 160, True),
        ((1024, 256), 20, False),  # Too many output channels: the convolution dominates.
        ((96, 64), 80, False),  # Narrows by less than half.
        ((64, 64), 80, False),
        ((512, 128), 10, False),  # Map too small.
        ((16, 4), 20, True),  # The narrowing case of `test_conv2d_gradients_equal_xla`.
    ],
)
def test_narrowing_convs_copy_the_output_gradient_for_their_kernel_gradient(
    channels, side, swapped
):
    # On CPU, the kernel gradient of a conv that narrows its channels is the convolution
    # of dy over the padded input (`kernel_gradient.py`): dy, not x, is copied images-minor.
    c_in, c_out = channels
    x = jax.ShapeDtypeStruct((2, side, side, c_in), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, c_in, c_out), jnp.float32)
    conv = functools.partial(
        convolutions.conv2d, strides=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1)
    )
    hlo = jax.jit(jax.grad(lambda x, k: conv(x, k).sum(), argnums=1)).lower(x, k).as_text()
    assert ('[f, 0, 1, b]x[i, 0, 1, o]->[b, 0, 1, f]' in hlo) == swapped
    assert kernel_gradient.transposes_output_gradient(k.shape, x.shape) == swapped


@pytest.mark.parametrize('size', [(5, 4), (1, 1), (6, 7)])
def test_conv3x3_of_upsampled_equals_the_conv_of_the_upsampled_input(size):
    rng = np.random.default_rng(size[0])
    x = jnp.asarray(rng.normal(size=(2, *size, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 5)), jnp.float32)

    def reference(x, kernel):
        return jax.lax.conv_general_dilated(
            layers.upsample_nearest2x(x),
            kernel,
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        )

    want = reference(x, kernel)
    got = convolutions.conv3x3_of_upsampled(x, kernel)
    assert got.shape == want.shape == (2, 2 * size[0], 2 * size[1], 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    cotangent = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    for a, b in zip(
        jax.vjp(convolutions.conv3x3_of_upsampled, x, kernel)[1](cotangent),
        jax.vjp(reference, x, kernel)[1](cotangent),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('skip_channels', [0, 4])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_upsampled_concat_conv_equals_conv_of_the_concatenation(skip_channels, dtype):
    rng = np.random.default_rng(skip_channels)
    x = jnp.asarray(rng.normal(size=(2, 3, 5, 6)), jnp.float32)
    skip = (
        jnp.asarray(rng.normal(size=(2, 6, 10, skip_channels)), jnp.float32)
        if skip_channels
        else None
    )

    def merged(x, skip):
        up = layers.upsample_nearest2x(x)
        return up if skip is None else jnp.concatenate([up, skip], axis=-1)

    kwargs = {'dtype': dtype, 'param_dtype': jnp.float32}
    ref = convolutions.Conv(7, (3, 3), padding=((1, 1), (1, 1)), **kwargs)
    ours = convolutions.UpsampledConcatConv(7, (3, 3), **kwargs)
    variables = ref.init(jax.random.key(0), merged(x, skip))
    # Same parameter names, shapes and initial values as the conv of the concatenation.
    ours_variables = ours.init(jax.random.key(0), x, skip)
    assert jax.tree_util.tree_map(jnp.shape, ours_variables) == jax.tree_util.tree_map(
        jnp.shape, variables
    )
    np.testing.assert_array_equal(ours_variables['params']['kernel'], variables['params']['kernel'])
    variables['params']['bias'] = jnp.arange(7.0)
    tol = 3e-2 if dtype == jnp.bfloat16 else 1e-5

    def loss_ref(v, x, skip):
        return jnp.sum(jnp.sin(ref.apply(v, merged(x, skip)).astype(jnp.float32)))

    def loss_ours(v, x, skip):
        return jnp.sum(jnp.sin(ours.apply(v, x, skip).astype(jnp.float32)))

    y_ref, y = ref.apply(variables, merged(x, skip)), ours.apply(variables, x, skip)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    np.testing.assert_allclose(np.float32(y), np.float32(y_ref), rtol=tol, atol=tol)
    g_ref = jax.grad(loss_ref, argnums=(0, 1, 2))(variables, x, skip)
    g = jax.grad(loss_ours, argnums=(0, 1, 2))(variables, x, skip)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref), strict=True):
        scale = max(1.0, float(jnp.abs(np.float32(b)).max()))
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol * scale)


def test_upsampled_concat_conv_rejects_a_skip_of_the_wrong_size():
    conv = convolutions.UpsampledConcatConv(4, (3, 3))
    with pytest.raises(ValueError, match=r'twice the height and width.*\(3, 5\).*\(6, 9\)'):
        conv.init(jax.random.key(0), jnp.zeros((1, 3, 5, 2)), jnp.zeros((1, 6, 9, 2)))


# With 'sum', the four blocks with a skip upsample; the last (no skip at stride 1) does not.
@pytest.mark.parametrize(('merge', 'upsampled'), [('concat', 0), ('none', 0), ('sum', 4)])
def test_encoder_unet_decoder_convolves_the_upsampled_input_at_its_own_size(merge, upsampled):
    # The first conv of each decoder block reads the block's input before upsampling:
    # neither the x2 nearest-upsampled tensor nor its concatenation with the skip exists
    # ('sum' adds the projected skip to the upsampled tensor, which then must exist).
    skips = () if merge == 'none' else unet.ENCODER_SKIP_STRIDES
    config = make_config('unet_resnet50', merge=merge, skip_strides=skips)
    model = models.build_model(config)
    shape = (1, 64, 64, 3)
    variables = abstract_init(model, shape)
    images = jax.ShapeDtypeStruct(shape, jnp.float32)
    jaxpr = jax.make_jaxpr(functools.partial(model.apply, train=False))(variables, images)
    assert not jaxpr_eqns(jaxpr, ('concatenate',))
    # `upsample_nearest2x` repeats each row twice: a broadcast to [N, H, 2, W, C].
    row_repeats = [
        e
        for e in jaxpr_eqns(jaxpr, ('broadcast_in_dim',))
        if e.params['broadcast_dimensions'] == (0, 1, 3, 4) and e.params['shape'][2] == 2
    ]
    assert len(row_repeats) == upsampled


def _gradient_jaxpr(conv, x_shape):
    """The jaxpr of the gradient of `conv`'s output sum (parameters and input)."""
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    variables = jax.eval_shape(conv.init, jax.random.key(0), x)
    grad = jax.grad(lambda v, x: conv.apply(v, x).sum(), argnums=(0, 1))
    return str(jax.make_jaxpr(grad)(variables, x))


@pytest.mark.parametrize('strides', [(2, 2), (2, 1)])
def test_strided_conv_takes_the_phasewise_input_gradient(strides):
    shape = (1, 32, 32, 32)
    plain = _gradient_jaxpr(convolutions.Conv(32, (3, 3), padding='SAME'), shape)
    strided = _gradient_jaxpr(convolutions.Conv(32, (3, 3), strides, padding='SAME'), shape)
    assert 'platform_index' not in plain
    # The strided gradient chooses per platform; the CPU branch convolves each of the
    # stride's phases with its own taps.
    assert 'platform_index' in strided
    phases = strides[0] * strides[1]
    assert strided.count('conv_general_dilated[') == plain.count('conv_general_dilated[') + phases


@pytest.mark.parametrize('features', [3, 8])
def test_pointwise_kernel_gradient_on_large_maps_is_a_product_per_image(features):
    # At MIN_PIXELS_PER_IMAGE_BATCHED pixels per image the kernel gradient takes the
    # per-image path; it must equal flax's, and be the batched product.
    side = math.isqrt(convolutions.MIN_PIXELS_PER_IMAGE_BATCHED)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, side, side, 5)), jnp.float32)
    ref, ours = nn_conv({}, features), convolutions.Conv(features, (1, 1))
    variables = ref.init(jax.random.key(0), x)

    def loss(module, v):
        return jnp.sum(jnp.sin(module.apply(v, x)))

    g_ref = jax.grad(functools.partial(loss, ref))(variables)
    g = jax.grad(functools.partial(loss, ours))(variables)
    np.testing.assert_allclose(
        g['params']['kernel'], g_ref['params']['kernel'], rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(g['params']['bias'], g_ref['params']['bias'], rtol=1e-5)
    jaxpr = jax.make_jaxpr(jax.grad(functools.partial(loss, ours)))(variables)
    batched = [
        e
        for e in jaxpr_eqns(jaxpr, ('dot_general',))
        if e.params['dimension_numbers'] == (((1,), (1,)), ((0,), (0,)))
    ]
    assert len(batched) == 1 and batched[0].outvars[0].aval.shape == (3, 5, features)


def nn_conv(kwargs, features=3):
    """The flax reference for `layers.Conv`'s pointwise path."""
    return flax.linen.Conv(features, (1, 1), **kwargs)


def test_resnet_pointwise_convs_run_as_matrix_products():
    # The 1x1 convs (3 of the 4 convs with a projection) must not reach XLA as convolutions:
    # only the stem and the 3x3 convs remain.
    model = ResNet(depth=50, width=1 / 16)
    x = jnp.zeros((1, 64, 64, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    jaxpr = str(jax.make_jaxpr(functools.partial(model.apply, train=False))(variables, x))
    assert jaxpr.count('conv_general_dilated[') == 1 + 16  # Stem + one 3x3 per block.
    assert jaxpr.count('dot_general[') == 16 * 2 + 4  # conv1 + conv3 per block, 4 projections.


@pytest.mark.parametrize('padding', ['SAME', 'VALID'])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_block_conv_transpose_equals_nn_conv_transpose(padding, dtype):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 7, 3)), jnp.float32)
    kwargs = {'strides': (2, 2), 'padding': padding, 'dtype': dtype}
    ref = flax.linen.ConvTranspose(4, (2, 2), **kwargs)
    ours = convolutions.ConvTranspose(4, (2, 2), **kwargs)
    variables = ref.init(jax.random.key(0), x)
    variables['params']['bias'] = jnp.arange(4.0)  # Non-zero, so the bias is checked too.
    assert jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.key(0), x)) == (
        jax.tree_util.tree_map(jnp.shape, variables)
    )
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5

    def loss(module, v, inputs):
        return jnp.sum(jnp.sin(module.apply(v, inputs).astype(jnp.float32)))

    np.testing.assert_allclose(
        np.float32(ours.apply(variables, x)), np.float32(ref.apply(variables, x)), tol, tol
    )
    g_ref = jax.grad(functools.partial(loss, ref), argnums=(0, 1))(variables, x)
    g = jax.grad(functools.partial(loss, ours), argnums=(0, 1))(variables, x)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref), strict=True):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol)


@pytest.mark.parametrize('factor', [2, 3, 8])
def test_subpixel_upsampling_equals_the_transposed_convolution(factor):
    rng = np.random.default_rng(factor)
    x = jnp.asarray(rng.normal(size=(2, 5, 4, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(2 * factor, 2 * factor, 6, 3)), jnp.float32)

    def reference(x, kernel):
        return jax.lax.conv_transpose(
            x,
            kernel,
            (factor, factor),
            'VALID',
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            transpose_kernel=True,
        )

    np.testing.assert_allclose(
        convolutions.upsample_transposed(x, kernel, factor), reference(x, kernel), 1e-5, 1e-5
    )
    cotangent = jnp.asarray(rng.normal(size=(2, 6 * factor, 5 * factor, 6)), jnp.float32)
    for grad_ours, grad_ref in zip(
        jax.vjp(functools.partial(convolutions.upsample_transposed, factor=factor), x, kernel)[1](
            cotangent
        ),
        jax.vjp(reference, x, kernel)[1](cotangent),
        strict=True,
    ):
        np.testing.assert_allclose(grad_ours, grad_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ['fcn8s_vgg16', 'unet'])
def test_upsamplers_never_convolve_a_zero_dilated_input(name):
    # A transposed conv lowered as a conv over the zero-dilated input (lhs_dilation > 1)
    # wastes f * f of its work and has a very slow kernel gradient on CPU.
    config = make_config(name, padding='VALID')
    model = models.build_model(config)
    shape = models.example_input_shape(config, size=64)
    variables = abstract_init(model, shape)
    images = jax.ShapeDtypeStruct(shape, jnp.float32)
    jaxpr = jax.make_jaxpr(functools.partial(model.apply, train=False))(variables, images)
    dilations = [e.params['lhs_dilation'] for e in jaxpr_eqns(jaxpr)]
    assert dilations and all(d == (1, 1) for d in dilations)


def test_fcn_score_layers_start_at_zero():
    out, variables = real_init(models.build_model(make_config('fcn8s_vgg16')), (2, 32, 40, 3))
    scores = {k: v for k, v in variables['params'].items() if k.startswith('score_')}
    assert set(scores) == {'score_fr', 'score_pool4', 'score_pool3'}
    for leaf in jax.tree_util.tree_leaves(scores):
        assert not np.asarray(leaf).any()
    assert not np.asarray(out).any()
    np.testing.assert_array_equal(
        variables['frozen']['upscore']['kernel'], layers.bilinear_kernel(16, 3)
    )


def test_resize_bilinear_matches_pytorch_align_corners_false():
    def torch_bilinear_1d(n_in, n_out):
        # PyTorch's formula: src = (dst + 0.5) * in / out - 0.5, clamped below at 0.
        m = np.zeros((n_out, n_in))
        for d in range(n_out):
            src = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(np.floor(src)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            m[d, i0] += 1 - (src - i0)
            m[d, i1] += src - i0
        return m

    x = np.random.default_rng(0).normal(size=(1, 5, 7, 2)).astype(np.float32)
    for size in [(40, 56), (13, 9)]:
        expected = np.einsum(
            'ah,bw,nhwc->nabc', torch_bilinear_1d(5, size[0]), torch_bilinear_1d(7, size[1]), x
        )
        got = layers.resize_bilinear(jnp.asarray(x), size)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_fcn_resnet_aux_head():
    c = make_config('fcn_resnet50', width=1.0, num_classes=21, aux_head=True)
    model = models.build_model(c)
    variables = abstract_init(model, (1, 97, 131, 3))
    out = abstract_apply(model, variables, (1, 97, 131, 3))
    assert set(out) == {'out', 'aux'}
    assert out['out'].shape == out['aux'].shape == (1, 97, 131, 21)
    aux = variables['params']['aux_classifier']
    assert paths(aux) == {'conv/kernel', 'bn/scale', 'bn/bias', 'out/kernel', 'out/bias'}
    assert aux['conv']['kernel'].shape == (3, 3, 1024, 256)
    assert count(variables['params']) == 32_957_013 + 9 * 1024 * 256 + 2 * 256 + 256 * 21 + 21


def _conv_eqns(variant, dilate):
    module = ResNet(depth=50, variant=variant, dilate=dilate, width=TINY)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(functools.partial(module.apply, train=False))(variables, x)
    return jaxpr_eqns(jaxpr)


def test_resnet_dilation_matches_torchvision_make_layer():
    convs = _conv_eqns('torchvision', (False, True, True))
    dilations = [e.params['rhs_dilation'][0] for e in convs if e.invars[1].aval.shape[0] == 3]
    # layer1, layer2 undilated; layer3's first block keeps dilation 1, the rest use 2;
    # layer4's first block keeps 2, the rest use 4.
    assert dilations == [1] * 3 + [1] * 4 + [1] + [2] * 5 + [2] + [4] * 2


def _conv_layers(variant, dilate):
    """(kernel side, strides) of every conv layer a ResNet-50 calls, in call order."""
    module = ResNet(depth=50, variant=variant, dilate=dilate, width=TINY)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x)
    calls = {}  # Keyed by module path: `layers.Conv` enters `nn.Conv.__call__` again.

    def record(next_fun, args, kwargs, context):
        conv = context.module
        if isinstance(conv, flax.linen.Conv) and context.method_name == '__call__':
            calls.setdefault(conv.path, (conv.kernel_size[0], tuple(conv.strides or (1, 1))))
        return next_fun(*args, **kwargs)

    with flax.linen.intercept_methods(record):
        jax.eval_shape(functools.partial(module.apply, train=False), variables, x)
    return list(calls.values())


def test_resnet_stride_placement_per_variant():
    for variant, strided_kernel in (('torchvision', 3), ('caffe', 1)):
        strided = [k for k, strides in _conv_layers(variant, (False,) * 3) if strides == (2, 2)]
        # conv1 (7x7), then per stage 2..4 the strided block conv and the projection (1x1).
        assert strided == [7] + [strided_kernel, 1] * 3


def test_resnet_parameter_layout_per_variant():
    for variant, has_bias in (('torchvision', False), ('caffe', True)):
        c = make_config('fcn_resnet50', resnet_variant=variant)
        params = abstract_init(models.build_model(c), (1, 32, 32, 3))['params']
        p = paths(params['backbone'])
        assert {'conv1/kernel', 'bn1/scale', 'bn1/bias', 'layer4_2/conv3/kernel'} <= p
        assert {'layer3_0/downsample_conv/kernel', 'layer3_0/downsample_bn/scale'} <= p
        assert 'layer3_1/downsample_conv/kernel' not in p
        assert ('layer1_0/conv1/bias' in p) == has_bias
        assert ('conv1/bias' in p) == has_bias
        assert {k for k in p if k.startswith('layer3_')} >= {
            f'layer3_{i}/bn3/bias' for i in range(6)
        }
        assert paths(params['classifier']) == {
            'conv/kernel',
            'bn/scale',
            'bn/bias',
            'out/kernel',
            'out/bias',
        }  # noqa: E501


def test_resnet_batch_norm_epsilon_per_variant():
    printed = {
        v: str(float(np.float32(eps))) for v, eps in (('torchvision', 1e-5), ('caffe', 1.001e-5))
    }  # noqa: E501
    for variant in printed:
        module = ResNet(depth=50, variant=variant, width=TINY)
        x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
        v = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x)
        jaxpr = str(jax.make_jaxpr(functools.partial(module.apply, train=False))(v, x))
        assert {other for other, text in printed.items() if text in jaxpr} == {variant}


def test_encoder_unet_parameter_layout():
    blocks = {f'decoder/block{j}/{m}' for j in range(5) for m in ('conv1/kernel', 'conv2/kernel')}
    for name, center in (('unet_resnet50', False), ('unet_vgg16', True)):
        params = abstract_init(models.build_model(make_config(name)), (1, 32, 32, 3))['params']
        p = paths(params)
        assert blocks <= p and {'segmentation_head/kernel', 'segmentation_head/bias'} <= p
        assert ('decoder/center/conv1/kernel' in p) == center
        assert not any(k.startswith('decoder/block') and k.endswith('conv1/bias') for k in p)
        assert params['segmentation_head']['kernel'].shape == (3, 3, 1, 3)


def test_classic_unet_valid_is_the_paper_network():
    c = make_config('unet', width=1.0, num_classes=2, input_channels=1, padding='VALID')
    model = models.build_model(c)
    variables = abstract_init(model, (1, 572, 572, 1))
    assert count(variables['params']) == 31_030_658
    kernels = [x for x in jax.tree_util.tree_leaves(variables['params']) if x.ndim == 4]
    assert len(kernels) == 23
    assert abstract_apply(model, variables, (1, 572, 572, 1)).shape == (1, 388, 388, 2)
    p = paths(variables['params'])
    assert {'down1/conv1/kernel', 'down5/conv2/bias', 'up4/upconv/kernel', 'up1/conv2/kernel',
            'final_conv/kernel'} <= p  # fmt: skip


def test_classic_unet_uses_he_normal_init():
    c = make_config('unet', width=1.0, num_classes=2, input_channels=1)
    # Jitted: eager init compiles once per parameter shape (25 s at full width).
    init = jax.jit(functools.partial(models.build_model(c).init, train=False))
    params = init(jax.random.key(0), jnp.ones((1, 16, 16, 1)))['params']
    kernel = np.asarray(params['down4']['conv2']['kernel'])  # fan_in 3 * 3 * 512.
    assert abs(kernel.std() - np.sqrt(2 / (9 * 512))) < 0.02 * np.sqrt(2 / (9 * 512))
    assert not np.asarray(params['down4']['conv2']['bias']).any()


def test_valid_unet_size_helpers():
    assert unet.unet_output_size(572) == 388
    assert unet.unet_input_size(388) == 572
    assert unet.valid_unet_input_sizes(572) == (572,)
    assert unet.valid_unet_input_sizes(570) == (556, 572)
    assert unet.valid_unet_input_sizes(100) == (188,)
    assert unet.unet_output_size(188) == 4
    with pytest.raises(ValueError, match=r'570.*\(556, 572\)'):
        unet.unet_output_size(570)
    with pytest.raises(ValueError, match=r'\(388, 404\)'):
        unet.unet_input_size(390)


def test_valid_unet_rejects_bad_input_at_trace_time():
    model = models.build_model(make_config('unet', padding='VALID'))
    variables = abstract_init(model, (1, 188, 188, 3))
    with pytest.raises(ValueError, match=r'570.*\(556, 572\)'):
        abstract_apply(model, variables, (1, 570, 572, 3))


@pytest.mark.parametrize('name', NAMES)
def test_bfloat16_compute_keeps_float32_params(name):
    model = models.build_model(make_config(name, dtype='bfloat16'))
    variables = abstract_init(model, (1, 32, 32, 3))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype('float32')}
    out = abstract_apply(model, variables, (1, 32, 32, 3))
    assert out.dtype == jnp.float32
    # The compute really is bfloat16: every conv in the jaxpr runs on bfloat16 operands.
    jaxpr = jax.make_jaxpr(functools.partial(model.apply, train=False))(
        variables, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    )
    convs = jaxpr_eqns(jaxpr)
    assert convs and {v.aval.dtype for e in convs for v in e.invars} == {jnp.dtype(jnp.bfloat16)}


def test_bfloat16_runs():
    model = models.build_model(make_config('fcn8s_vgg16', dtype='bfloat16'))
    x = jnp.ones((2, 32, 40, 3))
    y = run(model, random_variables(model, x.shape), x, train=True)
    assert y.dtype == jnp.float32 and np.isfinite(np.asarray(y)).all()


@pytest.mark.parametrize(
    ('name', 'overrides'),
    [('unet', {'batch_norm': True}), ('unet_resnet50', {}), ('fcn8s_vgg16', {})],
)
def test_remat_changes_neither_names_nor_numbers(name, overrides):
    x = jax.random.normal(jax.random.key(0), (2, 32, 40, 3))
    results = []
    for remat in (False, True):
        model = models.build_model(make_config(name, remat=remat, **overrides))
        # Random (non-zero) scores too, so that every path carries a gradient.
        variables = random_variables(model, x.shape)

        def loss(params, model=model, variables=variables):
            out = run(model, {**variables, 'params': params}, x, train=True)
            return jnp.sum(out**2), out

        # One compilation gives both the output and the gradients.
        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
        results.append((variables, out, grads))
    (v0, y0, g0), (v1, y1, g1) = results
    assert jax.tree_util.tree_structure(v0) == jax.tree_util.tree_structure(v1)
    # XLA may fuse and order the rematerialised computation differently, so float32 sums
    # may round differently in the last bits; the functions are the same.
    np.testing.assert_allclose(y0, y1, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1), strict=True):
        # Gradients are sums of large terms; judge the rounding against the tensor's scale.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


def test_remat_survives_xla_cpu_common_subexpression_elimination():
    """The compiled gradient recomputes the rematerialised blocks instead of merging them.

    XLA:CPU drops `jax.checkpoint`'s optimisation barriers before CSE; without
    `recompute.keep_recomputation` the recomputed convolutions merge back into the forward
    pass and the compiled gradient has as many convolutions and products as without remat.
    """
    x = jnp.ones((2, 64, 64, 3))
    counts = []
    for remat in (False, True):
        model = ResNet(depth=50, width=1 / 16, remat=remat)
        variables = model.init(jax.random.key(0), x, train=False)

        def loss(params, model=model, variables=variables):
            features, _ = model.apply(
                {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
            )
            return jnp.sum(features[32] ** 2)

        hlo = jax.jit(jax.grad(loss)).lower(variables['params']).compile().as_text()
        counts.append(hlo.count(' convolution(') + hlo.count(' dot('))
    # 16 blocks recompute 3 convolutions / products each (4 with a projection).
    assert counts[1] >= counts[0] + 3 * 16, counts


def test_model_table_rows():
    base = default.get_config().model
    rows = {r['name']: r for r in models.model_table(base)}
    assert set(rows) == set(NAMES)
    assert rows['fcn8s_vgg16']['params'] == 134_362_751
    assert rows['fcn_resnet101']['params'] == 51_949_141
    assert rows['fcn32s_vgg16']['output_stride'] == 32
    assert rows['fcn_resnet50']['output_stride'] == 8
    assert 'Ronneberger' in rows['unet']['paper']
