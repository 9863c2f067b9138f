"""Every bad input of issue 24 through the real entry point: one line, status 1, no harm.

Each row runs a program's flag parsing and `main` the way `python -m` does (`errors`'s
`parse_flags` and `guard`, on the program's own flags), in process and in a fresh
`FlagValues`, so rows cost no interpreter start-up; one runs a real subprocess to check the
`__main__` wiring. Each asserts the `error:` line (and the `hint:` line where there is
one), the exit status, that no traceback is printed, and that the folder the command works
in holds exactly the same files and folders, of the same sizes, afterwards: nothing created
(no empty workdir, dataset or output folder), nothing moved or lost.
"""

import pathlib
import shutil
import subprocess
import sys

import pytest
from absl import flags
from PIL import Image

from fcn_unet_jax import errors, predict, predict_volume
from fcn_unet_jax import main as main_program
from fcn_unet_jax import workdir as workdir_files
from fcn_unet_jax.data import build as build_program
from fcn_unet_jax.data.builders import folder

pytestmark = pytest.mark.usefixtures('fast_compile')


def snapshot(root: pathlib.Path) -> dict[str, int]:
    """Every file (its size) and folder (-1) under `root`."""
    return {
        str(p.relative_to(root)): p.stat().st_size if p.is_file() else -1
        for p in sorted(root.rglob('*'))
    }


def run_program(module, argv: list[str], capsys) -> tuple[int, list[str]]:
    """Runs `module`'s flags and main on `argv` as its `__main__` does; (status, stderr lines).

    The program's flags go to a fresh FlagValues, so programs that share flag names
    (--config, --workdir) run side by side in one test process.
    """
    flag_values = flags.FlagValues()
    argv = [module.__name__, *argv]
    if module in (main_program, build_program):
        module.define_flags(flag_values, sys_argv=argv)
    else:
        module.define_flags(flag_values)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        rest = errors.parse_flags(argv, flag_values)
        errors.guard(module.main, flag_values=flag_values)(rest, flag_values)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def assert_one_error(lines: list[str], *expected: str, hint: str | None = None) -> None:
    """The output ends with `error: ...` holding every `expected` text (and the hint line)."""
    error_lines = [line for line in lines if line.startswith('error: ')]
    assert len(error_lines) == 1, lines
    assert not any('Traceback' in line for line in lines), lines
    for text in expected:
        assert text in error_lines[0], error_lines[0]
    if hint is None:
        assert lines[-1] == error_lines[0]
    else:
        assert lines[-1].startswith('hint: ') and hint in lines[-1], lines[-1]


@pytest.fixture
def run_copy(tiny_trained_run, tmp_path) -> pathlib.Path:
    """A copy of the session's finished tiny run (4 steps, width 1/16, 4 classes)."""
    return pathlib.Path(shutil.copytree(tiny_trained_run.workdir, tmp_path / 'run'))


def main_argv(tiny_main_command, workdir, *extra: str, **overrides) -> list[str]:
    """The flags of `python -m fcn_unet_jax.main` for the tiny run (no interpreter, module)."""
    return tiny_main_command(workdir, *extra, **overrides)[3:]


def test_nonexistent_override_names_the_field_and_the_valid_ones(
    tiny_main_command, tmp_path, capsys
):
    argv = main_argv(tiny_main_command, tmp_path / 'new', '--config.nonexistent=1')
    status, lines = run_program(main_program, argv, capsys)
    assert status == errors.EXIT_CODE
    assert_one_error(
        lines,
        "--config.nonexistent=1: the config has no field 'nonexistent'",
        hint='valid fields of the config: batch_size, checkpoint_every_steps, dataset',
    )
    argv = main_argv(tiny_main_command, tmp_path / 'new', '--config.model.widht=0.5')
    status, lines = run_program(main_program, argv, capsys)
    assert_one_error(lines, "no field 'model.widht'", hint='closest valid fields: model.width')
    assert not list(tmp_path.iterdir())


