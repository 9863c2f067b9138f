"""`config.model.plain_ops`: every model family computes the same with XLA's own ops.

For one model of each family, at width 1/16 in float32, the tuned ops (`fcn_unet_jax.ops`)
and the plain Flax/XLA ops must give the same parameter tree, the same logits in training
and evaluation, the same parameter gradients and the same BatchNorm statistics updates;
and the switch must really change the program: the tuned one has custom gradients and
CPU-only branches, the plain one none.
"""

import collections

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fcn_unet_jax import models
from fcn_unet_jax.ops import platform
from tests.models.helpers import abstract_init, make_config, random_variables
from tests.ops.helpers import jaxpr_eqns

pytestmark = pytest.mark.usefixtures('fast_compiles')

# (model name, config overrides, input shape): one model per family, each op the
# architectures call at least once (Conv 1x1 / 3x3 / strided / dilated, ConvTranspose,
# UpsampledConcatConv, upsample_transposed, BatchNorm, both poolings, materialize).
# ResNets get 64 x 64 inputs so that no BatchNorm takes batch statistics over only a
# handful of values (layer4 of a 32 x 32 input is 1 x 1), which makes them ill-conditioned.
FAMILIES = [
    pytest.param('fcn8s_vgg16', {}, (2, 32, 40, 3), id='fcn_vgg16'),
    pytest.param('fcn_resnet50', {}, (2, 64, 64, 3), id='fcn_resnet50'),
    pytest.param('fcn8s_resnet50', {}, (2, 64, 64, 3), id='fcn8s_resnet50'),
    # 188 is the smallest input a VALID U-Net takes (output 4 x 4).
    pytest.param('unet', {'padding': 'VALID'}, (2, 188, 188, 3), id='unet_valid'),
    pytest.param('unet', {'padding': 'SAME', 'batch_norm': True}, (2, 36, 44, 3), id='unet_same'),
    pytest.param('unet_resnet50', {}, (2, 64, 64, 3), id='unet_resnet50'),
    pytest.param('unet_vgg16', {}, (2, 32, 40, 3), id='unet_vgg16'),
]
# Residual branches scaled down (the last BatchNorm of each bottleneck), see `_variables`.
RESIDUAL_BRANCH_SCALE = 0.1
# Primitives only the tuned ops bring: custom gradients, CPU-only branches
# (`lax.platform_dependent`) and the random draws of the fusion barriers.
TUNED_ONLY = ('custom_vjp_call', 'platform_index', 'rng_uniform')


def _primitive_counts(closed_jaxpr) -> collections.Counter:
    return collections.Counter(e.primitive.name for e in jaxpr_eqns(closed_jaxpr, None))


def _variables(model, shape):
    """Random variables; in ResNets every residual branch ends with a small scale.

    A deep BatchNorm network at random initialisation is chaotic in training mode: its
    gradients grow with depth and depend on every example of the batch (Yang et al.,
    A Mean Field Theory of Batch Normalization, 2019), so that here a 1e-7 relative change
    of the input moves a ResNet-50's gradients by percents, and rounding differences
    would too. With each residual branch scaled down (as torchvision's
    `zero_init_residual` does, scaling by 0), every block starts close to the identity and
    the network is well-conditioned, while every gradient path stays open.
    """

    def damp_residual_branch(path, leaf):
        keys = [entry.key for entry in path]
        is_last_bn_scale = keys[-2:] == ['bn3', 'scale'] and keys[1] == 'backbone'
        return leaf * RESIDUAL_BRANCH_SCALE if is_last_bn_scale else leaf

    return jax.tree_util.tree_map_with_path(damp_residual_branch, random_variables(model, shape))


def _train_and_eval(model, variables, images, cotangent):
    """A function of the parameters: both modes' logits, statistics updates, gradients."""

    def loss(params):
        logits, updates = model.apply(
            {**variables, 'params': params},
            images,
            train=True,
            rngs={'dropout': jax.random.key(2)},
            mutable=['batch_stats'],
        )
        return jnp.vdot(logits, cotangent), (logits, updates)

    def step(params):
        (_, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return {
            'eval_logits': model.apply({**variables, 'params': params}, images, train=False),
            'train_logits': logits,
            'updates': updates,
            'grads': grads,
        }

    return step


def _assert_trees_close(got, want, what, tolerance):
    """Leaves equal up to `tolerance` times the largest entry of the whole tree.

    Gradients and statistics are sums of many terms of both signs: a tensor whose terms
    nearly cancel (a one-channel BatchNorm's scale) is judged against the scale of the
    whole tree, the scale an optimiser step sees, not against its own.
    """
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want), what
    scale = max((float(np.abs(leaf).max()) for leaf in jax.tree_util.tree_leaves(want)), default=0)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want), strict=True
    ):
        np.testing.assert_allclose(
            a,
            b,
            rtol=tolerance,
            atol=tolerance * scale,
            err_msg=f'{what} {jax.tree_util.keystr(path)}',
        )


