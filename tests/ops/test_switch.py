"""`ops.plain_ops`: inside the switch every op is the plain Flax/XLA op, outside the tuned one.

Where the plain op is literally flax's or XLA's, the traced programs must be identical
(the gradient's included); elsewhere (BatchNorm, UpsampledConcatConv) the values and
gradients must equal the reference's. Per-model checks are in
tests/models/test_plain_ops.py.

Each trace here differentiates or traces a new function object: JAX caches traces by
function, so a function traced once is not traced again when the switch changes (which
`ops.switch` documents).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_unet_jax import ops

pytestmark = pytest.mark.usefixtures('fast_compiles')

# Primitives only the tuned ops bring: custom gradients, CPU-only branches
# (`lax.platform_dependent`) and the random draws of the fusion barriers. (A gradient's
# jaxpr holds the custom gradient's rules inline; a forward pass's names it.)
TUNED_ONLY = ('custom_vjp_call', 'platform_index', 'rng_uniform')


def _inputs(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _loss_of_module(module, x):
    """sin-weighted sum of the module's output, as a function of (variables, input)."""

    def loss(variables, x):
        y = module.apply(variables, x, mutable=['batch_stats'])[0]
        return jnp.sum(jnp.sin(y))

    return loss


def _gradient_jaxpr(loss, *args) -> str:
    return str(jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(len(args)))))(*args))


def _has_tuned_primitives(jaxpr) -> bool:
    return any(primitive in str(jaxpr) for primitive in TUNED_ONLY)


def test_the_switch_is_a_context():
    assert not ops.uses_plain_ops()
    with ops.plain_ops():
        assert ops.uses_plain_ops()
        with ops.plain_ops(False):  # A model whose field is False keeps the user's choice.
            assert ops.uses_plain_ops()
    with ops.plain_ops(False):
        assert not ops.uses_plain_ops()
    with pytest.raises(RuntimeError), ops.plain_ops():
        raise RuntimeError
    assert not ops.uses_plain_ops()


@pytest.mark.parametrize(
    ('ours', 'reference', 'shape'),
    [
        pytest.param(ops.Conv(8, (1, 1)), nn.Conv(8, (1, 1)), (2, 6, 6, 5), id='conv1x1'),
        pytest.param(
            ops.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))),
            nn.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))),
            (2, 7, 6, 5),
            id='conv3x3_strided',
        ),
        pytest.param(
            ops.Conv(8, (3, 3), padding=((2, 2), (2, 2)), kernel_dilation=(2, 2)),
            nn.Conv(8, (3, 3), padding=((2, 2), (2, 2)), kernel_dilation=(2, 2)),
            (2, 7, 6, 5),
            id='conv3x3_dilated',
        ),
        pytest.param(
            ops.ConvTranspose(4, (2, 2), strides=(2, 2)),
            nn.ConvTranspose(4, (2, 2), strides=(2, 2)),
            (2, 5, 7, 3),
            id='conv_transpose',
        ),
    ],
)
def test_plain_layers_are_flax_layers(ours, reference, shape):
    x = _inputs(shape)
    variables = reference.init(jax.random.key(0), x)
    tuned = _gradient_jaxpr(_loss_of_module(ours, x), variables, x)
    with ops.plain_ops():
        plain = _gradient_jaxpr(_loss_of_module(ours, x), variables, x)
        assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
            jnp.shape, variables
        )
    assert plain == _gradient_jaxpr(_loss_of_module(reference, x), variables, x)
    assert plain != tuned


