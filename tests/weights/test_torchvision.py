"""torchvision and smp layouts without torch: mapping, fit into the real models, errors.

The fit is checked with `jax.eval_shape`, so full-size models cost no compute. The state
dicts come from `common` (torchvision's architecture written out with random values).
"""

import numpy as np
import pytest

from fcn_unet_jax import models, weights
from tests.weights.common import abstract_variables, torchvision_fcn, torchvision_resnet, unfilled


def test_resnet_backbone_mapping(resnet50_state):
    pretrained = weights.from_torchvision(resnet50_state, 'fcn_resnet50')
    # A backbone-only import: the ImageNet classifier `fc` has no place in the model.
    assert {c: list(t) for c, t in pretrained.items()} == {
        'params': ['backbone'],
        'batch_stats': ['backbone'],
    }
    block = pretrained['params']['backbone']['layer2_0']
    np.testing.assert_array_equal(
        block['conv2']['kernel'], resnet50_state['layer2.0.conv2.weight'].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        block['downsample_bn']['scale'], resnet50_state['layer2.0.downsample.1.weight']
    )
    np.testing.assert_array_equal(
        pretrained['batch_stats']['backbone']['bn1']['var'], resnet50_state['bn1.running_var']
    )


@pytest.mark.parametrize('model_name', ['fcn_resnet50', 'fcn8s_resnet50', 'unet_resnet50'])
def test_resnet_backbone_fits_every_resnet50_model(resnet50_state, model_name):
    pretrained = weights.from_torchvision(resnet50_state, model_name)
    merged = weights.merge_pretrained(abstract_variables(model_name), pretrained)
    left = unfilled(merged)
    assert left, 'the head keeps its initialisation'
    assert not [p for p in left if 'backbone' in p]


def test_fcn_checkpoint_full_import_and_new_classes():
    state = torchvision_fcn(num_classes=21)
    pretrained = weights.from_torchvision(state, 'fcn_resnet50')
    # Every variable of the model comes from the checkpoint, aux head included.
    merged = weights.merge_pretrained(abstract_variables('fcn_resnet50', aux_head=True), pretrained)
    assert unfilled(merged) == []
    np.testing.assert_array_equal(
        merged['params']['aux_classifier']['out']['kernel'],
        state['aux_classifier.4.weight'].transpose(2, 3, 1, 0),
    )
    # A model built without the aux head drops it.
    merged = weights.merge_pretrained(abstract_variables('fcn_resnet50'), pretrained)
    assert 'aux_classifier' not in merged['params'] and unfilled(merged) == []

    # Another label set: keeping the 21-class output layer is a shape error with a hint ...
    with pytest.raises(weights.WeightImportError, match='num_classes') as error:
        weights.merge_pretrained(abstract_variables('fcn_resnet50', num_classes=5), pretrained)
    assert ('params/classifier/out/kernel', (1, 1, 512, 5), (1, 1, 512, 21)) in (
        error.value.mismatched
    )
    # ... and converting with num_classes leaves the output layers to the model's init.
    pretrained = weights.from_torchvision(state, 'fcn_resnet50', num_classes=5)
    assert 'out' not in pretrained['params']['classifier']
    merged = weights.merge_pretrained(abstract_variables('fcn_resnet50', num_classes=5), pretrained)
    assert sorted(unfilled(merged)) == [
        "['params']['classifier']['out']['bias']",
        "['params']['classifier']['out']['kernel']",
    ]


def test_partial_state_dict_lists_every_problem(resnet50_state, tmp_path):
    state = dict(resnet50_state)
    del state['layer3.2.conv1.weight']
    state['layer5.0.conv1.weight'] = np.zeros((1, 1, 1, 1), 'f4')
    state['layer1.0.bn1.running_var'] = np.ones(65, 'f4')
    with pytest.raises(weights.WeightImportError) as error:
        weights.from_torchvision(state, 'fcn8s_resnet50')
    assert error.value.missing == ['layer3.2.conv1.weight']
    assert error.value.unexpected == ['layer5.0.conv1.weight']
    assert error.value.mismatched == [('layer1.0.bn1.running_var', (64,), (65,))]
    assert 'layer1.0.bn1.running_var: expected (64,), got (65,)' in str(error.value)
    # Read from a file, the error names the file.
    path = tmp_path / 'broken.npz'
    np.savez(path, **state)
    with pytest.raises(weights.WeightImportError, match='broken.npz'):
        weights.load_pretrained(path, model_name='fcn8s_resnet50')


def test_wrong_architecture_is_named():
    with pytest.raises(weights.WeightImportError, match='ResNet-101') as error:
        weights.from_torchvision(torchvision_resnet(101), 'fcn_resnet50')
    assert 'layer3.22.conv1.weight' in error.value.unexpected
    vgg = {'features.0.weight': np.zeros((64, 3, 3, 3), 'f4')}
    with pytest.raises(weights.WeightImportError, match='VGG.*resnet50 encoder'):
        weights.from_torchvision(vgg, 'unet_resnet50')
    with pytest.raises(ValueError, match="No pretrained weights can initialise model 'unet'"):
        weights.from_torchvision(vgg, 'unet')


def test_models_with_an_encoder_come_from_the_registry():
    """The error for a model without a pretrained encoder lists the registry's others."""
    with_encoder = sorted(name for name, info in models.MODELS.items() if info.encoder)
    assert 'unet' not in with_encoder and 'fcn8s_resnet101' in with_encoder
    with pytest.raises(ValueError, match='pretrained encoder: ' + ', '.join(with_encoder)):
        weights.from_torchvision({}, 'unet')
    with pytest.raises(ValueError, match="model 'no_such_model'"):
        weights.from_torchvision({}, 'no_such_model')
