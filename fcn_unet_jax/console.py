"""What the programs print: quiet third-party logs, short lines, progress with ETA.

At the default verbosity a program prints its own lines only, as `HH:MM:SS message`:

* `silence_native_logs()`, called by each program before TensorFlow is imported, keeps
  TensorFlow's C++ banners (oneDNN, CPU features, absl::InitializeLog) off stderr;
* `configure_logging()`, called once the flags are parsed (`errors.parse_flags`), drops the
  INFO lines of other libraries (orbax's checkpoint internals, tfds' dataset loading, clu's
  metric echoes, JAX's backend probing) and tfds' progress bars; their warnings still show.

`--verbosity=1` (or `-v 1`) keeps everything, in absl's own format.

The training loop reports through `log_config`, `log_dataset`, `FirstCallLogger` (the
compile time of a jitted step), `log_train` (step, loss, throughput, ETA), `progress`
(an evaluation pass with ETA) and `log_scores` (the metric table).
"""

import contextlib
import importlib.abc
import importlib.util
import logging as python_logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from absl import flags, logging

# Packages whose INFO lines are the program's own; every other INFO line is dropped.
OWN_PACKAGES = ('fcn_unet_jax', 'experiments', 'configs', 'benchmarks')
# Libraries whose warnings are dropped too: tfds warns about every run-time dataset config
# (`Using custom data configuration`, `Variant folder ... has no dataset_info.json`), orbax
# about the metadata file of every checkpoint it restores item by item. A checkpoint that
# cannot be read is reported by fcn_unet_jax.checkpointing itself.
QUIET_PACKAGES = ('tensorflow_datasets', 'orbax')
_TIME_FORMAT = '%H:%M:%S'
# An evaluation pass logs a line at each of these fractions of its batches, and at least
# every `_PROGRESS_SECONDS` seconds.
_PROGRESS_FRACTIONS = (0.25, 0.5, 0.75)
_PROGRESS_SECONDS = 30.0


def verbose(argv: Sequence[str] | None = None) -> bool:
    """Whether the command line asks for more than the default (`--verbosity` >= 1, `-v N`).

    Read from the arguments because TensorFlow's banners must be silenced before the flags
    are parsed.
    """
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        value = None
        if arg.startswith(('--verbosity=', '-v=')):
            value = arg.partition('=')[2]
        elif arg in ('--verbosity', '-v') and i + 1 < len(argv):
            value = argv[i + 1]
        if value is not None:
            try:
                return int(value) >= 1
            except ValueError:
                return value.lower() in ('debug', '1')
    return False


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Points file descriptor 2 at /dev/null: C++ libraries write there, not to sys.stderr."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Imports one top-level package with stderr silenced (its import-time banners)."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # Once: the real finders locate the package.
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec_module(module):
            with _stderr_silenced():
                exec_module(module)

        spec.loader.exec_module = quiet_exec_module
        return spec


def silence_native_logs() -> None:
    """Keeps TensorFlow's native log lines off stderr, unless `verbose()`.

    Call before TensorFlow is imported: it reads TF_CPP_MIN_LOG_LEVEL once, and prints its
    banners while it is imported. A TF_CPP_MIN_LOG_LEVEL the user set is kept.
    """
    if verbose() or 'tensorflow' in sys.modules:
        return
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    if not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport('tensorflow'))


class _OwnLinesFilter(python_logging.Filter):
    """Passes errors, warnings (but `QUIET_PACKAGES`'), and the project's own INFO lines."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        path = record.pathname.replace(os.sep, '/')
        if record.levelno >= python_logging.ERROR:
            return True
        if record.levelno >= python_logging.WARNING:
            return not any(f'/{package}/' in path for package in QUIET_PACKAGES)
        main = getattr(sys.modules.get('__main__'), '__file__', None)
        if main and os.path.abspath(record.pathname) == os.path.abspath(main):
            return True
        return any(f'/{package}/' in path for package in OWN_PACKAGES)


class _ShortFormatter(python_logging.Formatter):
    """`HH:MM:SS message`, with `warning:` / `error:` before the message where it applies."""

    def format(self, record: python_logging.LogRecord) -> str:
        stamp = time.strftime(_TIME_FORMAT, time.localtime(record.created))
        message = record.getMessage()
        if record.exc_info:
            message += '\n' + self.formatException(record.exc_info)
        if record.levelno >= python_logging.ERROR:
            return f'{stamp} error: {message}'
        if record.levelno >= python_logging.WARNING:
            return f'{stamp} warning: {message}'
        return f'{stamp} {message}'


def configure_logging(flag_values: flags.FlagValues | None = None) -> None:
    """Sets up the default, quiet output (see the module docstring), unless verbose.

    Args:
      flag_values: the parsed flags (reads `verbosity` where defined); None: absl's FLAGS.
    """
    flag_values = flags.FLAGS if flag_values is None else flag_values
    level = flag_values['verbosity'].value if 'verbosity' in flag_values else 0
    if level >= 1 or verbose():
        return
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _OwnLinesFilter) for f in handler.filters):
        handler.addFilter(_OwnLinesFilter())
    handler.setFormatter(_ShortFormatter())
    if 'tensorflow_datasets' in sys.modules or 'tensorflow' in sys.modules:
        quiet_tfds()


def quiet_tfds() -> None:
    """Turns off tfds' progress bars (they fill logs with carriage returns)."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()