@pytest.mark.parametrize(('name', 'overrides', 'shape'), FAMILIES)
def test_plain_and_tuned_ops_compute_the_same(name, overrides, shape):
    tuned = models.build_model(make_config(name, **overrides))
    plain = models.build_model(make_config(name, plain_ops=True, **overrides))
    assert (tuned.plain_ops, plain.plain_ops) == (False, True)

    # The same variables (names, shapes, collections): a checkpoint loads either way.
    tuned_shapes, plain_shapes = abstract_init(tuned, shape), abstract_init(plain, shape)
    assert flax.core.unfreeze(plain_shapes) == flax.core.unfreeze(tuned_shapes)
    variables = _variables(tuned, shape)
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=shape), jnp.float32)
    out_shape = jax.eval_shape(lambda: tuned.apply(variables, images, train=False)).shape
    cotangent = jnp.asarray(rng.normal(size=out_shape), jnp.float32)

    results, programs = {}, {}
    for label, model in (('tuned', tuned), ('plain', plain)):
        traced = jax.jit(_train_and_eval(model, variables, images, cotangent)).trace(
            variables['params']
        )
        programs[label] = _primitive_counts(traced.jaxpr)
        results[label] = traced.lower().compile()(variables['params'])

    # The switch changes the program: no custom gradient or CPU-only branch is left.
    assert programs['tuned']['custom_vjp_call'] > 0
    assert not {p: programs['plain'][p] for p in TUNED_ONLY if programs['plain'][p]}

    # float32 with the same operations in other orders (matrix products for 1x1
    # convolutions, phase-wise and hand-written gradients): each op rounds differently in
    # the last bits (~1e-7 relative); through a few dozen well-conditioned layers the
    # results differ by ~1e-6 of their scale, and at most ~1e-5 (measured), 10x below.
    for key in ('eval_logits', 'train_logits', 'updates', 'grads'):
        _assert_trees_close(results['plain'][key], results['tuned'][key], key, 1e-4)


def test_the_registry_reads_and_checks_plain_ops():
    config = make_config('unet')
    assert models.build_model(config).plain_ops is False
    # A config written before the field existed (a run's config.json) runs the tuned ops.
    fields = config.to_dict()
    del fields['plain_ops']
    assert models.build_model(ml_collections.ConfigDict(fields)).plain_ops is False
    with pytest.raises(ValueError, match='config.model.plain_ops must be True or False'):
        models.build_model(ml_collections.ConfigDict({**fields, 'plain_ops': 'yes'}))


@pytest.mark.parametrize(
    ('name', 'overrides', 'shape'), [FAMILIES[0], FAMILIES[4]]
)  # fcn_vgg16, unet_same: every op kind of the ops package between them.
def test_the_accelerator_branches_compute_what_the_plain_ops_do(
    name, overrides, shape, monkeypatch
):
    # A GPU or TPU program takes the `default` branch of every platform choice: run those
    # branches here (what a CPU program never executes) and compare with the plain ops.
    monkeypatch.setattr(platform, 'on_cpu', lambda cpu, default, *args: default(*args))
    tuned = models.build_model(make_config(name, **overrides))
    plain = models.build_model(make_config(name, plain_ops=True, **overrides))
    variables = _variables(tuned, shape)
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=shape), jnp.float32)
    out_shape = jax.eval_shape(lambda: tuned.apply(variables, images, train=False)).shape
    cotangent = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    results = {
        label: jax.jit(_train_and_eval(model, variables, images, cotangent))(variables['params'])
        for label, model in (('accelerator', tuned), ('plain', plain))
    }
    for key in ('eval_logits', 'train_logits', 'updates', 'grads'):
        _assert_trees_close(results['plain'][key], results['accelerator'][key], key, 1e-5)
