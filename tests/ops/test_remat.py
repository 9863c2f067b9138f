"""`ops.remat`: rematerialised blocks stay rematerialised in XLA:CPU's compiled gradient.

(That rematerialisation changes neither parameter names nor numbers is a model option,
tested in tests/models/test_models.py.)
"""

import jax
import jax.numpy as jnp
import pytest

from fcn_unet_jax.models import resnet
from fcn_unet_jax.models.resnet import ResNet

pytestmark = pytest.mark.usefixtures('fast_compiles')


def test_remat_survives_xla_cpu_common_subexpression_elimination(monkeypatch):
    """The compiled gradient recomputes the rematerialised blocks instead of merging them.

    XLA:CPU drops `jax.checkpoint`'s optimisation barriers before CSE; without
    `xla_cpu.keep_recomputation` the recomputed convolutions merge back into the forward
    pass and the compiled gradient has as many convolutions and products as without remat.
    """
    x = jnp.ones((2, 64, 64, 3))
    monkeypatch.setitem(resnet.RESNET_LAYERS, 50, (1, 1, 2, 1))  # 5 bottlenecks: compiles fast.
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
    # 5 blocks recompute 3 convolutions / products each (4 with a projection).
    assert counts[1] >= counts[0] + 3 * 5, counts
