"""Fixtures of the weight-import tests."""

import pytest

from tests.weights import common


@pytest.fixture(scope='module')
def resnet50_state():
    """A random torchvision ResNet-50 state dict (with its ImageNet classifier `fc`)."""
    return common.torchvision_resnet(50)
