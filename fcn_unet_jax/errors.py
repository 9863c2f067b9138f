"""User errors: the one exception type for bad input, and how every program reports it.

An error the user can fix (a config field, a flag, a data file, a workdir that does not fit
the command) is raised as `UserError(message, hint=...)`. The message names the file, field
or value and what was expected; the optional hint says what to do. Every entry point
(`fcn_unet_jax.main`, `.predict`, `.predict_volume`, `.data.build`, `.weights.convert`,
`experiments.demo`, `.replicate`, `.skip_ablation`, and the `benchmarks/` programs) runs its
`main` through this module: absl programs as
`app.run(errors.guard(main), flags_parser=errors.parse_flags)`, argparse ones inside
`with errors.handled(...)`. They print

    error: <message>
    hint: <hint>

on stderr (the hint line only when there is one) and exit with status `EXIT_CODE`, without
a traceback. Add `--traceback` to the command line to get the traceback as well (it is
printed before the error line). Any other exception is a bug and keeps its traceback,
unless the program names its type as an input error too (the weights converter's import
errors, a run directory missing for `experiments.replicate`).

Flag parsing goes through the same path: a malformed or unknown flag, a missing required
flag, a config file that fails to load (`config_of` reports the failures ml_collections
defers to the config's first use) and an override of a config field that does not exist
(`--config.nonexistent=1`, which names the field and the closest valid field names) are
user errors too.

`UserError` is a `ValueError`, so code that catches ValueError (or tests that expect one)
keeps working; `MissingInputError` is also a `FileNotFoundError` (a file or folder that
does not exist) and `MissingDependencyError` an `ImportError` (an optional package the input
needs).
"""

import contextlib
import difflib
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from absl import flags

from fcn_unet_jax import console

EXIT_CODE = 1
TRACEBACK_FLAG = 'traceback'
# Close matches listed for a misspelt config field.
_MAX_SUGGESTIONS = 5


class UserError(ValueError):
    """An error in the user's input: a config field, flag, data file or workdir.

    Attributes:
      message: what is wrong, naming the file, field or value and what was expected.
      hint: what to do about it, or None.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a command needs) does not exist."""


class MissingDependencyError(UserError, ImportError):
    """An optional package the input needs is not installed (the message says how to)."""


def format_error(error: BaseException) -> str:
    """The lines a program prints for `error`: `error: ...` and, for a `UserError`, its hint."""
    message = error.message if isinstance(error, UserError) else str(error)
    lines = [f'error: {message}']
    hint = getattr(error, 'hint', None)
    if hint:
        lines.append(f'hint: {hint}')
    return '\n'.join(lines)


def traceback_requested(
    argv: Sequence[str] | None = None, flag_values: flags.FlagValues | None = None
) -> bool:
    """Whether the command line asks for tracebacks (`--traceback`).

    Reads the parsed flag when it is defined and parsed, else looks at `argv` (default
    `sys.argv`), since flag parsing itself may be what failed.

    Args:
      argv: the command line.
      flag_values: the program's flags; None: absl's global FLAGS.
    """
    flag_values = flags.FLAGS if flag_values is None else flag_values
    if TRACEBACK_FLAG in flag_values and flag_values.is_parsed():
        return bool(flag_values[TRACEBACK_FLAG].value)
    argv = sys.argv if argv is None else argv
    return any(arg in ('--traceback', '--traceback=true', '--traceback=True') for arg in argv)


def exit_with(error: BaseException, *, show_traceback: bool = False) -> NoReturn:
    """Prints `error` as `format_error` does (after its traceback, when asked) and exits.

    Raises:
      SystemExit: always, with `EXIT_CODE`.
    """
    sys.stdout.flush()
    if show_traceback:
        traceback.print_exception(error)
    print(format_error(error), file=sys.stderr, flush=True)
    sys.exit(EXIT_CODE)


@contextlib.contextmanager
def handled(
    *,
    show_traceback: bool | None = None,
    user_errors: tuple[type[BaseException], ...] = (),
    flag_values: flags.FlagValues | None = None,
) -> Iterator[None]:
    """Turns a `UserError` (or one of `user_errors`) raised in the block into `exit_with`.

    Args:
      show_traceback: print the traceback too; None reads `traceback_requested()`.
      user_errors: further exception types this program reports as user errors.
      flag_values: the flags `traceback_requested` reads; None: absl's global FLAGS.
    """
    try:
        yield
    except (UserError, *user_errors) as error:
        if show_traceback is None:
            show_traceback = traceback_requested(flag_values=flag_values)
        exit_with(error, show_traceback=show_traceback)


