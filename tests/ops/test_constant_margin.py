"""`ops.constant_margin`: the FCN stem without the constant middle of its padding is the same
function (values and gradients) as the plain stem, on CPU only, and its cut is the largest
that stays exact."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_unet_jax import ops
from fcn_unet_jax.models import vgg
from fcn_unet_jax.ops import constant_margin, nhwc, pooling

CONVS = (2, 2, 3)  # VGG16's blocks 1 to 3.
PAD = 100


def _random_params(seed=0, channels=(3, 2, 2, 2, 2, 2, 2, 2)):
    """Kernels and non-zero biases: with zero biases the margin would be 0 in every map,
    and a wrongly placed margin column would go unnoticed."""
    rng = np.random.default_rng(seed)
    return [
        (
            jnp.asarray(rng.normal(0, 0.4, (3, 3, cin, cout)), jnp.float32),
            jnp.asarray(rng.normal(0, 0.5, (cout,)), jnp.float32),
        )
        for cin, cout in zip(channels[:-1], channels[1:], strict=True)
    ]


def _block(b, x, params, padding):
    """A thin VGG block (3x3 convs + bias + ReLU, 2x2 ceil-mode pooling) on `params`."""
    first = sum(CONVS[:b])
    for i in range(CONVS[b]):
        kernel, bias = params[first + i]
        pad = padding if (b, i) == (0, 0) else ((1, 1), (1, 1))
        x = jax.nn.relu(nhwc.lax_conv(x, kernel, (1, 1), pad) + bias)
    return pooling.max_pool_2x2(x, ceil_mode=True)


def _stem(images, params):
    return constant_margin.stem_with_constant_margin(_block, images, params, PAD, CONVS)


def _plain_stem(images, params):
    with ops.plain_ops():
        return _stem(images, params)


def _images(height, width, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(2, height, width, 3)), jnp.float32)


def _assert_same_function(images, params, tol=1e-5):
    """Equal outputs (up to `tol`) and equal gradients for one random cotangent."""
    got, vjp = jax.vjp(_stem, images, params)
    want, plain_vjp = jax.vjp(_plain_stem, images, params)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    rng = np.random.default_rng(2)
    cotangent = [jnp.asarray(rng.normal(size=w.shape), jnp.float32) for w in want]
    got_grads = jax.tree_util.tree_leaves(vjp(cotangent))
    want_grads = jax.tree_util.tree_leaves(plain_vjp(cotangent))
    for g, w in zip(got_grads, want_grads, strict=True):
        # The gradients sum up to 10^5 terms of about 1 (a margin column's once for all its
        # repeats): float32 rounding reaches 1e-4, a misplaced column would be off by ~1.
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3)


def test_plan_for_fcn_padding():
    """FCN's pad of 100 leaves constant gaps of 47, 21 and 7 positions after pools 1 to 3."""
    plan = constant_margin.plan_axis(128, PAD, CONVS)
    assert [(e.length, e.left_gap, e.right_gap) for e in plan.extents] == [
        (163, 47, 47),
        (82, 21, 21),
        (41, 7, 7),
    ]
    assert plan.cut == ((92, 92), (40, 40), (12, 12))
    # An odd length: the pool's lone last column moves the right side's bands.
    assert constant_margin.plan_axis(33, PAD, CONVS).cut == ((92, 94), (40, 40), (12, 12))
    # Nothing to trim without padding.
    assert not constant_margin.plan_axis(64, 1, CONVS).trims


@pytest.mark.parametrize(
    ('height', 'width'), [(1, 1), (2, 7), (9, 8), (32, 33), (64, 40), (65, 128)]
)
def test_trimmed_stem_is_the_plain_stem(height, width):
    _assert_same_function(_images(height, width), _random_params())


def _widened(plan, level, side):
    cut = [list(c) for c in plan.cut]
    cut[level][side] += 4
    return dataclasses.replace(plan, cut=tuple(tuple(c) for c in cut))


@pytest.mark.parametrize('level', [0, 1, 2])
@pytest.mark.parametrize('side', [0, 1])
def test_a_deeper_cut_is_not_exact(monkeypatch, level, side):
    """Cutting four positions more at any level and side changes the result: the plan is
    within two positions of the largest exact cut (its bands are conservative by up to one
    pooled position), and the test above catches a plan that cuts into a band."""
    plan_axis = constant_margin.plan_axis
    monkeypatch.setattr(
        constant_margin,
        'plan_axis',
        lambda size, pad, convs: _widened(plan_axis(size, pad, convs), level, side),
    )
    images, params = _images(40, 40), _random_params()
    got, want = _stem(images, params), _plain_stem(images, params)
    assert any(not np.allclose(g, w, rtol=1e-4, atol=1e-4) for g, w in zip(got, want, strict=True))


def _conv_sides(text):
    """Every dimension of the tensors the convolutions of a StableHLO module read and write."""
    sides = set()
    for line in text.splitlines():
        if 'stablehlo.convolution' in line:
            for shape in re.findall(r'tensor<([\dx]+)xf32>', line):
                sides.update(int(d) for d in shape.split('x'))
    return sides


def test_fcn_vgg16_trims_on_cpu_only():
    """The FCN form's train-time gradient convolves a 144 px canvas (not 328) on CPU, and
    the full canvas in a program lowered for a TPU or GPU or under `plain_ops`; the
    values and gradients are the plain model's."""
    model = vgg.VGG16(width=1 / 16, fcn=True)
    images = _images(128, 128)
    variables = model.init(jax.random.key(0), images, train=False)
    # Non-zero biases, so that the margin is not all zeros.
    variables = jax.tree_util.tree_map(
        lambda v: v + 0.1 * jax.random.normal(jax.random.key(1), v.shape), variables
    )

    def loss(variables, plain=False):
        with ops.plain_ops(plain):
            features = model.apply(variables, images, train=False)
        return sum(jnp.sum(f * (i + 1)) for i, f in enumerate(features.values()))

    step = jax.jit(jax.grad(loss), static_argnums=1)
    # conv1_1's output: 142 x 142 trimmed, 326 x 326 in full.
    assert 'x142x142x' in step.lower(variables).as_text()
    assert 'x142x142x' not in step.lower(variables, True).as_text()
    for platform in ('tpu', 'cuda'):
        sides = _conv_sides(step.trace(variables).lower(lowering_platforms=(platform,)).as_text())
        assert 326 in sides and 142 not in sides, platform

    got, want = step(variables), step(variables, True)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * (float(jnp.abs(w).max()) + 1))
