"""`huge_pages`: the programs restart themselves on glibc's huge-page tunable.

The decisions (which command lines, which systems, the user's own tunables) are checked as
functions; tiny training runs through `python -m fcn_unet_jax.main` and the `fcn-unet`
command check that the restarted program is the one that trains (its run_info.json says
whether it allocated on huge pages) and that `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`
keeps it off.
"""

import pathlib
import subprocess
import sys

import pytest

from fcn_unet_jax import huge_pages
from fcn_unet_jax import workdir as workdir_files


@pytest.mark.parametrize(
    'given, expected',
    [
        (None, 'glibc.malloc.hugetlb=1'),
        ('', 'glibc.malloc.hugetlb=1'),
        ('glibc.malloc.arena_max=2', 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'),
        # A huge-page setting the user chose is theirs.
        ('glibc.malloc.hugetlb=0', 'glibc.malloc.hugetlb=0'),
        (
            'glibc.malloc.hugetlb=2:glibc.malloc.arena_max=1',
            'glibc.malloc.hugetlb=2:glibc.malloc.arena_max=1',
        ),
    ],
)
def test_the_tunable_is_added_unless_the_user_set_it(given, expected):
    assert huge_pages.tunables_with_huge_pages(given) == expected
    env = huge_pages.environment_with_huge_pages({'PATH': '/bin', 'GLIBC_TUNABLES': given or ''})
    assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': expected}


@pytest.mark.parametrize(
    'argv, expected',
    [
        (['python', '-m', 'fcn_unet_jax.main', '--workdir=w'], True),
        (['python', '-m', 'experiments.skip_ablation', '--family=fcn'], True),
        (['python', '-X', 'importtime', '-W', 'error', '-m', 'fcn_unet_jax.predict'], True),
        (['python', '-u', '-mexperiments.demo'], True),
        (['python', '-m', 'pytest', '-m', 'fcn_unet_jax.main'], False),
        (['python', '-m', 'benchmarks.model_benchmark'], False),
        (['python', '-c', 'import fcn_unet_jax'], False),
        (['python', 'script.py', '-m', 'fcn_unet_jax.main'], False),
        (['python', '-X', 'fcn_unet_jax.main'], False),
        (['python'], False),
    ],
)
def test_only_the_projects_programs_restart(argv, expected):
    assert huge_pages.is_project_program(argv) is expected


@pytest.mark.parametrize(
    'environ, platform, libc, thp_mode, expected',
    [
        ({}, 'linux', (2, 36), 'madvise', True),
        ({}, 'linux', (2, 35), 'always', True),
        ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, 'linux', (2, 36), 'madvise', True),
        # Already restarted, or the user's own choice.
        ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, 'linux', (2, 36), 'madvise', False),
        ({'GLIBC_TUNABLES': 'a=1:glibc.malloc.hugetlb=0'}, 'linux', (2, 36), 'madvise', False),
        # Where the tunable would change nothing.
        ({}, 'linux', (2, 34), 'madvise', False),
        ({}, 'linux', None, 'madvise', False),
        ({}, 'linux', (2, 36), 'never', False),
        ({}, 'linux', (2, 36), None, False),
        ({}, 'darwin', (2, 36), 'madvise', False),
    ],
)
def test_a_restart_only_where_it_helps(environ, platform, libc, thp_mode, expected):
    assert huge_pages.restart_needed(environ, platform, libc, thp_mode) is expected


def test_in_use_reads_the_tunable():
    available = huge_pages.restart_needed(
        {}, sys.platform, huge_pages.glibc_version(), huge_pages.transparent_huge_page_mode()
    )
    assert huge_pages.in_use({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}) is available
    assert not huge_pages.in_use({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})
    assert not huge_pages.in_use({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
    assert not huge_pages.in_use({})


def test_the_programs_train_after_the_restart(
    tiny_main_command, subprocess_env, repo_root, tmp_path
):
    """A run started without the tunable trains on huge pages where the system has them,
    through `python -m` and through `fcn-unet`; one whose user set it to 0 stays off."""
    expected = huge_pages.restart_needed(
        {}, sys.platform, huge_pages.glibc_version(), huge_pages.transparent_huge_page_mode()
    )
    env = {k: v for k, v in subprocess_env.items() if k != 'GLIBC_TUNABLES'}
    cli_script = pathlib.Path(sys.executable).parent / 'fcn-unet'
    steps = {'num_train_steps': 1, 'eval_every_steps': 100000, 'checkpoint_every_steps': 100000}
    module_run = tiny_main_command(tmp_path / 'module', **steps)
    command_flags = tiny_main_command(tmp_path / 'command', **steps)[3:]
    assert module_run[1:3] == ['-m', 'fcn_unet_jax.main']
    runs = {
        'module': (module_run, env),
        'opted_out': (
            tiny_main_command(tmp_path / 'opted_out', **steps),
            dict(env, GLIBC_TUNABLES='glibc.malloc.hugetlb=0'),
        ),
        'command': ([sys.executable, str(cli_script), 'train', *command_flags], env),
    }
    processes = {
        name: subprocess.Popen(
            argv,
            env=run_env,
            cwd=repo_root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (argv, run_env) in runs.items()
    }
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, (name, stderr)
    on_huge_pages = {
        name: workdir_files.read_run_info(tmp_path / name)['huge_pages'] for name in runs
    }
    assert on_huge_pages == {'module': expected, 'opted_out': False, 'command': expected}
