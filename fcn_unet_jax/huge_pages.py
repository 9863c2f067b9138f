"""The programs run on 2 MiB pages: a restart with glibc's huge-page tunable.

XLA:CPU allocates each step's buffers afresh, so on 4 KiB pages every step touches new
pages and takes hundreds of thousands of page faults. glibc's tunable
`glibc.malloc.hugetlb=1` (glibc 2.35 and later) asks the kernel for transparent huge pages
on what malloc maps, which removes most of them: the skip ablation's train loops run about
10% (U-Net) and 20% (FCN-8s) faster, with bit-identical results
(docs/performance.md, "Huge pages").

glibc reads its tunables only when a process starts, so a program cannot turn this on for
itself once it runs; it restarts instead. `restart_on_huge_pages()` replaces the process
(same PID, same arguments, same standard streams) by a fresh interpreter whose
`GLIBC_TUNABLES` has the tunable added. The programs call it before they import JAX or
TensorFlow, so the restart costs about a tenth of a second:

* `python -m fcn_unet_jax.<program>` and `python -m experiments.<program>`, from the
  packages' `__init__.py` while Python locates the program (`sys.argv[0]` is then '-m');
* the `fcn-unet` command (`cli.py`), before it runs its verb's program.

It does nothing where the restart would not help or is not wanted: not on Linux with
glibc 2.35+, transparent huge pages set to `never`, or `GLIBC_TUNABLES` already naming
`glibc.malloc.hugetlb` (so `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` turns it off; the
restarted process names it too, so it restarts at most once). Libraries and tests that
import the package are never restarted: only a command line that runs one of the
project's programs is. The benchmarks choose per measurement
(`benchmarks/model_benchmark.py --jax_huge_pages`).

Training runs record in run_info.json whether they ran on huge pages (`in_use`).
"""

import os
import sys
from collections.abc import Mapping, Sequence

TUNABLE_NAME = 'glibc.malloc.hugetlb'
TUNABLE = f'{TUNABLE_NAME}=1'
# The packages whose `python -m` programs restart (benchmarks measure both settings).
PROGRAM_PACKAGES = ('fcn_unet_jax', 'experiments')
_MIN_GLIBC = (2, 35)  # The first glibc with `glibc.malloc.hugetlb`.
_THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'
# The kernel's modes in which malloc's `madvise` gets transparent huge pages.
_THP_ON = ('always', 'madvise')
# The interpreter's options that take the next argument as their value.
_OPTIONS_WITH_VALUE = ('-W', '-X')


def _tunable_values(tunables: str | None) -> list[str]:
    """The values `glibc.malloc.hugetlb` has in the `GLIBC_TUNABLES` value `tunables`."""
    entries = (entry.partition('=') for entry in (tunables or '').split(':'))
    return [value for name, _, value in entries if name == TUNABLE_NAME]


def tunables_with_huge_pages(tunables: str | None) -> str:
    """Returns the `GLIBC_TUNABLES` value `tunables` with the huge-page tunable added.

    A value the user gave (`glibc.malloc.hugetlb=0` or `=2` included) is kept as it is.
    """
    entries = [entry for entry in (tunables or '').split(':') if entry]
    if not _tunable_values(tunables):
        entries.append(TUNABLE)
    return ':'.join(entries)


def environment_with_huge_pages(environ: Mapping[str, str]) -> dict[str, str]:
    """Returns a copy of `environ` whose `GLIBC_TUNABLES` has the huge-page tunable."""
    env = dict(environ)
    env['GLIBC_TUNABLES'] = tunables_with_huge_pages(env.get('GLIBC_TUNABLES'))
    return env


def transparent_huge_page_mode() -> str | None:
    """The kernel's transparent huge page mode ('always', 'madvise', 'never'), or None."""
    try:
        with open(_THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find('['), text.find(']')
    return text[start + 1 : end] if 0 <= start < end else None


def glibc_version() -> tuple[int, ...] | None:
    """The C library's version if it is glibc (e.g. (2, 36)), else None."""
    try:
        name, _, version = os.confstr('CS_GNU_LIBC_VERSION').partition(' ')
    except (AttributeError, ValueError, OSError):
        return None
    if name != 'glibc':
        return None
    try:
        return tuple(int(part) for part in version.split('.')[:2])
    except ValueError:
        return None


def _glibc_honours_the_tunable(platform: str, libc: tuple[int, ...] | None) -> bool:
    return platform == 'linux' and libc is not None and libc >= _MIN_GLIBC


def is_project_program(orig_argv: Sequence[str]) -> bool:
    """Whether the command line `orig_argv` runs a program of `PROGRAM_PACKAGES` with -m."""
    arguments = iter(orig_argv[1:])
    for argument in arguments:
        if argument in _OPTIONS_WITH_VALUE:
            next(arguments, None)  # `-X importtime`, `-W error`: the value is not the module.
        elif argument == '-m':
            return next(arguments, '').split('.')[0] in PROGRAM_PACKAGES
        elif argument.startswith('-m'):  # `-mfcn_unet_jax.main`
            return argument[2:].split('.')[0] in PROGRAM_PACKAGES
        elif argument in ('-c', '-') or not argument.startswith('-'):
            return False  # A script, `-c` code or stdin: not a program of ours.
    return False


def restart_needed(
    environ: Mapping[str, str],
    platform: str,
    libc: tuple[int, ...] | None,
    thp_mode: str | None,
) -> bool:
    """Whether a process with `environ` on this system gains by restarting on huge pages."""
    if not _glibc_honours_the_tunable(platform, libc) or thp_mode not in _THP_ON:
        return False
    return not _tunable_values(environ.get('GLIBC_TUNABLES'))


def restart_on_huge_pages() -> None:
    """Replaces this process by the same command line on huge pages, where that helps.

    Returns (and changes nothing) when `restart_needed` says no; otherwise does not return.
    Call it before the program has written anything it needs, since the process is
    replaced: buffered standard output is flushed first.
    """
    if not restart_needed(os.environ, sys.platform, glibc_version(), transparent_huge_page_mode()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # argv[0] is the interpreter the program runs in (its virtual environment included);
    # the rest is the command line as given, interpreter options and all.
    os.execve(
        sys.executable,
        [sys.executable, *sys.orig_argv[1:]],
        environment_with_huge_pages(os.environ),
    )


def restart_program_on_huge_pages() -> None:
    """`restart_on_huge_pages()` for a `python -m` program of the project, else nothing.

    For the packages' `__init__.py`: it runs whenever the package is imported, and only a
    command line that runs one of the project's programs may be restarted.
    """
    if is_project_program(sys.orig_argv):
        restart_on_huge_pages()


def in_use(environ: Mapping[str, str] | None = None) -> bool:
    """Whether malloc asks for huge pages in a process with `environ` (default: this one).

    True when `GLIBC_TUNABLES` sets `glibc.malloc.hugetlb` to 1 or 2 and this system's
    glibc and kernel honour it. Training runs record it in run_info.json
    (`workdir.run_info`), since it changes their wall time.
    """
    environ = os.environ if environ is None else environ
    if not _glibc_honours_the_tunable(sys.platform, glibc_version()):
        return False
    values = _tunable_values(environ.get('GLIBC_TUNABLES'))
    if not values or values[-1] not in ('1', '2'):
        return False
    # 2 = reserved hugetlbfs pages, which need no transparent huge pages.
    return values[-1] == '2' or transparent_huge_page_mode() in _THP_ON
