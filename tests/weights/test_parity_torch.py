"""Parity of imported weights with PyTorch: torchvision and segmentation_models_pytorch.

Each test builds the reference model with random weights (BN statistics and biases
randomised too, so every imported tensor changes the output), converts its state dict with
`from_torchvision`, and compares outputs in eval mode: max |ours - torch| must stay within
1e-4 of the output's scale. Run with `make parity` (needs the `parity` extra: torch,
torchvision, segmentation-models-pytorch); without torch the module is skipped.
"""

import jax
import numpy as np
import pytest

from fcn_unet_jax import torch_interop, weights
from fcn_unet_jax.models.resnet import ResNet
from fcn_unet_jax.models.vgg import VGG16
from tests.weights.common import (
    abstract_variables,
    assert_relative_close,
    backbone,
    model_and_abstract,
    unfilled,
)

torch = pytest.importorskip('torch')


try:
    torchvision = torch_interop.import_torchvision()
except ImportError:
    pytest.skip('torchvision is not installed', allow_module_level=True)

pytestmark = pytest.mark.parity


def _randomise(module, seed=0):
    """Random BN affine parameters and running statistics, and random conv/linear biases."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=generator)

    def normal(shape, std):
        return std * torch.randn(shape, generator=generator)

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(uniform(c, 0.5, 1.5))
                m.bias.copy_(normal(c, 0.1))
                m.running_mean.copy_(normal(c, 0.1))
                m.running_var.copy_(uniform(c, 0.5, 1.5))
            elif isinstance(m, torch.nn.Conv2d | torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(normal(m.bias.shape, 0.1))
    return module.eval()


def _inputs(size=64, batch=2):
    x = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype('f4')
    return x, torch.from_numpy(x).permute(0, 3, 1, 2)


def _nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def test_load_state_dict_reads_torch_files(tmp_path):
    state = torchvision.models.resnet50(weights=None).state_dict()
    torch.save({'state_dict': {f'module.{k}': v for k, v in state.items()}}, tmp_path / 'w.pth')
    loaded = weights.load_state_dict(tmp_path / 'w.pth')
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(loaded[key], value.numpy())


def test_resnet50backbone():
    reference = _randomise(torchvision.models.resnet50(weights=None))
    x, xt = _inputs()
    with torch.no_grad():
        r = reference
        y = r.maxpool(r.relu(r.bn1(r.conv1(xt))))
        expected = _nhwc(r.layer4(r.layer3(r.layer2(r.layer1(y)))))
    pretrained = weights.from_torchvision(reference.state_dict(), 'fcn8s_resnet50')
    ours = ResNet(depth=50).apply(backbone(pretrained), x, train=False)[32]
    print('resnet50 backbone: relative max diff', assert_relative_close(ours, expected))
    abstract = abstract_variables('fcn8s_resnet50')
    merged = weights.merge_pretrained(abstract, pretrained)
    assert not [p for p in unfilled(merged) if 'backbone' in p]


def test_vgg16_backbone_with_fc6_fc7():
    reference = _randomise(torchvision.models.vgg16(weights=None))
    x, xt = _inputs()
    pretrained = weights.from_torchvision(reference.state_dict(), 'fcn8s_vgg16')
    # Plain form (smp's encoder): torchvision's features as they are.
    with torch.no_grad():
        expected = _nhwc(reference.features(xt))
    ours = VGG16(fcn=False).apply(backbone(pretrained), x, train=False)[32]
    print('vgg16 features: relative max diff', assert_relative_close(ours, expected))

    # FCN form: conv1_1 padded by 100, ceil-mode pooling, then the classifier's first two
    # Linear layers applied as convolutions (fc6 = classifier.0 viewed as 4096x512x7x7).
    features = reference.features
    features[0].padding = (100, 100)
    for m in features:
        if isinstance(m, torch.nn.MaxPool2d):
            m.ceil_mode = True
    fc6, fc7 = reference.classifier[0], reference.classifier[3]
    with torch.no_grad():
        y = torch.relu(
            torch.nn.functional.conv2d(features(xt), fc6.weight.view(4096, 512, 7, 7), fc6.bias)
        )
        y = torch.relu(torch.nn.functional.conv2d(y, fc7.weight.view(4096, 4096, 1, 1), fc7.bias))
    ours = VGG16(fcn=True).apply(backbone(pretrained), x, train=False)[32]
    print('vgg16 fc7 (FCN form): relative max diff', assert_relative_close(ours, _nhwc(y)))

    for name in ('fcn8s_vgg16', 'unet_vgg16'):
        abstract = abstract_variables(name)
        merged = weights.merge_pretrained(
            abstract, weights.from_torchvision(reference.state_dict(), name)
        )
        assert not [p for p in unfilled(merged) if 'backbone' in p]


@pytest.mark.parametrize('depth', [50, 101])
def test_fcn_resnet_full_model_with_aux(depth):
    builder = getattr(torchvision.models.segmentation, f'fcn_resnet{depth}')
    reference = _randomise(
        builder(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    )
    x, xt = _inputs()
    with torch.no_grad():
        expected = {k: _nhwc(v) for k, v in reference(xt).items()}
    name = f'fcn_resnet{depth}'
    pretrained = weights.from_torchvision(reference.state_dict(), name)
    model, abstract = model_and_abstract(name, num_classes=21, aux_head=True)
    variables = weights.merge_pretrained(abstract, pretrained)
    assert unfilled(variables) == []
    ours = model.apply(variables, x, train=False)
    for key in ('out', 'aux'):
        print(f'{name} {key}: relative max diff', assert_relative_close(ours[key], expected[key]))


@pytest.mark.parametrize('encoder', ['resnet50', 'vgg16'])
def test_smp_unet_full_model(encoder):
    smp = pytest.importorskip('segmentation_models_pytorch')
    reference = _randomise(smp.Unet(encoder, encoder_weights=None, classes=3))
    x, xt = _inputs()
    with torch.no_grad():
        expected = _nhwc(reference(xt))
    name = f'unet_{encoder}'
    pretrained = weights.from_torchvision(reference.state_dict(), name)
    model, abstract = model_and_abstract(name, num_classes=3)
    variables = weights.merge_pretrained(abstract, pretrained)
    assert unfilled(variables) == []
    ours = model.apply(variables, x, train=False)
    print(f'smp Unet {encoder}: relative max diff', assert_relative_close(ours, expected))


def test_converter_accepts_full_models(tmp_path):
    """The converter's fit check builds the model each file fixes (aux head, decoder widths)."""
    smp = pytest.importorskip('segmentation_models_pytorch')
    sources = {
        'fcn_resnet50': torchvision.models.segmentation.fcn_resnet50(
            weights=None, weights_backbone=None, num_classes=21, aux_loss=True
        ),
        'unet_resnet50': smp.Unet(
            'resnet50', encoder_weights=None, classes=3, decoder_channels=(128, 64, 32, 16, 8)
        ),
    }
    for name, reference in sources.items():
        path = tmp_path / f'{name}.pth'
        torch.save(reference.state_dict(), path)
        variables = weights.convert_file(path, name, tmp_path / name)
        restored = weights.load_pretrained(tmp_path / name, model_name=name)
        jax.tree.map(np.testing.assert_array_equal, restored, variables)
    decoder = variables['params']['decoder']
    widths = [decoder[f'block{j}']['conv2']['kernel'].shape[-1] for j in range(5)]
    assert widths == [128, 64, 32, 16, 8]
