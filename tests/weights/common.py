"""Helpers shared by the weight-import tests: model shapes, torchvision-layout state dicts.

The state dicts are written out here from torchvision's architecture with random values, so
the tests without torch can exercise the torchvision rules; test_parity_torch.py checks the
same rules against torch itself.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from fcn_unet_jax import models

# torchvision's architecture, written out independently of the code under test.
RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
VGG16_CONVS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


def assert_relative_close(ours, ref, rtol=1e-4):
    """max |ours - ref| <= rtol * max |ref|; returns the relative difference."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    scale = np.abs(ref).max()
    assert scale > 0
    diff = np.abs(ours - ref).max()
    assert diff <= rtol * scale, f'max diff {diff:.3g} vs output scale {scale:.3g}'
    return diff / scale


def model_config(name, **overrides):
    """`configs/default.py`'s model section for `name`, 21 classes unless overridden."""
    config = default.get_config().model
    config.name = name
    config.num_classes = 21
    config.update(overrides)
    return config


def model_and_abstract(name, **overrides):
    """The model and its variable shapes, from `jax.eval_shape` of `init` (no compute)."""
    model = models.build_model(model_config(name, **overrides))
    abstract = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )
    return model, abstract


def abstract_variables(name, **overrides):
    """The model's variable shapes, from `jax.eval_shape` of `init` (nothing is computed)."""
    return model_and_abstract(name, **overrides)[1]


def unfilled(merged, collections=('params', 'batch_stats')):
    """Paths of leaves that a merge left at their (abstract) initial value."""
    tree = {c: merged[c] for c in collections if c in merged}
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(p) for p, v in flat if isinstance(v, jax.ShapeDtypeStruct)]


def backbone(pretrained):
    """The encoder's own variables: the `backbone` subtree of each collection."""
    return {c: tree['backbone'] for c, tree in pretrained.items() if 'backbone' in tree}


def torchvision_resnet(depth=50, prefix='', classifier=True, seed=0):
    """A state dict in torchvision's ResNet layout (Bottleneck, v1.5), random values."""
    rng = np.random.default_rng(seed)
    state = {}

    def conv(name, cout, cin, k):
        state[f'{prefix}{name}.weight'] = rng.normal(0, 0.05, (cout, cin, k, k)).astype('f4')

    def bn(name, c):
        state[f'{prefix}{name}.weight'] = rng.uniform(0.5, 1.5, c).astype('f4')
        state[f'{prefix}{name}.bias'] = rng.normal(0, 0.1, c).astype('f4')
        state[f'{prefix}{name}.running_mean'] = rng.normal(0, 0.1, c).astype('f4')
        state[f'{prefix}{name}.running_var'] = rng.uniform(0.5, 1.5, c).astype('f4')
        state[f'{prefix}{name}.num_batches_tracked'] = np.array(0, np.int64)

    conv('conv1', 64, 3, 7)
    bn('bn1', 64)
    cin = 64
    widths = (64, 128, 256, 512)
    for layer, (n_blocks, planes) in enumerate(zip(RESNET_BLOCKS[depth], widths, strict=True), 1):
        for i in range(n_blocks):
            block = f'layer{layer}.{i}'
            for j, (a, b, k) in enumerate(
                ((cin, planes, 1), (planes, planes, 3), (planes, 4 * planes, 1)), 1
            ):
                conv(f'{block}.conv{j}', b, a, k)
                bn(f'{block}.bn{j}', b)
            if i == 0:
                conv(f'{block}.downsample.0', 4 * planes, cin, 1)
                bn(f'{block}.downsample.1', 4 * planes)
            cin = 4 * planes
    if classifier:
        state['fc.weight'] = rng.normal(0, 0.01, (1000, 2048)).astype('f4')
        state['fc.bias'] = np.zeros(1000, 'f4')
    return state


def torchvision_fcn(num_classes=21, aux=True):
    """A state dict in torchvision's fcn_resnet50 layout (backbone + FCNHead, optional aux)."""
    rng = np.random.default_rng(1)
    state = torchvision_resnet(50, prefix='backbone.', classifier=False)
    heads = {'classifier': 2048, 'aux_classifier': 1024} if aux else {'classifier': 2048}
    for head, cin in heads.items():
        mid = cin // 4
        state[f'{head}.0.weight'] = rng.normal(0, 0.01, (mid, cin, 3, 3)).astype('f4')
        for name, value in (('weight', 1.0), ('bias', 0.0), ('running_mean', 0.0)):
            state[f'{head}.1.{name}'] = np.full(mid, value, 'f4')
        state[f'{head}.1.running_var'] = np.ones(mid, 'f4')
        state[f'{head}.4.weight'] = rng.normal(0, 0.01, (num_classes, mid, 1, 1)).astype('f4')
        state[f'{head}.4.bias'] = np.zeros(num_classes, 'f4')
    return state


def torchvision_vgg16_features(seed=0):
    """torchvision's `vgg16().features` state dict (no classifier: a "notop" file)."""
    rng = np.random.default_rng(seed)
    state, index, cin = {}, 0, 3
    for n_convs, cout in VGG16_CONVS:
        for _ in range(n_convs):
            state[f'features.{index}.weight'] = rng.normal(0, 0.05, (cout, cin, 3, 3)).astype('f4')
            state[f'features.{index}.bias'] = rng.normal(0, 0.1, cout).astype('f4')
            index, cin = index + 2, cout
        index += 1
    return state
