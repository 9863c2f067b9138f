"""Command line: convert a weights file once into a checkpoint that `config.init_from` names.

    python -m fcn_unet_jax.weights.convert --input=resnet50.pth --model=fcn_resnet50 \
        --output=weights/fcn_resnet50 [--num_classes=21] [--source=torchvision|keras]

The conversion is `weights.convert_file`: the file is read, converted for the model, checked
against it with the merge training uses, and written as an orbax checkpoint. Errors (a file
that does not fit, an output directory in use) end the program with status 1 and the full
list of problems.
"""

import argparse
import sys
from collections.abc import Sequence

from absl import logging

from fcn_unet_jax.weights.converted import SOURCES, convert_file
from fcn_unet_jax.weights.errors import WeightImportError


def main(argv: Sequence[str] | None = None) -> None:
    """Parses `argv` (default: the command line) and converts the file it names.

    Args:
        argv: the arguments without the program name.
    """
    # argparse, not absl flags: module-level absl flags would be defined by every import of
    # this module and clash with the --input/--output of fcn_unet_jax.predict.
    parser = argparse.ArgumentParser(
        prog='python -m fcn_unet_jax.weights.convert',
        description='Convert torchvision / smp / Keras weights into an orbax checkpoint.',
    )
    parser.add_argument(
        '--input', required=True, help='.pth, .pt, .npz, .safetensors, .h5 or .keras'
    )
    parser.add_argument('--model', required=True, help='model name, e.g. fcn_resnet50')
    parser.add_argument('--output', required=True, help='new directory for the checkpoint')
    parser.add_argument('--num_classes', type=int, default=None, help="the model's classes")
    parser.add_argument('--source', choices=SOURCES, default=None)
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.INFO)
    try:
        convert_file(
            args.input, args.model, args.output, num_classes=args.num_classes, source=args.source
        )
    except (WeightImportError, ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        parser.exit(1, f'error: {e}\n')
    print(f'Wrote {args.output}; start training from it with --config.init_from={args.output}')


if __name__ == '__main__':
    main(sys.argv[1:])