def test_config_files_that_do_not_load(tiny_main_command, tmp_path, capsys, repo_root):
    argv = main_argv(tiny_main_command, tmp_path / 'new')
    missing = [f'--config={tmp_path}/nope.py', *argv[1:]]
    status, lines = run_program(main_program, missing, capsys)
    assert status == errors.EXIT_CODE
    assert_one_error(
        lines,
        f'Cannot load the config file of --config={tmp_path}/nope.py',
        'No such file or directory',
        hint='--config=PATH.py[:ARG]',
    )
    failing = [f'--config={repo_root}/configs/fcn_voc.py:bogus', f'--workdir={tmp_path}/new']
    status, lines = run_program(main_program, failing, capsys)
    assert_one_error(lines, 'ValueError: configs/fcn_voc.py takes one of 32s, 16s')
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ('extra', 'changed', 'hint'),
    [
        (('--config.model.width=0.125',), 'model.width 0.0625 -> 0.125', '--restart_from_scratch'),
        (
            ('--config.model.num_classes=3', '--config.model.name=unet_vgg16'),
            "model.name 'unet' -> 'unet_vgg16', model.num_classes 4 -> 3",
            '--restart_from_scratch',
        ),
        (
            ('--config.model.width=0.125', '--mode=eval'),
            'model.width 0.0625 -> 0.125',
            'evaluate with the config the run was trained with',
        ),
    ],
)
def test_a_config_that_does_not_fit_the_workdir_changes_nothing(
    run_copy, tiny_main_command, capsys, extra, changed, hint
):
    before = snapshot(run_copy)
    status, lines = run_program(
        main_program, main_argv(tiny_main_command, run_copy, *extra), capsys
    )
    assert status == errors.EXIT_CODE
    assert_one_error(lines, f'The run in {run_copy}', changed, hint=hint)
    assert snapshot(run_copy) == before


def test_eval_of_an_unknown_split_changes_nothing(run_copy, tiny_main_command, capsys):
    before = snapshot(run_copy)
    argv = main_argv(tiny_main_command, run_copy, '--mode=eval', '--split=bogus')
    status, lines = run_program(main_program, argv, capsys)
    assert status == errors.EXIT_CODE
    assert_one_error(lines, "split='bogus'", 'it has train', hint='--split')
    assert snapshot(run_copy) == before


def test_a_failed_start_creates_no_workdir(tiny_main_command, tmp_path, capsys):
    argv = main_argv(tiny_main_command, tmp_path / 'new', **{'model.num_classes': 3})
    status, lines = run_program(main_program, argv, capsys)
    assert status == errors.EXIT_CODE
    assert_one_error(
        lines,
        'config.model.num_classes=3 but dataset shapes/small has 4 classes',
        hint='--config.model.num_classes=4',
    )
    argv = main_argv(tiny_main_command, tmp_path / 'new', **{'dataset.eval_split': 'valdation'})
    status, lines = run_program(main_program, argv, capsys)
    assert_one_error(
        lines,
        "config.dataset.eval_split='valdation'",
        'it has train',
        hint='--config.dataset.eval_split',
    )
    assert not list(tmp_path.iterdir())


def test_eval_without_a_checkpoint_creates_nothing(tiny_main_command, tmp_path, capsys):
    argv = main_argv(tiny_main_command, tmp_path / 'new', '--mode=eval')
    status, lines = run_program(main_program, argv, capsys)
    assert status == errors.EXIT_CODE
    assert_one_error(lines, f'No checkpoint in {tmp_path}/new/checkpoints', hint='train first')
    assert not list(tmp_path.iterdir())


def test_traceback_on_request(tiny_main_command, tmp_path, capsys):
    argv = main_argv(tiny_main_command, tmp_path, '--config.nonexistent=1', '--traceback')
    status, lines = run_program(main_program, argv, capsys)
    assert status == errors.EXIT_CODE
    assert any('Traceback' in line for line in lines)
    assert lines[-2].startswith('error: ') and lines[-1].startswith('hint: ')


def test_predict_with_a_checkpoint_of_another_model(run_copy, tmp_path, capsys):
    # A config.json that is not the one the checkpoint was trained with.
    config = workdir_files.read_json(run_copy / 'config.json')
    config['model']['num_classes'] = 3
    workdir_files.write_json(run_copy / 'config.json', config)
    Image.new('RGB', (8, 8)).save(tmp_path / 'image.png')
    before = snapshot(tmp_path)
    argv = [f'--workdir={run_copy}', f'--input={tmp_path}/image.png', f'--output={tmp_path}/out']
    status, lines = run_program(predict, argv, capsys)
    assert status == errors.EXIT_CODE
    assert_one_error(
        lines,
        f'The checkpoint of step 4 in {run_copy} does not fit this config',
        'trained -> asked: model.num_classes 4 -> 3',
        hint='config.json must be the config its checkpoints were trained with',
    )
    assert snapshot(tmp_path) == before


def test_predict_of_an_undecodable_image_names_it(tiny_trained_run, tmp_path, capsys):
    (tmp_path / 'notes.png').write_text('a text file, not an image')
    before = snapshot(tmp_path)
    argv = [
        f'--workdir={tiny_trained_run.workdir}',
        f'--input={tmp_path}/notes.png',
        f'--output={tmp_path}/out',
    ]
    status, lines = run_program(predict, argv, capsys)
    assert status == errors.EXIT_CODE
    assert_one_error(
        lines,
        f'nothing was written to {tmp_path}/out: {tmp_path}/notes.png: not an image file',
    )
    assert snapshot(tmp_path) == before