def guard(
    main: Callable[..., Any],
    *,
    user_errors: tuple[type[BaseException], ...] = (),
    flag_values: flags.FlagValues | None = None,
) -> Callable[..., Any]:
    """`main` (an absl main) with its user errors reported by `handled`.

    Args:
      main: the function to guard; its arguments pass through.
      user_errors: further exception types this program reports as user errors.
      flag_values: the program's flags (for `--traceback`); None: absl's global FLAGS.
    """

    def guarded(*args, **kwargs) -> Any:
        with handled(user_errors=user_errors, flag_values=flag_values):
            return main(*args, **kwargs)

    guarded.__doc__ = main.__doc__
    return guarded


def _config_flag_names(flag_values: flags.FlagValues) -> list[str]:
    """Names of the defined `config_flags` flags (their overrides are `--NAME.path=value`)."""
    names = []
    for name in flag_values:
        # ml_collections' flag class is private; its name is the stable part.
        if type(flag_values[name]).__name__ == '_ConfigFlag' and name not in names:
            names.append(name)
    return names


def _field_paths(config: Any, prefix: str = '') -> list[str]:
    """Every dotted field path of a ConfigDict, sections and leaves."""
    paths = []
    for key in config:
        path = f'{prefix}{key}'
        paths.append(path)
        value = config[key]
        if hasattr(value, 'keys') and hasattr(value, 'get_ref'):  # A ConfigDict section.
            paths += _field_paths(value, f'{path}.')
    return paths


def unknown_field_error(config: Any, path: str, source: str) -> UserError | None:
    """The error for an override of `path` in `config`, or None when the field exists.

    Args:
      config: the loaded ConfigDict.
      path: the dotted field path of the override (`model.widht`); `[i]` indices allowed.
      source: how the user named it, for the message (`--config.model.widht=2`).

    Returns:
      A UserError naming the first missing field and listing the closest valid paths.
    """
    node, walked = config, []
    for part in re.sub(r'\[\d+\]', '', path).split('.'):
        is_section = hasattr(node, 'keys') and hasattr(node, 'get_ref')
        if is_section and part in node:
            node, walked = node[part], [*walked, part]
            continue
        if not is_section and walked:
            return UserError(
                f'{source}: config field {".".join(walked)!r} is a value, not a section with a '
                f'field {part!r}.'
            )
        missing = '.'.join([*walked, part])
        candidates = _field_paths(config)
        close = difflib.get_close_matches(missing, candidates, n=_MAX_SUGGESTIONS, cutoff=0.6)
        siblings = sorted(node.keys()) if is_section else []
        close += [
            '.'.join([*walked, s])
            for s in difflib.get_close_matches(part, siblings, n=_MAX_SUGGESTIONS, cutoff=0.5)
        ]
        # A section the path runs through is no suggestion for a field inside it.
        close = [c for c in dict.fromkeys(close) if not missing.startswith(c + '.')]
        close = close[:_MAX_SUGGESTIONS]
        if close:
            hint = f'closest valid fields: {", ".join(close)}'
        else:
            where = f'config.{".".join(walked)}' if walked else 'the config'
            hint = f'valid fields of {where}: {", ".join(siblings)}'
        return UserError(f'{source}: the config has no field {missing!r}.', hint=hint)
    return None


def _override_error(argv: Sequence[str], flag_values: flags.FlagValues) -> UserError | None:
    """The error for the first `--CONFIG.path=value` in `argv` that names no field."""
    for name in _config_flag_names(flag_values):
        config_args = [a for a in argv if re.match(rf'^--?{re.escape(name)}(=|$)', a)]
        if not config_args:
            continue
        argument = config_args[-1].partition('=')[2]
        try:
            config = flag_values[name].parser.parse(argument)
            config.keys()  # The stand-in for a failed load raises on any attribute.
        except OSError as error:
            return _load_error(f'--{name}={argument}', error)
        except UserError as error:  # A config name that names nothing (config_files).
            return error
        except Exception:  # The config file raised: reported as flag parsing reports it.
            return None
        for arg in argv:
            match = re.match(rf'^--?(?:no)?{re.escape(name)}\.([^=]+)', arg)
            if match:
                error = unknown_field_error(config, match.group(1), arg)
                if error is not None:
                    return error
    return None


