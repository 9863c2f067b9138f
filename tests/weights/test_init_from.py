"""`weights.initialize_from`, what training calls for `config.init_from`.

Three kinds of path: a previous run's workdir (partial merge, FCN staging 32s -> 16s), a
converted checkpoint and a raw weights file (strict merge). Model variables are abstract
(`jax.eval_shape`) or filled with random numbers, so no model is run.
"""

import logging

import jax
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

from fcn_unet_jax import checkpointing, weights
from tests.weights.common import (
    abstract_variables,
    backbone,
    model_config,
    torchvision_fcn,
    unfilled,
)

TINY = {'width': 0.0625}  # Staging does not need pretrained widths.


def _random_variables(name, seed):
    """The model's variables at width 1/16 filled with random numbers (no `init` compiled)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: rng.normal(size=s.shape).astype(s.dtype), abstract_variables(name, **TINY)
    )


def _flat(tree):
    return {
        '/'.join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_previous_run_is_merged_partially(tmp_path, caplog):
    # A finished FCN-32s run, saved the way train.py saves it (TrainState's fields).
    saved = _random_variables('fcn32s_vgg16', seed=0)
    params = saved.pop('params')
    state = {
        'step': np.int32(5),
        'params': params,
        'model_state': saved,
        'opt_state': optax.sgd(0.1, momentum=0.9).init(params),
    }
    manager = checkpointing.CheckpointManager(str(tmp_path), keep=1)
    manager.save(5, state)
    manager.close()
    run32 = _flat({'params': params, **saved})

    init16 = _random_variables('fcn16s_vgg16', seed=1)
    caplog.set_level(logging.INFO, logger='absl')
    merged = weights.initialize_from(str(tmp_path), init16, model_config('fcn16s_vgg16', **TINY))

    kept = []
    for path, value in _flat(merged).items():
        initial = _flat(init16)[path]
        if path in run32 and run32[path].shape == initial.shape:
            np.testing.assert_array_equal(value, run32[path])
        else:
            np.testing.assert_array_equal(value, initial)
            kept.append(path)
    # FCN-16s's new skip and its upsamplers keep their initialisation; everything else
    # (backbone, score_fr) comes from the 32s run.
    assert sorted(kept) == [
        'frozen/upscore/kernel',
        'frozen/upscore2/kernel',
        'params/score_pool4/bias',
        'params/score_pool4/kernel',
    ]
    assert f'from the run in {tmp_path}; 4 keep their initialisation' in caplog.text
    for path in kept:
        assert path in caplog.text


def test_converted_checkpoint(resnet50_state, tmp_path):
    source = tmp_path / 'resnet50.npz'
    np.savez(source, **resnet50_state)
    converted = tmp_path / 'converted'
    weights.convert_file(source, 'fcn8s_resnet50', converted)
    initial = abstract_variables('fcn8s_resnet50')

    merged = weights.initialize_from(str(converted), initial, model_config('fcn8s_resnet50'))

    expected = weights.from_torchvision(resnet50_state, 'fcn8s_resnet50')
    jax.tree.map(np.testing.assert_array_equal, backbone(merged), backbone(expected))
    # The score layers are not in an ImageNet backbone: they keep their initialisation.
    assert not any('backbone' in path for path in unfilled(merged))
    assert any('score_layer4' in path for path in unfilled(merged))

    with pytest.raises(ValueError, match="for model 'fcn8s_resnet50'.*builds 'fcn8s_resnet101'"):
        weights.initialize_from(
            str(converted),
            abstract_variables('fcn8s_resnet101'),
            model_config('fcn8s_resnet101'),
        )


@pytest.mark.parametrize('suffix', ['npz', 'safetensors'])
def test_raw_weights_file_is_converted_on_the_fly(resnet50_state, tmp_path, suffix):
    source = tmp_path / f'resnet50.{suffix}'
    if suffix == 'npz':
        np.savez(source, **resnet50_state)
    else:
        save_file(resnet50_state, str(source))
    merged = weights.initialize_from(
        source, abstract_variables('unet_resnet50'), model_config('unet_resnet50')
    )
    expected = weights.from_torchvision(resnet50_state, 'unet_resnet50')
    jax.tree.map(np.testing.assert_array_equal, backbone(merged), backbone(expected))
    assert any('decoder' in path for path in unfilled(merged))

    # Strict: a file that misses a backbone tensor is refused, naming the file and the key.
    broken = dict(resnet50_state)
    del broken['layer4.2.conv3.weight']
    np.savez(tmp_path / 'broken.npz', **broken)
    with pytest.raises(weights.WeightImportError, match='broken.npz') as error:
        weights.initialize_from(
            tmp_path / 'broken.npz',
            abstract_variables('unet_resnet50'),
            model_config('unet_resnet50'),
        )
    assert error.value.missing == ['layer4.2.conv3.weight']


def test_raw_file_uses_the_models_class_count(tmp_path):
    """A 21-class FCN checkpoint for a 5-class model: the output layers keep their init."""
    source = tmp_path / 'fcn_resnet50.safetensors'
    save_file(torchvision_fcn(num_classes=21), str(source))
    config = model_config('fcn_resnet50', num_classes=5, aux_head=True)
    merged = weights.initialize_from(
        source, abstract_variables('fcn_resnet50', num_classes=5, aux_head=True), config
    )
    assert sorted(unfilled(merged)) == [
        f"['params']['{head}']['out']['{leaf}']"
        for head in ('aux_classifier', 'classifier')
        for leaf in ('bias', 'kernel')
    ]
