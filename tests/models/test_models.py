"""Tests of the model zoo: registry, shapes, parameter counts and layouts, paper details.

Real compute runs jitted at width 1/16 on small inputs; full-size shapes and exact
parameter counts use `jax.eval_shape`, which allocates nothing. The ops the models call
are tested against flax / XLA in tests/ops/.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from fcn_unet_jax import models
from fcn_unet_jax.models import fcn, layers, unet
from fcn_unet_jax.models.resnet import ResNet
from tests.models.helpers import (
    TINY,
    abstract_apply,
    abstract_init,
    count,
    make_config,
    paths,
    random_variables,
    real_init,
    run,
)
from tests.ops.helpers import jaxpr_eqns

NAMES = list(models.MODELS)


pytestmark = pytest.mark.usefixtures('fast_compiles')


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
        # Only the classic U-Net has the switch; the others would silently ignore it.
        ('fcn8s_vgg16', {'batch_norm': True}, 'batch_norm'),
        ('unet_resnet50', {'batch_norm': True}, 'batch_norm'),
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


def test_resnet_pointwise_convs_run_as_matrix_products_on_cpu_only():
    # On CPU the 1x1 convs (3 of the 4 convs with a projection) must not reach XLA as
    # convolutions: only the stem and the 3x3 convs remain. On GPUs the plain convs run.
    model = ResNet(depth=50, width=1 / 16)
    x = jnp.zeros((1, 64, 64, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    traced = jax.jit(functools.partial(model.apply, train=False)).trace(variables, x)
    cpu = traced.lower(lowering_platforms=('cpu',)).as_text()
    assert cpu.count('stablehlo.convolution') == 1 + 16  # Stem + one 3x3 per block.
    assert cpu.count('stablehlo.dot_general') == 16 * 2 + 4  # conv1 + conv3 per block, 4 proj.
    cuda = traced.lower(lowering_platforms=('cuda',)).as_text()
    assert cuda.count('stablehlo.convolution') == 1 + 16 * 3 + 4
    assert cuda.count('stablehlo.dot_general') == 0


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


def test_model_table_rows():
    base = default.get_config().model
    rows = {r['name']: r for r in models.model_table(base)}
    assert set(rows) == set(NAMES)
    assert rows['fcn8s_vgg16']['params'] == 134_362_751
    assert rows['fcn_resnet101']['params'] == 51_949_141
    assert rows['fcn32s_vgg16']['output_stride'] == 32
    assert rows['fcn_resnet50']['output_stride'] == 8
    assert 'Ronneberger' in rows['unet']['paper']
