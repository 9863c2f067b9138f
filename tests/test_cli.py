"""The `fcn-unet` command and `--config` resolution: names, paths from anywhere, help.

One subprocess runs a real program from a directory outside the repository, without the
repository on PYTHONPATH (as an installed copy runs); everything else is checked in-process.
"""

import os
import subprocess
import sys

import pytest
from absl import flags

from fcn_unet_jax import cli, config_files, console, errors


def test_a_config_name_resolves_to_the_packaged_file():
    path = config_files.CONFIGS_DIR / 'fcn_voc.py'
    assert config_files.resolve('fcn_voc:8s') == f'{path}:8s'
    assert config_files.resolve('fcn8s_voc') == f'{path}:8s'
    assert config_files.resolve('folder_preset:unet_vgg16,320') == (
        f'{config_files.CONFIGS_DIR / "folder_preset.py"}:unet_vgg16,320'
    )
    # A path stays a path (relative to the working directory or absolute).
    assert config_files.resolve('configs/fcn_voc.py:8s') == 'configs/fcn_voc.py:8s'


def test_a_folder_named_like_a_config_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'shapes_unet').mkdir()  # e.g. a workdir named after its config
    assert config_files.resolve('shapes_unet') == str(config_files.CONFIGS_DIR / 'shapes_unet.py')


@pytest.mark.parametrize('alias', sorted(config_files.ALIASES))
def test_every_alias_names_a_config(alias):
    name = config_files.ALIASES[alias].partition(':')[0]
    assert name in config_files.packaged_names()


def test_an_unknown_name_lists_the_valid_ones():
    with pytest.raises(errors.UserError) as raised:
        config_files.resolve('fcn9s_voc')
    assert "no config of the project named 'fcn9s_voc'" in raised.value.message
    assert 'fcn8s_voc' in raised.value.hint and 'folder_preset' in raised.value.hint
    assert '\n' not in errors.format_error(raised.value).split('\n', 1)[0]


def test_the_config_flag_takes_names(tmp_path):
    flag_values = flags.FlagValues()
    argv = ['prog', '--config=shapes_unet', '--config.num_train_steps=7']
    config_files.define_config_flag(flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    assert flag_values.config.model.name == 'unet'
    assert flag_values.config.num_train_steps == 7


def test_help_lists_flags_defined_by_shared_modules(monkeypatch):
    from fcn_unet_jax import predict_volume
    from fcn_unet_jax.data import build

    monkeypatch.setattr(sys, 'argv', ['predict_volume.py'])
    flag_values = flags.FlagValues()
    predict_volume.define_flags(flag_values)
    errors.define_traceback_flag(flag_values)
    console.show_flags_in_help(flag_values)
    shown = flag_values.main_module_help()
    for name in ('workdir', 'window_size', 'window_overlap', 'flip', 'scales', 'traceback'):
        assert f'--{name}' in shown or f'--[no]{name}' in shown, name
    # The usage example keeps its line breaks (a raw docstring).
    assert '\\\n        --config.dataset.name=' in build.__doc__


def test_every_verb_has_its_program():
    for verb, (module, _) in cli.VERBS.items():
        assert cli.importlib.util.find_spec(module) is not None, verb


def test_a_verb_refuses_a_flag_it_sets(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(['fcn-unet', 'eval', '--workdir=w', '--mode=train'])
    assert exited.value.code == 1
    assert (
        capsys.readouterr().err
        == 'error: fcn-unet eval sets --mode=eval; --mode=train does not go with it.\n'
    )


def test_an_unknown_verb_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(['fcn-unet', 'trian'])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown verb 'trian'")


def test_build_data_from_another_directory(tmp_path, shapes_small_data_dir, repo_root):
    # As from an installed copy: outside the clone, the clone not on PYTHONPATH, a config
    # given by absolute path (it imports its siblings as `configs.default`).
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    command = [
        sys.executable,
        '-m',
        'fcn_unet_jax.cli',
        'build-data',
        f'--config={repo_root}/configs/shapes_unet.py',
        '--config.dataset.name=shapes/small',
        f'--config.dataset.data_dir={shapes_small_data_dir}',
    ]
    process = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert process.returncode == 0, process.stderr
    assert 'shapes/small train: 1000 examples' in process.stdout
    assert 'oneDNN' not in process.stderr and 'absl::InitializeLog' not in process.stderr


@pytest.mark.parametrize('verb, help_flag', [('train', '--help'), ('predict', '--helpfull')])
def test_asking_a_verb_for_help_succeeds(verb, help_flag):
    # absl exits 1 after printing help; the programs exit 0, as a help request is no error.
    command = [sys.executable, '-m', 'fcn_unet_jax.cli', verb, help_flag]
    process = subprocess.run(command, capture_output=True, text=True)
    assert process.returncode == 0, process.stderr
    assert '--workdir' in process.stdout


def test_a_help_flag_after_double_dash_is_an_argument():
    assert errors._asks_for_help(['--config=x', '--helpshort'])
    assert not errors._asks_for_help(['--config=x', '--', '--help'])
    assert not errors._asks_for_help(['--config=x', '--helper=1'])
