"""Converted checkpoints and the CLI (`python -m fcn_unet_jax.weights.convert`).

The converter checks what it writes with the merge training uses, so a file that
`config.init_from` would refuse is refused at conversion, with the same error.
"""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import default
from fcn_unet_jax import weights
from fcn_unet_jax.weights import convert as convert_cli
from fcn_unet_jax.weights import converted, rules
from tests.weights.common import (
    abstract_variables,
    model_config,
    torchvision_fcn,
    torchvision_vgg16_features,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_cli_converts_to_an_orbax_checkpoint(resnet50_state, tmp_path):
    source = tmp_path / 'resnet50.safetensors'
    save_file(resnet50_state, str(source))
    output = tmp_path / 'converted'
    command = [sys.executable, '-m', 'fcn_unet_jax.weights.convert', f'--input={source}']
    command += ['--model=fcn_resnet50', f'--output={output}', '--num_classes=21']
    subprocess.run(command, check=True, capture_output=True, cwd=REPO_ROOT)

    with open(output / 'pretrained.json') as f:
        metadata = json.load(f)
    assert metadata['model'] == 'fcn_resnet50'
    assert metadata['imported'] == 'backbone'
    assert metadata['skipped'] == ['fc.bias', 'fc.weight']
    assert weights.is_pretrained_checkpoint(output)
    assert not weights.is_pretrained_checkpoint(tmp_path)
    restored = weights.load_pretrained(output, model_name='fcn_resnet50')
    expected = weights.from_torchvision(resnet50_state, 'fcn_resnet50')
    jax.tree.map(np.testing.assert_array_equal, restored, expected)
    # The same file converted on the fly gives the same variables.
    direct = weights.load_pretrained(source, model_name='fcn_resnet50')
    jax.tree.map(np.testing.assert_array_equal, direct, expected)

    with pytest.raises(FileNotFoundError, match='not a converted pretrained checkpoint'):
        weights.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match='needs model_name'):
        weights.load_pretrained(source)
    with pytest.raises(ValueError, match="for model 'fcn_resnet50'.*builds 'fcn_resnet101'"):
        weights.load_pretrained(output, model_name='fcn_resnet101')
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.run([f'--input={source}', '--model=fcn_resnet50', f'--output={output}'])
    assert exit_info.value.code == 1


def test_converter_refuses_what_training_refuses(tmp_path, capsys):
    # VGG16's conv layers without the classifier: enough for the U-Net, but the FCN needs
    # fc6/fc7, so training would refuse it and so does the converter.
    source = tmp_path / 'vgg16_features.npz'
    np.savez(source, **torchvision_vgg16_features())
    output = tmp_path / 'fcn8s'
    with pytest.raises(weights.WeightImportError, match='fc6/fc7') as refused:
        weights.convert_file(source, 'fcn8s_vgg16', output)
    assert not output.exists()
    expected = [
        f'params/backbone/{fc}/{leaf}' for fc in ('fc6', 'fc7') for leaf in ('kernel', 'bias')
    ]
    assert sorted(refused.value.missing) == sorted(expected)
    assert not refused.value.unexpected and not refused.value.mismatched

    with pytest.raises(weights.WeightImportError) as by_training:
        weights.initialize_from(
            source, abstract_variables('fcn8s_vgg16'), model_config('fcn8s_vgg16')
        )
    assert by_training.value.missing == refused.value.missing

    with pytest.raises(SystemExit) as exit_info:
        convert_cli.run([f'--input={source}', '--model=fcn8s_vgg16', f'--output={output}'])
    assert exit_info.value.code == 1
    assert 'params/backbone/fc6/kernel' in capsys.readouterr().err
    assert not output.exists()

    # The same file fits the VGG16 U-Net.
    weights.convert_file(source, 'unet_vgg16', tmp_path / 'unet')
    assert weights.is_pretrained_checkpoint(tmp_path / 'unet')


def test_full_fcn_checkpoint_for_another_class_count(tmp_path):
    """The check builds the model the file fixes: aux head, and the class count asked for."""
    source = tmp_path / 'fcn_resnet50.npz'
    np.savez(source, **torchvision_fcn(num_classes=21, aux=True))
    output = tmp_path / 'converted'
    variables = weights.convert_file(source, 'fcn_resnet50', output, num_classes=5)
    assert 'aux_classifier' in variables['params']
    assert 'out' not in variables['params']['classifier']
    metadata = json.loads((output / 'pretrained.json').read_text())
    assert metadata['imported'] == 'full' and metadata['num_classes'] is None
    assert 'classifier.4.weight' in metadata['skipped']


def test_checked_model_config_is_the_default_one():
    """The converter checks against configs/default.py's model, but for what the file fixes."""
    imported = weights.from_torchvision(torchvision_fcn(num_classes=21), 'fcn_resnet50')
    result = rules.Imported(imported, 'full', 21, [])
    checked = converted.model_config_for('fcn_resnet50', result, num_classes=None, source='x')
    base = default.get_config().model
    assert set(checked) == set(base)
    fixed = {'name', 'num_classes', 'aux_head', 'resnet_variant', 'decoder_channels'}
    assert {k: checked[k] for k in set(base) - fixed} == {k: base[k] for k in set(base) - fixed}
    assert (checked.name, checked.num_classes, checked.aux_head) == ('fcn_resnet50', 21, True)
    assert checked.resnet_variant == 'torchvision'
    assert tuple(checked.decoder_channels) == tuple(base.decoder_channels)
