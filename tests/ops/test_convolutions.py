"""`ops.convolutions` and `ops.kernel_gradient` against flax and XLA's own convolutions.

Every layer and function must compute its flax / `lax` counterpart's function, forward and
backward, with the same parameters; structural tests check that each rewrite is taken
where it should be (matrix products, phase-wise gradients, swapped kernel gradients).
"""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_unet_jax.ops import convolutions, kernel_gradient, upsampling
from tests.ops.helpers import jaxpr_eqns

pytestmark = pytest.mark.usefixtures('fast_compiles')


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
        # VALID with an output far smaller than the input (FCN's fc6): the tap-wise input
        # gradient, on a square and a non-square map.
        (7, (1, 1), ((0, 0), (0, 0)), (1, 1), (11, 11), (3, 5)),
        (7, (1, 1), ((0, 0), (0, 0)), (1, 1), (9, 13), (3, 5)),
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
    # than that of a VALID convolution of the padded input (`ops/kernel_gradient.py`).
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
            upsampling.upsample_nearest2x(x),
            kernel,
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        )

    want = reference(x, kernel)
    got = upsampling.conv3x3_of_upsampled(x, kernel)
    assert got.shape == want.shape == (2, 2 * size[0], 2 * size[1], 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    cotangent = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    for a, b in zip(
        jax.vjp(upsampling.conv3x3_of_upsampled, x, kernel)[1](cotangent),
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
        up = upsampling.upsample_nearest2x(x)
        return up if skip is None else jnp.concatenate([up, skip], axis=-1)

    kwargs = {'dtype': dtype, 'param_dtype': jnp.float32}
    ref = convolutions.Conv(7, (3, 3), padding=((1, 1), (1, 1)), **kwargs)
    ours = upsampling.UpsampledConcatConv(7, (3, 3), **kwargs)
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
    conv = upsampling.UpsampledConcatConv(4, (3, 3))
    with pytest.raises(ValueError, match=r'twice the height and width.*\(3, 5\).*\(6, 9\)'):
        conv.init(jax.random.key(0), jnp.zeros((1, 3, 5, 2)), jnp.zeros((1, 6, 9, 2)))


def _gradient_jaxpr(conv, x_shape):
    """The jaxpr of the gradient of `conv`'s output sum (parameters and input)."""
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    variables = jax.eval_shape(conv.init, jax.random.key(0), x)
    grad = jax.grad(lambda v, x: conv.apply(v, x).sum(), argnums=(0, 1))
    return jax.make_jaxpr(grad)(variables, x)


@pytest.mark.parametrize('strides', [(2, 2), (2, 1)])
def test_strided_conv_takes_the_phasewise_input_gradient(strides):
    shape = (1, 32, 32, 32)
    unstrided = _gradient_jaxpr(convolutions.Conv(32, (3, 3), padding='SAME'), shape)
    strided = _gradient_jaxpr(convolutions.Conv(32, (3, 3), strides, padding='SAME'), shape)
    # On CPU the input gradient convolves each of the stride's phases with its own taps, a
    # part of the 3x3 kernel; elsewhere, and for stride 1, it is XLA's.

    def phase_convs(jaxpr, platform='cpu'):
        kernels = [e.invars[1].aval.shape[:2] for e in jaxpr_eqns(jaxpr, platform=platform)]
        return [k for k in kernels if max(k) <= 3 and k != (3, 3)]

    assert len(phase_convs(strided)) == strides[0] * strides[1]
    assert not phase_convs(strided, 'tpu') and not phase_convs(unstrided)


@pytest.mark.parametrize(
    ('size', 'padding', 'by_taps'),
    [
        (11, 'VALID', True),  # fc6 at the FCN's smallest map: 5 x 5 of 11 x 11 positions.
        (22, 'VALID', False),  # 16 x 16 of 22 x 22: more than half the positions.
        (11, 'SAME', False),
    ],
)
def test_small_valid_outputs_take_the_tapwise_input_gradient(size, padding, by_taps):
    conv = convolutions.Conv(8, (7, 7), padding=padding)
    x = jax.ShapeDtypeStruct((1, size, size, 4), jnp.float32)
    variables = jax.eval_shape(conv.init, jax.random.key(0), x)

    def input_grad(variables, x):
        return jax.grad(lambda x: conv.apply(variables, x).sum())(x)

    jaxpr = jax.make_jaxpr(input_grad)(variables, x)
    # The tap-wise gradient is a product of the output gradient with all 7 x 7 taps.
    taps_products = [
        e
        for e in jaxpr_eqns(jaxpr, ('dot_general',))
        if 7 in e.outvars[0].aval.shape and e.outvars[0].aval.ndim >= 5
    ]
    assert bool(taps_products) == by_taps
    assert not jaxpr_eqns(jaxpr, ('dot_general',), platform='tpu')
    # Either way, it is the input gradient of the convolution.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    params = conv.init(jax.random.key(0), x)
    ours = jax.grad(lambda x: jnp.sum(jnp.sin(conv.apply(params, x))))(x)
    flax_conv = flax.linen.Conv(8, (7, 7), padding=padding)
    want = jax.grad(lambda x: jnp.sum(jnp.sin(flax_conv.apply(params, x))))(x)
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4)


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
    """The flax reference for `convolutions.Conv`'s pointwise path."""
    return flax.linen.Conv(features, (1, 1), **kwargs)


@pytest.mark.parametrize('padding', ['SAME', 'VALID'])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_block_conv_transpose_equals_nn_conv_transpose(padding, dtype):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 7, 3)), jnp.float32)
    kwargs = {'strides': (2, 2), 'padding': padding, 'dtype': dtype}
    ref = flax.linen.ConvTranspose(4, (2, 2), **kwargs)
    ours = upsampling.ConvTranspose(4, (2, 2), **kwargs)
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
        upsampling.upsample_transposed(x, kernel, factor), reference(x, kernel), 1e-5, 1e-5
    )
    cotangent = jnp.asarray(rng.normal(size=(2, 6 * factor, 5 * factor, 6)), jnp.float32)
    for grad_ours, grad_ref in zip(
        jax.vjp(functools.partial(upsampling.upsample_transposed, factor=factor), x, kernel)[1](
            cotangent
        ),
        jax.vjp(reference, x, kernel)[1](cotangent),
        strict=True,
    ):
        np.testing.assert_allclose(grad_ours, grad_ref, rtol=1e-4, atol=1e-4)
