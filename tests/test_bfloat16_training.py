"""bfloat16 compute checked against float32 on a short CPU training run.

`config.model.dtype = 'bfloat16'` is the accelerator path: convolutions and activations in
bfloat16; parameters, BatchNorm statistics, optimiser state, logits and losses in float32.
CPU computes bfloat16 faithfully (if slowly), so its correctness is checked here. For a
ResNet-encoder model and a VGG-based FCN, the same config is trained from the same initial
variables on one fixed synthetic batch, once per compute dtype, and the runs must agree to
bfloat16 precision (logits and loss curve), while the jitted bfloat16 train step must really
run every convolution, forward and backward, on bfloat16 operands.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from fcn_unet_jax import models, sharding, train_steps
from tests.ops.helpers import jaxpr_eqns

pytestmark = pytest.mark.usefixtures('fast_compile')

STEPS = 8
CLASSES = 3
BF16 = jnp.dtype(jnp.bfloat16)
F32 = jnp.dtype(jnp.float32)


def make_config(name: str, size: int, learning_rate: float):
    """A width-1/16 model on `size` px crops, Adam at a constant rate, no dropout."""
    config = default.get_config()
    config.model.name = name
    config.model.num_classes = CLASSES
    config.model.width = 0.0625
    # Without dropout both runs compute exactly the same function of the parameters.
    config.model.dropout_rate = 0.0
    config.input.crop_size = (size, size)
    config.optimizer.learning_rate = learning_rate
    config.optimizer.schedule = 'constant'
    return config


def synthetic_batch(batch: int, size: int, seed: int = 0) -> dict[str, jax.Array]:
    """Images of smooth class regions, each class a noisy colour: quick to fit."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(batch, 8, 8, CLASSES))
    labels = np.argmax(coarse.repeat(size // 8, axis=1).repeat(size // 8, axis=2), axis=-1)
    colours = rng.normal(size=(CLASSES, 3))
    images = colours[labels] + 0.5 * rng.normal(size=(batch, size, size, 3))
    return {'image': jnp.asarray(images, jnp.float32), 'label': jnp.asarray(labels, jnp.int32)}


def conv_operand_dtypes(jaxpr) -> list[set]:
    """Operand dtypes of every convolution in `jaxpr` and in all of its sub-jaxprs.

    1x1 convolutions run as matrix products (`convolutions.Conv`), so `dot_general` counts.
    """
    eqns = jaxpr_eqns(jaxpr, ('conv_general_dilated', 'dot_general'))
    return [{v.aval.dtype for v in eqn.invars} for eqn in eqns]


def relative_error(got, want) -> float:
    """||got - want|| / ||want|| over all logits."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# Measured (2 CPU cores, JAX 0.10, 8 steps), bfloat16 vs float32:
#   fcn_resnet50, 8 x 32 px, Adam 1e-3: logit error 0.011 (init) / 0.013 (trained); per-step
#     loss difference <= 2.7% (mostly < 1%), loss 1.18 -> 0.98. Train-mode BatchNorm makes
#     this deep, 4-channel-wide ResNet chaotic at init (errors grow ~20% per block), hence
#     the batch of 8: with 2 x 64 px the curves drift apart by up to 6%.
#   fcn8s_vgg16, 2 x 32 px, Adam 1e-3: logit error 0 (zero-initialised score layers) /
#     0.003 (trained); per-step loss difference <= 0.9%, loss 1.099 -> 1.056 (float32) and
#     1.066 (bfloat16). At 3e-3, with fc6/fc7 at their full-width gain (`vgg.fc_init_std`),
#     this 8-step run oscillates and the bfloat16 loss ends above its start.
# Float32 on both sides gives identical logits (error 0): the lower bound on the logit error
# fails if the bfloat16 path ever silently computes in float32.
@pytest.mark.parametrize(
    ('name', 'batch_size', 'size', 'learning_rate', 'loss_rtol'),
    [
        pytest.param('fcn_resnet50', 8, 32, 1e-3, 0.08, marks=pytest.mark.slow),
        ('fcn8s_vgg16', 2, 32, 1e-3, 0.05),
    ],
)
def test_bfloat16_training_tracks_float32(name, batch_size, size, learning_rate, loss_rtol):
    config = make_config(name, size, learning_rate)
    batch = synthetic_batch(batch_size, size)
    state0, tx, schedule = train_steps.create_train_state(
        config,
        models.build_model(config.model),
        sharding.create_mesh(jax.devices()[:1]),
        jax.random.key(0),
    )
    rng = jax.random.key(1)
    runs = {}
    for dtype in ('float32', 'bfloat16'):
        config.model.dtype = dtype
        model = models.build_model(config.model)
        step = jax.jit(train_steps.bind_train_step(config, model, tx, schedule))
        traced = step.trace(state0, batch, rng)
        compiled = traced.lower().compile()
        state, losses = state0, []
        for _ in range(STEPS):
            state, summary = compiled(state, batch, rng)
            assert summary['loss'].dtype == F32
            losses.append(float(summary['loss']))
        predict = jax.jit(functools.partial(model.apply, train=False))
        runs[dtype] = {
            'convs': conv_operand_dtypes(traced.jaxpr),
            'state': state,
            'losses': np.asarray(losses),
            'predict': predict,
        }
    r32, r16 = runs['float32'], runs['bfloat16']

    # Every convolution of the step (forward and backward) runs in the configured dtype.
    assert r16['convs'] and all(d == {BF16} for d in r16['convs'])
    assert r32['convs'] and all(d == {F32} for d in r32['convs'])
    # Parameters, BatchNorm statistics and optimiser state stay float32 in the bf16 run.
    leaves = jax.tree_util.tree_leaves(r16['state'])
    assert {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)} == {F32}

    # Logits are float32 (as `build_model` documents) and match float32 compute on the same
    # variables to bfloat16 precision: at initialisation and after the float32 run.
    for variables in (state0.variables(), r32['state'].variables()):
        out16 = r16['predict'](variables, batch['image'])
        out32 = r32['predict'](variables, batch['image'])
        assert out16.dtype == F32 and out32.dtype == F32
        assert relative_error(out16, out32) < 0.04
    assert relative_error(out16, out32) > 1e-4  # Trained logits: bf16 rounding is visible.

    # Loss curves: same start (up to bf16 rounding), both fall, close at every step.
    l32, l16 = r32['losses'], r16['losses']
    assert np.all(np.isfinite(l16))
    assert l32[-1] < 0.98 * l32[0] and l16[-1] < 0.98 * l16[0]
    np.testing.assert_allclose(l16, l32, rtol=loss_rtol)