@contextlib.contextmanager
def quiet_prints() -> Iterator[None]:
    """Drops what the block prints to stdout (tfds' `Downloading and preparing dataset
    Unknown size ...` for a local build), unless verbose."""
    if verbose():
        yield
        return
    with open(os.devnull, 'w') as null, contextlib.redirect_stdout(null):
        yield


def duration(seconds: float) -> str:
    """`0.4s`, `12s`, `3m05s` or `2h14m`: short and readable."""
    if seconds < 10:
        return f'{seconds:.1f}s'
    seconds = round(seconds)
    if seconds < 60:
        return f'{seconds}s'
    if seconds < 3600:
        return f'{seconds // 60}m{seconds % 60:02d}s'
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


def log_config(config: Any, workdir: str) -> None:
    """A few lines of the run's resolved config: model, data, recipe and where it writes."""
    model, data, opt = config.model, config.dataset, config.optimizer
    logging.info(
        'model %s (width %g, %d classes, %s) from %s',
        model.name,
        model.get('width', 1.0),
        model.num_classes,
        model.get('dtype', 'float32'),
        config.init_from or 'scratch',
    )
    logging.info(
        'data %s: splits %s / %s, crops %s, batch %d',
        data.name,
        data.train_split,
        data.eval_split,
        'x'.join(str(s) for s in config.input.crop_size),
        config.batch_size,
    )
    logging.info(
        'train %d steps, %s lr %g (%s), loss %s; eval every %d, checkpoint every %d steps in %s',
        config.num_train_steps,
        opt.name,
        opt.learning_rate,
        opt.schedule,
        describe_loss(config),
        config.eval_every_steps,
        config.checkpoint_every_steps,
        workdir,
    )


def describe_loss(config: Any) -> str:
    """The loss a run trains on, weights included: 'cross_entropy', or e.g.
    'cross_entropy with the border weight map (w0 10, sigma 5 px), class weights (1, 4)'."""
    weights = []
    if config.input.get('border_weights'):
        weights.append(
            f'the border weight map (w0 {config.input.border_w0:g}, '
            f'sigma {config.input.border_sigma:g} px)'
        )
    class_weights = config.loss.get('class_weights')
    if class_weights:
        weights.append(f'class weights ({", ".join(f"{w:g}" for w in class_weights)})')
    return f'{config.loss.name} with {", ".join(weights)}' if weights else config.loss.name


def log_dataset(info: Any, config: Any) -> None:
    """The dataset's split sizes and classes (an `input_pipeline.DatasetInfo`)."""
    names = ', '.join(info.class_names)
    if len(names) > 60:
        names = names[:57] + '...'
    logging.info(
        'dataset %s: %d train, %d eval images; %d classes (%s)',
        config.dataset.name,
        info.num_train_examples,
        info.num_eval_examples,
        info.num_classes,
        names,
    )


class FirstCallLogger:
    """A jitted function whose first call logs `compiling NAME ...` and its compile time.

    The first call waits for its result, so the time covers the compilation (and that one
    call); later calls pass straight through. Other attributes (`lower`, ...) are the
    wrapped function's.
    """

    def __init__(self, function: Callable[..., Any], name: str):
        self._function = function
        self._name = name
        self._compiled = False

    def __call__(self, *args, **kwargs):
        if self._compiled:
            return self._function(*args, **kwargs)
        import jax

        logging.info('compiling %s ...', self._name)
        began = time.time()
        result = jax.block_until_ready(self._function(*args, **kwargs))
        self._compiled = True
        logging.info('compiled %s in %s', self._name, duration(time.time() - began))
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._function, name)


