"""What `--config=...` names: a config file anywhere, or a config of the project by name.

Every program's `--config` flag is defined with `define_config_flag`, a
`config_flags.DEFINE_config_file` whose parser first resolves the value:

* a path (`configs/fcn_voc.py:8s`, `/abs/path/my_config.py`), relative to the working
  directory or absolute, is loaded as it is;
* a name (`fcn_voc:8s`, `folder_preset:unet_resnet50,640`) is a module of the project's
  `configs` package, with the same `:ARG`; `ALIASES` adds one name per paper stage
  (`fcn8s_voc` is `fcn_voc:8s`). A name that is neither is a one-line error listing the
  valid names.

The project's configs import each other as `configs.<name>` (`from configs import
default`). `configs/` sits next to the `fcn_unet_jax` package, in the repository and in an
installed copy alike (setup.cfg installs it as the top-level package `configs`), so it is
found from there. A config file inside some `configs/` package folder (a clone's, or a copy
of it) makes that folder's parent importable first, so the file's own siblings are the
ones it imports, whatever the working directory.
"""

import os
import pathlib
import sys

from absl import flags
from ml_collections import config_flags

from fcn_unet_jax import errors

# The folder of the project's configs: the sibling of this package.
CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
PACKAGE = 'configs'
# One name per paper stage or depth: `--config=fcn8s_voc` for `--config=fcn_voc:8s`.
ALIASES = {
    'fcn32s_voc': 'fcn_voc:32s',
    'fcn16s_voc': 'fcn_voc:16s',
    'fcn8s_voc': 'fcn_voc:8s',
    'fcn8s_atonce_voc': 'fcn_voc:8s_atonce',
    'fcn_resnet50_voc': 'fcn_resnet_voc:50',
    'fcn_resnet101_voc': 'fcn_resnet_voc:101',
}


def packaged_names() -> list[str]:
    """The names of the project's configs (modules of `configs/`), sorted."""
    if not CONFIGS_DIR.is_dir():
        return []
    return sorted(p.stem for p in CONFIGS_DIR.glob('*.py') if p.stem != '__init__')


def valid_names() -> list[str]:
    """Every name `resolve` accepts: the packaged configs and the aliases."""
    return sorted({*packaged_names(), *ALIASES})


def _looks_like_path(name: str) -> bool:
    # A file, not any path: a folder named like a config (a workdir `shapes_unet`) in the
    # working directory must not hide the config of that name.
    return name.endswith('.py') or os.sep in name or '/' in name or os.path.isfile(name)


def make_importable(path: str | os.PathLike[str]) -> None:
    """Lets the config file at `path` import its sibling configs as `configs.<name>`.

    When the file lies in a package folder named `configs`, that folder's parent goes first
    on `sys.path` (unless a `configs` package is imported already); otherwise the project's
    own `configs/` is made importable.
    """
    folder = pathlib.Path(path).resolve().parent
    if folder.name != PACKAGE or not (folder / '__init__.py').exists():
        folder = CONFIGS_DIR
    root = str(folder.parent)
    if PACKAGE not in sys.modules and root not in sys.path:
        sys.path.insert(0, root)


def resolve(value: str) -> str:
    """The `PATH[:ARG]` that ml_collections loads for the `--config` value `value`.

    Args:
      value: `PATH[:ARG]` or `NAME[:ARG]` (see the module docstring).

    Returns:
      `value` itself for a path, else the packaged config's path with the argument.

    Raises:
      UserError: `value` is neither a path nor a valid name (the message lists the names).
    """
    name, colon, arg = value.partition(':')
    if _looks_like_path(name):
        make_importable(name)
        return value
    if name in ALIASES and not colon:
        name, colon, arg = ALIASES[name].partition(':')
    path = CONFIGS_DIR / f'{name}.py'
    if name in packaged_names():
        make_importable(path)
        return f'{path}{colon}{arg}'
    raise errors.UserError(
        f'--config={value}: no file {name!r} and no config of the project named {name!r}.',
        hint=f'valid names: {", ".join(valid_names())}; or a path to a .py file',
    )


class ResolvingParser(flags.ArgumentParser):
    """A config flag's parser with `resolve` applied to the flag's value first."""

    def __init__(self, parser: flags.ArgumentParser):
        self._parser = parser

    def parse(self, argument: str):
        """Loads the config that `argument` (a path or a name, `resolve`) gives."""
        return self._parser.parse(resolve(argument))

    def flag_type(self) -> str:
        return self._parser.flag_type()


def define_config_flag(
    name: str = 'config',
    help_string: str = 'Config: a file (PATH.py[:ARG]) or a config of the project by name '
    '(NAME[:ARG], e.g. fcn_voc:8s).',
    *,
    flag_values: flags.FlagValues = flags.FLAGS,
    sys_argv: list[str] | None = None,
) -> flags.FlagHolder:
    """Defines `--NAME` as `config_flags.DEFINE_config_file` (locked) that also takes names.

    Args:
      name: the flag's name.
      help_string: its help.
      flag_values: where to define it.
      sys_argv: the command line the `--NAME.*` overrides are read from; None: sys.argv.

    Returns:
      The flag's holder.
    """
    holder = config_flags.DEFINE_config_file(
        name, None, help_string, flag_values=flag_values, lock_config=True, sys_argv=sys_argv
    )
    flag = flag_values[name]
    flag.parser = ResolvingParser(flag.parser)
    return holder
