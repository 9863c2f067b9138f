"""Winograd minimal filtering: equal to the direct convolution, forward and backward, and
taken by `convolutions.Conv` exactly where it should be."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_unet_jax.ops import convolutions, winograd

# (input height, width, dilation, padding): odd sizes leave partial tiles, dilation tiles
# each residue class, asymmetric padding shifts the tiles, VALID has none.
GEOMETRIES = [
    (9, 11, (1, 1), ((1, 1), (1, 1))),
    (10, 7, (2, 2), ((2, 2), (2, 2))),
    (13, 13, (4, 4), ((4, 4), (4, 4))),
    (12, 12, (1, 1), ((0, 0), (0, 0))),
    (8, 9, (1, 2), ((2, 0), (1, 3))),
]


def _direct(x, kernel, dilation, padding):
    dims = ('NHWC', 'HWIO', 'NHWC')
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        padding,
        rhs_dilation=dilation,
        dimension_numbers=dims,
        precision='highest',
    )


def _relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture
def transform_every_training_conv(monkeypatch):
    """Every channel count and map size takes the Winograd backward pass."""
    monkeypatch.setitem(winograd.MIN_HARMONIC_CHANNELS, 'training', 0)
    monkeypatch.setitem(winograd.MIN_MAP_POSITIONS, 'training', 0)


def _inputs(h, w, seed=0, channels=(5, 6)):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, h, w, channels[0])), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, *channels)), jnp.float32)
    return x, kernel


@pytest.mark.parametrize(('h', 'w', 'dilation', 'padding'), GEOMETRIES)
@pytest.mark.parametrize('tile_size', winograd.TILE_SIZES)
def test_minimal_filtering_equals_the_direct_convolution(h, w, dilation, padding, tile_size):
    x, kernel = _inputs(h, w)
    want = _direct(x, kernel, dilation, padding)
    got = winograd.minimal_filtering(x, kernel, dilation, padding, tile_size)
    assert got.shape == want.shape
    # F(2x2) rounds like the direct convolution, F(4x4) about 10x more.
    assert _relative_error(got, want) < (1e-6 if tile_size == 2 else 1e-5)


@pytest.mark.parametrize(('h', 'w', 'dilation', 'padding'), GEOMETRIES)
@pytest.mark.usefixtures('transform_every_training_conv')
def test_training_gradients_equal_the_direct_convolutions(h, w, dilation, padding):
    x, kernel = _inputs(h, w, seed=1)
    ours = functools.partial(winograd.conv3x3, dilation=dilation, padding=padding)
    direct = functools.partial(_direct, dilation=dilation, padding=padding)
    y, ours_vjp = jax.vjp(ours, x, kernel)
    want_y, direct_vjp = jax.vjp(direct, x, kernel)
    assert _relative_error(y, want_y) < 1e-6  # F(2x2) when differentiated.
    cotangent = jnp.asarray(np.random.default_rng(2).normal(size=y.shape), jnp.float32)
    for got, want in zip(ours_vjp(cotangent), direct_vjp(cotangent), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert _relative_error(got, want) < 1e-6
    # The jitted gradient really is the transformed one: products per transform point.
    gradient = jax.jit(lambda x, k: jax.vjp(ours, x, k)[1](cotangent))
    assert 'convolution' not in gradient.lower(x, kernel).as_text()


@pytest.mark.parametrize('tile_size', winograd.TILE_SIZES)
@pytest.mark.usefixtures('transform_every_training_conv')
def test_wide_inputs_are_transformed_a_slice_of_channels_at_a_time(tile_size, monkeypatch):
    x, kernel = _inputs(10, 9, seed=3, channels=(7, 4))
    dilation, padding = (1, 1), ((1, 1), (1, 1))
    geometry = winograd._geometry(x.shape, dilation, padding, tile_size)
    whole = winograd._channel_slices(x.shape, geometry)
    assert whole == [slice(0, 7)]
    # Room for three channels' transformed inputs: slices of 3, 3 and 1 channels.
    per_channel = geometry.alpha**2 * 2 * np.prod(geometry.tiles) * 4
    monkeypatch.setattr(winograd, '_MAX_TRANSFORMED_BYTES', 3 * per_channel)
    assert winograd._channel_slices(x.shape, geometry) == [
        slice(0, 3),
        slice(3, 6),
        slice(6, 7),
    ]
    want = _direct(x, kernel, dilation, padding)
    got = winograd.minimal_filtering(x, kernel, dilation, padding, tile_size)
    assert _relative_error(got, want) < (1e-6 if tile_size == 2 else 1e-5)
    ours = functools.partial(winograd.conv3x3, dilation=dilation, padding=padding)
    cotangent = jnp.asarray(np.random.default_rng(4).normal(size=want.shape), jnp.float32)
    got_grads = jax.vjp(ours, x, kernel)[1](cotangent)
    want_grads = jax.vjp(functools.partial(_direct, dilation=dilation, padding=padding), x, kernel)[
        1
    ](cotangent)
    for got, expected in zip(got_grads, want_grads, strict=True):
        assert got.shape == expected.shape
        assert _relative_error(got, expected) < 1e-6


@pytest.mark.parametrize(
    ('channels', 'min_positions'),
    [((192, 96), 0), ((512, 512), None)],  # Too narrow; on too small a map (9 x 11).
)
def test_other_convolutions_train_through_the_direct_gradient(channels, min_positions, monkeypatch):
    if min_positions is not None:
        monkeypatch.setitem(winograd.MIN_MAP_POSITIONS, 'training', min_positions)
    x, kernel = _inputs(9, 11, channels=channels)
    assert not winograd.pays(*channels, (9, 11), 'training')
    conv = functools.partial(winograd.conv3x3, dilation=(1, 1), padding=((1, 1), (1, 1)))
    grad = jax.grad(lambda x, k: conv(x, k).sum(), argnums=(0, 1))
    jaxpr = str(jax.make_jaxpr(grad)(x, kernel))
    assert 'conv_general_dilated' in jaxpr
    want = jax.grad(lambda x, k: _direct(x, k, (1, 1), ((1, 1), (1, 1))).sum(), argnums=(0, 1))(
        x, kernel
    )
    for got, expected in zip(grad(x, kernel), want, strict=True):
        assert _relative_error(got, expected) < 1e-5


def test_pays_thresholds():
    assert not winograd.pays(128, 32, (160, 160))  # U-Net decoder: slower transformed.
    assert winograd.pays(384, 64, (80, 80)) and winograd.pays(256, 256, (24, 24))
    assert not winograd.pays(512, 512, (20, 20))  # Too few tiles to amortise the transforms.
    assert winograd.pays(2048, 512, (40, 40), 'training')
    assert winograd.pays(512, 512, (40, 40), 'training')
    assert not winograd.pays(256, 256, (80, 80), 'training')
    # The bottom of a U-Net at 320 px: faster, but its memory lands on the step's peak.
    assert not winograd.pays(512, 512, (20, 20), 'training')
    assert not winograd.pays(3072, 256, (39, 40), 'training')
    with pytest.raises(ValueError, match="'train'"):
        winograd.pays(256, 256, (40, 40), 'train')


def test_inference_tile_size_avoids_padded_tiles():
    padding = ((1, 1), (1, 1))
    assert winograd.inference_tile_size((4, 40, 40, 8), (1, 1), padding) == 4
    # Dilation 4 on 40 x 40: F(4x4) tiles cover 48 x 48 per residue grid, F(2x2) 40 x 40.
    assert winograd.inference_tile_size((4, 40, 40, 8), (4, 4), ((4, 4), (4, 4))) == 2
    with pytest.raises(ValueError, match='tile size'):
        winograd.minimal_filtering(*_inputs(8, 8), (1, 1), padding, tile_size=3)


def _conv_jaxpr(conv, x):
    variables = jax.eval_shape(conv.init, jax.random.key(0), x)
    return str(jax.make_jaxpr(conv.apply)(variables, x))


@pytest.mark.parametrize(
    ('channels', 'side', 'kwargs', 'transformed'),
    [
        ((128, 128), 24, {}, True),
        ((128, 128), 24, {'kernel_dilation': 2}, True),
        ((128, 32), 24, {}, False),  # Too few channels to pay.
        ((128, 128), 23, {}, False),  # Too small a map.
        ((128, 128), 48, {'strides': 2}, False),
        ((128, 128), 24, {'dtype': jnp.bfloat16}, False),
    ],
)
def test_conv_takes_winograd_on_cpu_where_it_pays(channels, side, kwargs, transformed):
    x = jax.ShapeDtypeStruct((1, side, side, channels[0]), jnp.float32)
    conv = convolutions.Conv(channels[1], (3, 3), padding='SAME', **kwargs)
    jaxpr = _conv_jaxpr(conv, x)
    assert ('name=conv3x3' in jaxpr) == transformed
    assert ('name=conv2d' in jaxpr) != transformed


@pytest.mark.usefixtures('transform_every_training_conv')
def test_other_platforms_convolve_directly_forward_and_backward():
    x, kernel = _inputs(12, 12, channels=(256, 256))
    conv = functools.partial(winograd.conv3x3, dilation=(1, 1), padding=((1, 1), (1, 1)))

    def lowered(f, *args, platform):
        return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()

    def train(x, k):
        return jax.grad(lambda x, k: conv(x, k).sum(), argnums=(0, 1))(x, k)

    wide_x, wide_kernel = _inputs(12, 12, channels=(512, 512))
    for f, args in ((conv, (x, kernel)), (train, (wide_x, wide_kernel))):
        on_gpu = lowered(f, *args, platform='cuda')
        assert 'convolution' in on_gpu and 'dot_general' not in on_gpu
        on_cpu = lowered(f, *args, platform='cpu')
        assert 'dot_general' in on_cpu and 'convolution' not in on_cpu


def test_conv_with_winograd_equals_flax_conv():
    x, _ = _inputs(25, 26, channels=(128, 128))
    ours = convolutions.Conv(128, (3, 3), padding='SAME', kernel_dilation=2)
    reference = nn.Conv(128, (3, 3), padding='SAME', kernel_dilation=2)
    variables = ours.init(jax.random.key(0), x)
    assert 'name=conv3x3' in str(jax.make_jaxpr(ours.apply)(variables, x))
    y = jax.jit(ours.apply)(variables, x)
    assert _relative_error(y, jax.jit(reference.apply)(variables, x)) < 1e-5
