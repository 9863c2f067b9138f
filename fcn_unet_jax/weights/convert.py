r"""Command line: convert a weights file once into a checkpoint that `config.init_from` names.

    fcn-unet convert-weights --input=resnet50.pth --model=fcn_resnet50 \
        --output=weights/fcn_resnet50 [--num_classes=21] [--source=torchvision|keras]

(or `python -m fcn_unet_jax.weights.convert` with the same flags). The conversion is
`weights.convert_file`: the file is read, converted for the model, checked against it with
the merge training uses, and written as an orbax checkpoint. Errors (a file that does not
fit, an output directory in use, a missing file) end the program with status 1 and an
`error: ...` line (see `fcn_unet_jax.errors`); a file that does not fit is followed by its
full list of problems, so it can be fixed in one round. `--traceback` adds the traceback.
"""

from collections.abc import Sequence

from absl import app, flags

from fcn_unet_jax import errors
from fcn_unet_jax.weights.converted import SOURCES, convert_file
from fcn_unet_jax.weights.errors import WeightImportError

FLAGS = flags.FLAGS
# The weights importer raises ValueErrors (WeightImportError among them) and the standard
# file errors for what the user gave; all are input errors here.
INPUT_ERRORS = (WeightImportError, ValueError, FileNotFoundError, FileExistsError, ImportError)


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines the program's flags (when run as a program, or in a test's own FlagValues).

    Not at import, so that importing this module next to `fcn_unet_jax.predict` (which has
    --input and --output too) cannot clash.
    """
    fv = {'flag_values': flag_values}
    flags.DEFINE_string(
        'input', None, 'The weights file: .pth, .pt, .npz, .safetensors, .h5, .keras.', **fv
    )
    flags.DEFINE_string('model', None, 'The model it is converted for, e.g. fcn_resnet50.', **fv)
    flags.DEFINE_string('output', None, 'New directory for the converted checkpoint.', **fv)
    flags.DEFINE_integer(
        'num_classes', None, "The model's class count (default: the file's).", **fv
    )
    flags.DEFINE_enum(
        'source', None, list(SOURCES), 'Where the file comes from (default: guessed).', **fv
    )
    flags.mark_flags_as_required(['input', 'model', 'output'], flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = FLAGS) -> None:
    """Converts the file the flags name.

    Args:
      argv: the arguments left after flag parsing (the program name only).
      flag_values: the parsed flags (`define_flags`).
    """
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    fv = flag_values
    convert_file(fv.input, fv.model, fv.output, num_classes=fv.num_classes, source=fv.source)
    print(f'Wrote {fv.output}; start training from it with --config.init_from={fv.output}')


def run(args: Sequence[str]) -> None:
    """The program on `args` (its flags, without the program name), in its own FlagValues.

    For tests and scripts: the same parsing, errors and exit status as the command line.

    Raises:
      SystemExit: for an input error (after its `error: ...` line) or a bad flag.
    """
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    rest = errors.parse_flags(['fcn-unet convert-weights', *args], flag_values)
    errors.guard(main, user_errors=INPUT_ERRORS, flag_values=flag_values)(rest, flag_values)


if __name__ == '__main__':
    define_flags()
    app.run(errors.guard(main, user_errors=INPUT_ERRORS), flags_parser=errors.parse_flags)