def test_plain_pooling_and_upsampling_are_xlas_own():
    x = _inputs((2, 7, 9, 3))
    kernel = _inputs((8, 8, 3, 3), seed=1)

    def pooled(x):
        return jnp.sum(jnp.sin(ops.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))))

    def upsampled(x, kernel):
        return jnp.sum(jnp.sin(ops.upsample_transposed(x, kernel, 4)))

    def pooled_by_flax(x):
        return jnp.sum(jnp.sin(nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))))

    def upsampled_by_xla(x, kernel):
        dims = ('NHWC', 'HWIO', 'NHWC')
        y = jax.lax.conv_transpose(
            x, kernel, (4, 4), 'VALID', dimension_numbers=dims, transpose_kernel=True
        )
        return jnp.sum(jnp.sin(y))

    tuned = [_gradient_jaxpr(pooled, x), _gradient_jaxpr(upsampled, x, kernel)]
    with ops.plain_ops():
        plain = [_gradient_jaxpr(pooled, x), _gradient_jaxpr(upsampled, x, kernel)]
    assert plain[0] == _gradient_jaxpr(pooled_by_flax, x)
    assert plain[1] == _gradient_jaxpr(upsampled_by_xla, x, kernel)
    assert plain[0] != tuned[0] and plain[1] != tuned[1]


def test_plain_fusion_controls_are_the_identity():
    x = _inputs((2, 4, 4, 3))

    def steered(x):
        return ops.keep_recomputation(ops.materialize(x))

    assert _has_tuned_primitives(jax.make_jaxpr(steered)(x))
    with ops.plain_ops():
        assert not jax.make_jaxpr(lambda x: steered(x))(x).eqns
        np.testing.assert_array_equal(steered(x), x)


def test_plain_batch_norm_is_flaxs_function_differentiated_by_jax():
    x = _inputs((3, 5, 7, 6)) * 2 + 1
    ours = ops.BatchNorm(use_running_average=False)
    reference = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    variables = reference.init(jax.random.key(0), x)
    variables = {**variables, 'params': {'scale': _inputs((6,), 1), 'bias': _inputs((6,), 2)}}

    def forward(variables, x):
        return ours.apply(variables, x, mutable=['batch_stats'])

    assert _has_tuned_primitives(jax.make_jaxpr(forward)(variables, x))
    with ops.plain_ops():
        assert not _has_tuned_primitives(jax.make_jaxpr(lambda *a: forward(*a))(variables, x))
        y, updates = forward(variables, x)
        grads = jax.grad(_loss_of_module(ours, x), argnums=(0, 1))(variables, x)
    y_ref, updates_ref = reference.apply(variables, x, mutable=['batch_stats'])
    grads_ref = jax.grad(_loss_of_module(reference, x), argnums=(0, 1))(variables, x)
    # The same operations in the same order as flax's: equal up to the last bit or two.
    for got, want in ((y, y_ref), (updates, updates_ref), (grads, grads_ref)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('skip_channels', [0, 4])
def test_plain_upsampled_concat_conv_is_the_conv_of_the_concatenation(skip_channels):
    x = _inputs((2, 3, 5, 6))
    skip = _inputs((2, 6, 10, skip_channels), seed=1) if skip_channels else None
    ours = ops.UpsampledConcatConv(7, (3, 3))
    reference = nn.Conv(7, (3, 3), padding=((1, 1), (1, 1)))

    def merged(x, skip):
        up = ops.upsample_nearest2x(x)
        return up if skip is None else jnp.concatenate([up, skip], axis=-1)

    variables = reference.init(jax.random.key(0), merged(x, skip))
    variables = {'params': {**variables['params'], 'bias': jnp.arange(7.0)}}

    def loss(variables, x, skip):
        return jnp.sum(jnp.sin(ours.apply(variables, x, skip)))

    def loss_ref(variables, x, skip):
        return jnp.sum(jnp.sin(reference.apply(variables, merged(x, skip))))

    assert _has_tuned_primitives(jax.make_jaxpr(loss)(variables, x, skip))
    with ops.plain_ops():
        jaxpr = str(jax.make_jaxpr(lambda *a: loss(*a))(variables, x, skip))
        got = jax.value_and_grad(loss, argnums=(0, 1, 2))(variables, x, skip)
    assert 'concatenate' in jaxpr or skip is None
    assert not _has_tuned_primitives(jaxpr)
    want = jax.value_and_grad(loss_ref, argnums=(0, 1, 2))(variables, x, skip)
    # The same convolution of the same tensor: identical.
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
