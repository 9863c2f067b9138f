r"""The `fcn-unet` command: one verb per program, from any directory.

    fcn-unet train --config=folder_preset:unet_resnet50,320 --workdir=runs/mine \
        --config.dataset.folder_root=/data/mine
    fcn-unet eval --config=... --workdir=runs/mine [--split=test]
    fcn-unet predict --workdir=runs/mine --input=photos/ --output=masks/
    fcn-unet VERB --help

Each verb runs its program exactly as `python -m MODULE` does (same flags, same help, same
exit status), so both forms keep working:

    verb              program (python -m ...)
    train, eval       fcn_unet_jax.main (eval adds --mode=eval)
    predict           fcn_unet_jax.predict
    predict-volume    fcn_unet_jax.predict_volume
    build-data        fcn_unet_jax.data.build
    convert-weights   fcn_unet_jax.weights.convert
    download-weights  fcn_unet_jax.weights.download
    export            fcn_unet_jax.export
    demo              experiments.demo
    replicate         experiments.replicate
    skip-ablation     experiments.skip_ablation

`--config` takes a file (`PATH.py[:ARG]`, relative or absolute) or the name of one of the
project's configs (`NAME[:ARG]`, e.g. `fcn_voc:8s` or `fcn8s_voc`; see
`fcn_unet_jax.config_files`).
"""

import importlib.util
import runpy
import sys
from collections.abc import Sequence

from fcn_unet_jax import console, huge_pages

PROGRAM = 'fcn-unet'
# verb -> (module, flags the verb adds in front of the user's).
VERBS = {
    'train': ('fcn_unet_jax.main', ()),
    'eval': ('fcn_unet_jax.main', ('--mode=eval',)),
    'predict': ('fcn_unet_jax.predict', ()),
    'predict-volume': ('fcn_unet_jax.predict_volume', ()),
    'build-data': ('fcn_unet_jax.data.build', ()),
    'convert-weights': ('fcn_unet_jax.weights.convert', ()),
    'download-weights': ('fcn_unet_jax.weights.download', ()),
    'export': ('fcn_unet_jax.export', ()),
    'demo': ('experiments.demo', ()),
    'replicate': ('experiments.replicate', ()),
    'skip-ablation': ('experiments.skip_ablation', ()),
}
_SUMMARIES = {
    'train': 'train a config in a workdir (rerun to resume)',
    'eval': "evaluate a workdir's newest checkpoint",
    'predict': 'segment image files with a trained run',
    'predict-volume': 'segment NIfTI / DICOM volumes with a trained run',
    'build-data': 'prepare the dataset a config names',
    'convert-weights': 'convert torchvision / Keras / smp weights for a model',
    'download-weights': 'download and convert published ImageNet weights',
    'export': "export a run's inference function (StableHLO, SavedModel)",
    'demo': 'train and render the two small demo models',
    'replicate': 'compare finished runs with the papers',
    'skip-ablation': 'the skip-connection ablation sweep',
}


def usage() -> str:
    """The command's help: its verbs and what each does."""
    width = max(len(verb) for verb in VERBS)
    lines = [
        f'usage: {PROGRAM} VERB [--flag=value ...]',
        f'       {PROGRAM} VERB --help    (the flags of VERB)',
        '',
        'verbs:',
    ]
    lines += [f'  {verb:<{width}}  {_SUMMARIES[verb]}' for verb in VERBS]
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the program of the verb in `argv` (default: the command line) with its flags.

    Args:
      argv: the command line, program name first; None = `sys.argv`, and then the
        process restarts on huge pages first where that helps (`huge_pages.py`).

    Raises:
      SystemExit: with the program's exit status; 1 and a one-line error for an unknown
        verb; 0 after the usage for `--help` (or no verb).
    """
    from_command_line = argv is None
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ('-h', '--help', 'help'):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 1)
    verb, rest = argv[1], argv[2:]
    if verb not in VERBS:
        print(
            f'error: unknown verb {verb!r} of {PROGRAM}; one of: {", ".join(VERBS)}',
            file=sys.stderr,
        )
        sys.exit(1)
    module, extra = VERBS[verb]
    for flag in extra:  # The verb's own flags are not the user's to change.
        name = flag.partition('=')[0]
        given = [arg for arg in rest if arg == name or arg.startswith(f'{name}=')]
        if given:
            print(
                f'error: {PROGRAM} {verb} sets {flag}; {given[0]} does not go with it.',
                file=sys.stderr,
            )
            sys.exit(1)
    if from_command_line:
        # Before anything imports JAX or TensorFlow, as `python -m` programs do
        # (fcn_unet_jax/__init__.py); a caller's own process is never replaced.
        huge_pages.restart_on_huge_pages()
    console.silence_native_logs()  # Before anything imports TensorFlow.
    if importlib.util.find_spec(module) is None:
        print(
            f'error: {PROGRAM} {verb} needs the module {module}, which this installation '
            'does not have.',
            file=sys.stderr,
        )
        sys.exit(1)
    sys.argv = [f'{PROGRAM} {verb}', *extra, *rest]
    # As `python -m module`: the module runs as __main__ (its flags, its docstring as help).
    runpy.run_module(module, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
    main()
