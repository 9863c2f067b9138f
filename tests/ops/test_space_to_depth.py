"""Thin 3x3 convolutions over 2x2 pixel blocks: equal to the direct convolution, forward and
backward, and taken by `convolutions.Conv` on CPU exactly where they pay."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_unet_jax.ops import convolutions, space_to_depth
from tests.ops import helpers

# (input height, width, padding): even and odd sizes, one pixel of padding, none (VALID),
# the FCN's 100 on conv1_1, and asymmetric padding that both pads and crops.
GEOMETRIES = [
    (12, 12, ((1, 1), (1, 1))),
    (11, 13, ((1, 1), (1, 1))),
    (12, 12, ((0, 0), (0, 0))),
    (9, 10, ((100, 100), (100, 100))),
    (10, 9, ((2, 0), (0, 3))),
    (7, 7, ((0, 1), (1, 0))),
]


def _direct(x, kernel, padding):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision='highest',
    )


def _inputs(h, w, channels=(3, 4), seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, h, w, channels[0])), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, *channels)), jnp.float32)
    return x, kernel


def _relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_blocks_round_trip_and_order_their_channels_by_phase():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    blocks = space_to_depth.to_blocks(x)
    assert blocks.shape == (2, 2, 3, 12)
    # Block (1, 2), row phase 1, column phase 0, channel 2: pixel (3, 4), channel 2.
    assert blocks[1, 1, 2, (1 * 2 + 0) * 3 + 2] == x[1, 3, 4, 2]
    np.testing.assert_array_equal(space_to_depth.from_blocks(blocks), x)


def test_block_kernel_places_each_tap_once_per_phase_pair_it_connects():
    kernel = jnp.arange(1, 10, dtype=jnp.float32).reshape(3, 3, 1, 1)
    blocks = np.asarray(space_to_depth.block_kernel(kernel)).reshape(3, 3, 2, 2, 2, 2)
    # [block row, block col, in row phase, in col phase, out row phase, out col phase].
    # Output phase (0, 0) reads its own block's pixel (0, 0) through the centre tap...
    assert blocks[1, 1, 0, 0, 0, 0] == kernel[1, 1, 0, 0]
    # ... and the block above-left's pixel (1, 1) through the top-left tap.
    assert blocks[0, 0, 1, 1, 0, 0] == kernel[0, 0, 0, 0]
    # Output phase (1, 1) never reaches the block above-left.
    assert not blocks[0, 0, :, :, 1, 1].any()
    # Every output phase sees each of the 9 taps exactly once.
    for a in range(2):
        for b in range(2):
            taps = blocks[:, :, :, :, a, b]
            assert sorted(taps[taps != 0].tolist()) == list(range(1, 10))


@pytest.mark.parametrize(('h', 'w', 'padding'), GEOMETRIES)
def test_block_convolution_equals_the_direct_convolution(h, w, padding):
    x, kernel = _inputs(h, w)
    ours = space_to_depth.conv3x3(x, kernel, padding, precision='highest')
    assert _relative_error(ours, _direct(x, kernel, padding)) < 1e-5


@pytest.mark.parametrize(('h', 'w', 'padding'), GEOMETRIES)
def test_gradients_equal_the_direct_convolutions(h, w, padding):
    x, kernel = _inputs(h, w, channels=(4, 8), seed=1)
    dy = jnp.asarray(
        np.random.default_rng(2).normal(size=_direct(x, kernel, padding).shape), jnp.float32
    )

    def grads(conv):
        return jax.grad(lambda x, k: jnp.vdot(conv(x, k), dy), argnums=(0, 1))(x, kernel)

    ours = grads(lambda x, k: space_to_depth.conv3x3(x, k, padding, precision='highest'))
    reference = grads(lambda x, k: _direct(x, k, padding))
    for got, expected in zip(ours, reference, strict=True):
        assert _relative_error(got, expected) < 1e-5


def test_pays_thresholds():
    big = (326, 326)
    assert space_to_depth.pays(3, 4, big) and space_to_depth.pays(4, 8, big)
    assert not space_to_depth.pays(8, 8, big)  # Wide enough for the direct convolution.
    assert not space_to_depth.pays(3, 64, big)
    assert space_to_depth.pays(4, 4, (64, 64))
    assert not space_to_depth.pays(4, 4, (63, 64))  # Too small a map.


def _block_convs(conv, x, platform):
    """The convolutions of `conv`'s train step on `platform` whose kernels have 4x the
    input channels of `x` (the block form)."""
    variables = conv.init(jax.random.key(0), x)

    def train(params, x):
        return jax.grad(lambda p, x: conv.apply({'params': p}, x).sum(), argnums=(0, 1))(params, x)

    jaxpr = jax.make_jaxpr(train)(variables['params'], x)
    eqns = helpers.jaxpr_eqns(jaxpr, platform=platform)
    channels = x.shape[-1]
    return [
        e for e in eqns if 4 * channels in (e.invars[1].aval.shape[2], e.invars[0].aval.shape[3])
    ]


@pytest.mark.parametrize(
    ('channels', 'side', 'kwargs', 'on_blocks'),
    [
        ((4, 4), 64, {}, True),
        ((3, 8), 64, {'padding': ((100, 100), (100, 100))}, True),
        ((8, 8), 64, {}, False),  # Wide enough.
        ((4, 4), 62, {}, False),  # Too small a map.
        ((4, 4), 64, {'strides': 2}, False),
        ((4, 4), 64, {'kernel_dilation': 2}, False),
        ((4, 4), 64, {'dtype': jnp.bfloat16}, False),
    ],
)
def test_conv_takes_the_blocks_on_cpu_where_they_pay(channels, side, kwargs, on_blocks):
    x = jnp.zeros((1, side, side, channels[0]), jnp.float32)
    kwargs = {'padding': 'SAME'} | kwargs
    conv = convolutions.Conv(channels[1], (3, 3), **kwargs)
    assert bool(_block_convs(conv, x, 'cpu')) == on_blocks
    # Other platforms convolve directly, forward and backward.
    assert not _block_convs(conv, x, 'cuda')


def test_conv_on_blocks_equals_flax_conv_and_its_gradients():
    x, _ = _inputs(65, 66, channels=(3, 8))
    padding = ((100, 100), (100, 100))
    ours = convolutions.Conv(8, (3, 3), padding=padding, precision='highest')
    reference = nn.Conv(8, (3, 3), padding=padding, precision='highest')
    variables = ours.init(jax.random.key(0), x)
    assert _block_convs(ours, x, 'cpu')

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply({'params': p}, x)))

    for got, expected in (
        (jax.jit(ours.apply)(variables, x), jax.jit(reference.apply)(variables, x)),
        *zip(
            jax.tree.leaves(jax.grad(loss(ours), argnums=(0, 1))(variables['params'], x)),
            jax.tree.leaves(jax.grad(loss(reference), argnums=(0, 1))(variables['params'], x)),
            strict=True,
        ),
    ):
        assert _relative_error(got, expected) < 1e-5
