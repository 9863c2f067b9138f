"""The one merge path: strict for pretrained imports, partial for a previous run."""

import logging

import numpy as np
import pytest

from fcn_unet_jax import weights
from tests.weights.common import abstract_variables, unfilled


def _trees():
    """A model's initial variables and a loaded tree with one of every kind of difference."""
    init = {
        'params': {
            'backbone': {'conv': {'kernel': np.zeros((3, 3, 3, 4), 'f4')}},
            'head': {'kernel': np.zeros((1, 1, 4, 2), 'f4')},
        },
        'batch_stats': {'backbone': {'bn': {'mean': np.zeros(4, 'f4')}}},
        'frozen': {'up': {'kernel': np.full((4, 4, 2, 2), 7, 'f4')}},
        'empty': {},  # An empty collection keeps its place in the tree.
    }
    loaded = {
        'params': {
            'backbone': {'conv': {'kernel': np.ones((3, 3, 3, 4), 'f8')}},
            'head': {'kernel': np.ones((1, 1, 4, 5), 'f4')},  # Another class count.
            'extra': {'bias': np.ones(2, 'f4')},  # No place in the model.
        },
        'batch_stats': {'backbone': {'bn': {'mean': np.ones(4, 'f4')}}},
    }
    return init, loaded


def test_partial_merge_takes_matches_and_keeps_the_rest(caplog):
    init, loaded = _trees()
    caplog.set_level(logging.INFO, logger='absl')
    merged = weights.merge_variables(init, loaded, strict=False, origin='the run in X')
    assert set(merged) == set(init) and merged['empty'] == {}
    taken = merged['params']['backbone']['conv']['kernel']
    assert taken.dtype == np.float32  # Cast to the model's dtype.
    np.testing.assert_array_equal(taken, np.ones((3, 3, 3, 4)))
    np.testing.assert_array_equal(merged['batch_stats']['backbone']['bn']['mean'], np.ones(4))
    np.testing.assert_array_equal(
        merged['params']['head']['kernel'], init['params']['head']['kernel']
    )
    np.testing.assert_array_equal(merged['frozen']['up']['kernel'], init['frozen']['up']['kernel'])
    assert 'extra' not in merged['params']
    assert 'Initialised 2 arrays from the run in X; 2 keep their initialisation: ' in caplog.text
    assert "['params/head/kernel', 'frozen/up/kernel']" in caplog.text
    assert "['params/head/kernel', 'params/extra/bias']" in caplog.text  # Loaded, not used.


def test_strict_merge_refuses_the_same_trees_listing_everything():
    init, loaded = _trees()
    with pytest.raises(weights.WeightImportError, match='Cannot initialise the model') as error:
        weights.merge_variables(init, loaded, strict=True)
    assert error.value.unexpected == ['params/extra/bias']
    assert error.value.mismatched == [('params/head/kernel', (1, 1, 4, 2), (1, 1, 4, 5))]
    assert error.value.missing == []
    # merge_pretrained is the strict merge.
    with pytest.raises(weights.WeightImportError) as again:
        weights.merge_pretrained(init, loaded)
    assert str(again.value) == str(error.value)
    # Without the extra leaf and with the model's class count, the merge goes through.
    del loaded['params']['extra']
    loaded['params']['head']['kernel'] = np.ones((1, 1, 4, 2), 'f4')
    merged = weights.merge_pretrained(init, loaded)
    np.testing.assert_array_equal(merged['params']['head']['kernel'], np.ones((1, 1, 4, 2)))
    # A backbone leaf the loaded tree lacks is refused unless strict_backbone=False.
    del loaded['batch_stats']
    with pytest.raises(weights.WeightImportError) as error:
        weights.merge_pretrained(init, loaded)
    assert error.value.missing == ['batch_stats/backbone/bn/mean']
    merged = weights.merge_pretrained(init, loaded, strict_backbone=False)
    np.testing.assert_array_equal(merged['batch_stats']['backbone']['bn']['mean'], np.zeros(4))


def test_merge_reports_missing_backbone_leaves(resnet50_state):
    pretrained = weights.from_torchvision(resnet50_state, 'fcn_resnet50')
    del pretrained['params']['backbone']['layer4_2']['conv3']
    abstract = abstract_variables('fcn_resnet50')
    with pytest.raises(weights.WeightImportError, match='layer4_2/conv3/kernel'):
        weights.merge_pretrained(abstract, pretrained)
    merged = weights.merge_pretrained(abstract, pretrained, strict_backbone=False)
    assert "['params']['backbone']['layer4_2']['conv3']['kernel']" in unfilled(merged)