def test_predict_volume_split_of_a_run_on_images(tiny_trained_run, tmp_path, capsys):
    argv = [f'--workdir={tiny_trained_run.workdir}', '--split=validation', f'--output={tmp_path}/o']
    status, lines = run_program(predict_volume, argv, capsys)
    assert status == errors.EXIT_CODE
    assert_one_error(lines, "this run is on 'shapes/small'", hint='--input')
    assert not list(tmp_path.iterdir())


def _build_argv(data_dir, *fields: str) -> list[str]:
    return ['--config=configs/default.py', f'--config.dataset.data_dir={data_dir}', *fields]


def test_build_of_an_empty_folder(tmp_path, capsys, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    root = tmp_path / 'root'
    (root / 'images').mkdir(parents=True)
    (root / 'masks').mkdir()
    before = snapshot(tmp_path)
    argv = _build_argv(
        tmp_path / 'tfds', '--config.dataset.name=folder', f'--config.dataset.folder_root={root}'
    )
    status, lines = run_program(build_program, argv, capsys)
    assert status == errors.EXIT_CODE
    assert_one_error(lines, f'folder {root} has no examples: {root}/masks holds no mask', hint='')
    assert snapshot(tmp_path) == before


def test_build_with_a_text_file_named_png(tmp_path, capsys, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    root = tmp_path / 'root'
    (root / 'images').mkdir(parents=True)
    (root / 'masks').mkdir()
    (root / 'images' / 'a.png').write_text('not an image')
    Image.new('L', (8, 8)).save(root / 'masks' / 'a.png')
    before = snapshot(tmp_path)
    argv = _build_argv(
        tmp_path / 'tfds',
        '--config.dataset.name=folder',
        f'--config.dataset.folder_root={root}',
        '--config.dataset.folder_val_fraction=0',
    )
    status, lines = run_program(build_program, argv, capsys)
    assert status == errors.EXIT_CODE
    assert_one_error(
        lines, f'Cannot decode image {root}/images/a.png: not an image file Pillow can decode'
    )
    assert snapshot(tmp_path) == before


def test_build_of_a_volume_split_that_would_be_empty(tmp_path, capsys, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    root = tmp_path / 'volumes'
    (root / 'images').mkdir(parents=True)
    (root / 'labels').mkdir()
    # Two cases that both land in train with the default fraction 0.2; splitting happens
    # before any volume is read, so empty files do.
    cases = [c for c in (f'case{i}' for i in range(50)) if folder.stem_fraction(c) > 0.3][:2]
    for case in cases:
        (root / 'images' / f'{case}.nii.gz').touch()
        (root / 'labels' / f'{case}.nii.gz').touch()
    needed = min(folder.stem_fraction(c) for c in cases)
    before = snapshot(tmp_path)
    argv = _build_argv(
        tmp_path / 'tfds', '--config.dataset.name=volumes', f'--config.dataset.volume_root={root}'
    )
    status, lines = run_program(build_program, argv, capsys)
    assert status == errors.EXIT_CODE
    assert_one_error(
        lines,
        f"volumes {root}: split 'validation' would have no case",
        'config.dataset.volume_val_fraction=0.2 of 2 case(s)',
        hint=f'add {root}/splits/train.txt and val.txt, or set '
        f'--config.dataset.volume_val_fraction={int(needed * 100 + 1) / 100:.2f} or more',
    )
    assert snapshot(tmp_path) == before


def test_convert_of_a_missing_file(tmp_path, capsys):
    from fcn_unet_jax.weights import convert

    with pytest.raises(SystemExit) as exit_info:
        convert.run([f'--input={tmp_path}/missing.pth', '--model=unet', f'--output={tmp_path}/out'])
    assert exit_info.value.code == errors.EXIT_CODE
    assert_one_error(capsys.readouterr().err.strip().splitlines(), 'missing.pth')
    assert not list(tmp_path.iterdir())


def test_a_program_prints_one_line(tmp_path, subprocess_env, repo_root):
    # The `__main__` wiring, in a real process (every program has the same two lines).
    command = [sys.executable, '-m', 'experiments.replicate', f'--runs={tmp_path}/missing']
    process = subprocess.run(
        [*command, f'--output={tmp_path}/out'],
        env=subprocess_env,
        cwd=repo_root,
        capture_output=True,
        text=True,
    )
    assert process.returncode == errors.EXIT_CODE
    assert process.stderr.strip().splitlines()[-1] == (
        f"error: Run directory '{tmp_path}/missing' does not exist."
    )
    assert 'Traceback' not in process.stderr
    assert not list(tmp_path.iterdir())