# absl's help flags: each prints its help and exits.
HELP_FLAGS = ('-?', '--help', '--helpshort', '--helpfull', '--helpxml')


def _asks_for_help(args: Sequence[str]) -> bool:
    """Whether a command line (program name excluded) holds one of absl's help flags."""
    for arg in args:
        if arg == '--':  # Flag parsing stops here.
            return False
        if arg in HELP_FLAGS or arg.startswith(('--help=', '--helpfull=', '--helpshort=')):
            return True
    return False


def parse_flags(argv: list[str], flag_values: flags.FlagValues | None = None) -> list[str]:
    """absl's flag parsing for `app.run(flags_parser=...)`, with errors as one line.

    Defines `--traceback` first (see `define_traceback_flag`) and makes `--help` list all
    the program's flags; once the flags are parsed, sets up the program's output
    (`console.configure_logging`).

    Args:
      argv: the full command line, program name first.
      flag_values: the flags to parse into; None: absl's global FLAGS.

    Returns:
      The arguments that are not flags (program name first), as `app.run` expects.

    Raises:
      SystemExit: for a bad flag (see the module docstring), after printing it.
    """
    flag_values = flags.FLAGS if flag_values is None else flag_values
    define_traceback_flag(flag_values)
    console.show_flags_in_help(flag_values)
    try:
        remaining = flag_values(argv)
    except SystemExit as stop:
        # absl exits 1 after printing the help it was asked for; asking is not a failure.
        if stop.code == 1 and _asks_for_help(argv[1:]):
            raise SystemExit(0) from None
        raise
    except Exception as error:  # Flag parsing only handles the user's command line.
        user_error = _override_error(argv[1:], flag_values)
        if user_error is None:
            # ml_collections spreads one error over several lines, and an error raised inside
            # a config file comes with that file's traceback: its first and last lines tell.
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            hint = 'run with --helpshort for the flags'
            if any(line.startswith('Traceback (most recent call last)') for line in lines):
                lines, hint = [lines[0], lines[-1]], None
            message = ' '.join(lines) or type(error).__name__
            if not isinstance(error, flags.Error):
                message = f'{type(error).__name__} while reading the flags: {message}'
                hint = None
            user_error = UserError(message, hint=hint)
        user_error.__cause__ = error
        exit_with(user_error, show_traceback=traceback_requested(argv, flag_values))
    console.configure_logging(flag_values)  # Every program's flags pass here.
    return remaining


def config_of(flag_values: flags.FlagValues, name: str = 'config') -> Any:
    """The ConfigDict of a `config_flags` flag; a config file that did not load is a UserError.

    ml_collections defers a failed load (a missing file, an error inside it) to the first
    use of the config, as an OSError; this names the file and the cause in one line.

    Args:
      flag_values: the parsed flags.
      name: the config flag's name.

    Returns:
      The config, or None when the flag has no value.
    """
    config = flag_values[name].value
    try:
        if config is not None:
            config.keys()  # The stand-in for a failed load raises on any attribute.
    except OSError as error:
        raise _load_error(flag_values[name].serialize(), error) from error
    return config


def _load_error(flag: str, error: OSError) -> UserError:
    """The error for a config file that could not be loaded (`flag` as given: --config=...)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    name = flag.lstrip('-').partition('=')[0]
    return UserError(
        f'Cannot load the config file of {flag}: {lines[-1] if lines else error}',
        hint=f'give --{name}=PATH.py[:ARG], relative to the working directory or absolute',
    )


def define_traceback_flag(flag_values: flags.FlagValues | None = None) -> None:
    """Defines `--traceback` (once), which makes `guard` print tracebacks of user errors.

    Args:
      flag_values: where; None: absl's global FLAGS.
    """
    flag_values = flags.FLAGS if flag_values is None else flag_values
    if TRACEBACK_FLAG not in flag_values:
        flags.DEFINE_bool(
            TRACEBACK_FLAG,
            False,
            'Print the traceback of an input error, not only its line.',
            flag_values=flag_values,
        )