def log_train(
    step: int, total_steps: int, scalars: Mapping[str, float], steps_per_sec: float
) -> None:
    """One progress line: step, loss, throughput and the time left at the current speed."""
    left = (total_steps - step) / steps_per_sec if steps_per_sec > 0 else float('nan')
    logging.info(
        'step %d/%d  loss %.4f  %.2f steps/s  %.1f img/s  ETA %s',
        step,
        total_steps,
        scalars['train/loss'],
        steps_per_sec,
        scalars.get('train/examples_per_sec', float('nan')),
        duration(left) if left == left else '?',
    )


def progress(batches: Iterable[Any], total: int, name: str) -> Iterator[Any]:
    """Yields `batches` and logs the pass: done/total with ETA at each quarter (or every
    30 s), then the count and time. The first batch (which may compile) is left out of the
    rate behind the ETA."""
    began = last_line = time.time()
    first_done = None
    fractions = list(_PROGRESS_FRACTIONS)
    done = 0
    for batch in batches:
        yield batch
        done += 1
        now = time.time()
        if first_done is None:
            first_done = now
        crossed = fractions and done / total >= fractions[0]
        while fractions and done / total >= fractions[0]:
            fractions.pop(0)
        if done < total and (crossed or now - last_line >= _PROGRESS_SECONDS):
            measured = done - 1 if done > 1 else 1
            rate = (now - (first_done if done > 1 else began)) / measured
            logging.info(
                '%s: %d/%d batches, %s, ETA %s',
                name,
                done,
                total,
                duration(now - began),
                duration(rate * (total - done)),
            )
            last_line = now
    batches = 'batch' if done == 1 else 'batches'
    logging.info('%s: %d %s in %s', name, done, batches, duration(time.time() - began))


_HEADLINE = (
    ('mean_iou', 'mIoU'),
    ('pixel_accuracy', 'pixel acc'),
    ('mean_accuracy', 'mean acc'),
    ('dice', 'Dice'),
    ('boundary_iou', 'Boundary IoU'),
)


def scores_line(result: Mapping[str, Any]) -> str:
    """`mIoU 0.6512  pixel acc 0.9123 ...`: the headline metrics of an evaluation."""
    parts = [f'{label} {result[key]:.4f}' for key, label in _HEADLINE if key in result]
    return '  '.join(parts)


def log_scores(
    result: Mapping[str, Any],
    class_names: Sequence[str],
    *,
    step: int,
    split: str,
    per_class: bool,
) -> None:
    """Logs an evaluation: the headline line, and with `per_class` a table per class."""
    logging.info('eval %s at step %d: %s', split, step, scores_line(result))
    if not per_class or 'per_class_iou' not in result:
        return
    width = max([len('class'), *(len(n) for n in class_names)])
    accuracy = result.get('per_class_accuracy', [float('nan')] * len(class_names))
    lines = [f'{"class":<{width}}  IoU     acc', f'{"-" * width}  ------  ------']
    for name, iou, acc in zip(class_names, result['per_class_iou'], accuracy, strict=True):
        lines.append(f'{name:<{width}}  {_cell(iou)}  {_cell(acc)}')
    logging.info('per-class scores:\n%s', '\n'.join(lines))


def _cell(value: Any) -> str:
    return f'{value:.4f}' if isinstance(value, float) and value == value else '  -   '


def show_flags_in_help(flag_values: flags.FlagValues | None = None) -> None:
    """Makes `--help` list every flag of the program, wherever the project defines it.

    absl's `--help` lists the flags of the main file only: a program's flags defined by a
    module it shares with another program (the inference flags of `predict` in
    `predict_volume`, `--traceback` in `errors`) would hide under `--helpfull`.

    Args:
      flag_values: the program's flags; None: absl's FLAGS.
    """
    flag_values = flags.FLAGS if flag_values is None else flag_values
    main = sys.argv[0]
    for module, defined in list(flag_values.flags_by_module_dict().items()):
        if module == main or module.split('.')[0] in OWN_PACKAGES:
            for flag in defined:
                flag_values.register_key_flag_for_module(main, flag)
    if 'verbosity' in flag_values:
        flag_values.register_key_flag_for_module(main, flag_values['verbosity'])
