"""Shared test set-up: simulated devices, quiet TensorFlow, compile settings, tiny runs.

Four CPU devices are simulated for the whole session so that data-parallel code paths run
on one machine; single-device tests simply use the first device. This, and the project's
default XLA flags, must be set before JAX starts its backends, which is why it sits at the
top of conftest.

Fixtures:
  * `fast_compiles` and `fast_compile` trade compiled speed for compile time in modules
    that check logic (`fast_compile` adds a persistent compilation cache, shared by the
    session, and yields the same settings as environment variables for subprocesses);
  * `shapes_small_data_dir`: the tiny synthetic `shapes/small` dataset, built once;
  * the tiny training run on it that several modules need: `tiny_config(**overrides)` (its
    config), `tiny_main_command(workdir, *flags, **overrides)` (the same run through
    `python -m fcn_unet_jax.main`), `shrink_to_tiny(config, **overrides)` (an experiment's
    own config on the same data and sizes) and `tiny_trained_run` (one finished run of
    `tiny_config()`, trained once per session, read-only);
  * `repo_root`, `subprocess_env`: where and how subprocesses run the project's programs.

Overrides are keyword arguments named by dotted config paths, so they are passed as
`**{'model.width': 0.125}` (a plain `num_train_steps=2` for top-level fields).
"""

import contextlib
import dataclasses
import os
import pathlib
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from fcn_unet_jax import xla_options  # noqa: E402

# The flags the programs set (`xla_options`), so tests compile what users run, plus the
# simulated devices (a device count the user already set is kept).
xla_options.set_default_flags({'xla_force_host_platform_device_count': '4'})

import jax  # noqa: E402  (after XLA_FLAGS is set)
import pytest  # noqa: E402

REPO = str(pathlib.Path(__file__).resolve().parents[1])

# The data and sizes of every tiny run: 32 px crops of `shapes/small` for a width-1/16
# model, batches of 4 so that they split over the 4 simulated devices.
TINY_DATA = {
    'dataset.name': 'shapes/small',
    'dataset.train_split': 'train[:64]',
    'dataset.eval_split': 'validation[:8]',
    'input.crop_size': (32, 32),
    'input.eval_pad_size': (64, 64),
    'model.width': 0.0625,
    'batch_size': 4,
    'eval_batch_size': 4,
    # No TensorBoard pictures: they cost a compile and a render per run
    # (tests/test_console_logs.py turns them on and checks them).
    'eval.tensorboard_images': 0,
}
# The recipe of `tiny_config`: a U-Net with BatchNorm, a few seconds per run.
TINY_RECIPE = {
    'model.batch_norm': True,
    # SGD keeps parameter differences proportional to gradient differences, so 1 vs 4 device
    # runs can be compared tightly (Adam's normalisation amplifies float noise in ~0 grads).
    'optimizer.name': 'sgd',
    'optimizer.learning_rate': 0.05,
    'optimizer.schedule': 'constant',  # Independent of num_train_steps (resume tests).
    'num_train_steps': 4,
    'log_every_steps': 1,
    'eval_every_steps': 100,
    'checkpoint_every_steps': 100,
}


def _update_jax_config(settings: Mapping[str, Any]) -> dict:
    """Applies `settings` to jax.config and returns the previous values."""
    previous = {name: jax.config.values[name] for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    return previous


@contextlib.contextmanager
def _jax_config(settings: Mapping[str, Any]) -> Iterator[None]:
    previous = _update_jax_config(settings)
    try:
        yield
    finally:
        _update_jax_config(previous)


def _fast_compile_settings(cache_dir: str) -> dict[str, Any]:
    return {
        'jax_disable_most_optimizations': True,
        'jax_compilation_cache_dir': cache_dir,
        'jax_persistent_cache_min_compile_time_secs': 0.0,
        'jax_persistent_cache_min_entry_size_bytes': 0,
    }


def apply_overrides(config, overrides: Mapping[str, Any]):
    """Sets each dotted field path of `overrides` ('model.width') in `config`; returns it."""
    for key, value in overrides.items():
        section, _, field = key.rpartition('.')
        (config[section] if section else config)[field] = value
    return config


@pytest.fixture(scope='module')
def fast_compiles():
    """Turns off most XLA optimisations for a module that checks logic, not compiled speed.

    Use with `pytestmark = pytest.mark.usefixtures('fast_compiles')`.
    """
    with _jax_config({'jax_disable_most_optimizations': True}):
        yield


@pytest.fixture(scope='session')
def compilation_cache_dir(tmp_path_factory) -> str:
    """The persistent compilation cache of the session's fast-compile modules and runs.

    One directory for the whole session: JAX opens its cache once per process anyway.
    """
    return str(tmp_path_factory.mktemp('jit'))


@pytest.fixture(scope='module')
def fast_compile(compilation_cache_dir) -> Iterator[dict[str, str]]:
    """`fast_compiles` plus a persistent compilation cache for modules that train runs.

    Compiled-code speed does not matter there; compile time does, and the runs compile
    identical steps again and again, so a cache pays off.

    Yields:
      The same settings as environment variables, for subprocesses of the test.
    """
    settings = _fast_compile_settings(compilation_cache_dir)
    with _jax_config(settings):
        yield {name.upper(): str(value) for name, value in settings.items()}


@pytest.fixture(scope='session')
def shapes_small_data_dir(tmp_path_factory) -> str:
    """A tfds data_dir holding `shapes/small`, built once for the whole session.

    Built the way users build data (`builders.get_builder`, array_record, the format the
    input pipeline reads) without asking GCS for a prebuilt copy. Session scope because
    building costs seconds and every user only reads it: tests must never write here.

    Returns:
      The data_dir, for `config.dataset.data_dir` with `config.dataset.name='shapes/small'`.
    """
    # Imported here so that sessions which never ask for the data skip importing tfds.
    import ml_collections
    import tensorflow_datasets as tfds

    from fcn_unet_jax.data import builders

    data_dir = str(tmp_path_factory.mktemp('tfds'))
    dataset = ml_collections.ConfigDict({'name': 'shapes/small', 'data_dir': data_dir})
    builders.get_builder(dataset).download_and_prepare(
        file_format=builders.FILE_FORMAT,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    return data_dir


@pytest.fixture(scope='session')
def shrink_to_tiny(shapes_small_data_dir) -> Callable[..., Any]:
    """`shrink_to_tiny(config, **overrides)`: `config` on the tiny data, its recipe kept.

    Points `config` at the session's `shapes/small` with the sizes of `TINY_DATA`, then
    applies `overrides`; for experiments whose own config (optimiser, steps, model family)
    is what a test checks.
    """

    def shrink(config, **overrides):
        data = {**TINY_DATA, 'dataset.data_dir': shapes_small_data_dir}
        return apply_overrides(config, {**data, **overrides})

    return shrink


@pytest.fixture(scope='session')
def tiny_config(shrink_to_tiny) -> Callable[..., Any]:
    """`tiny_config(**overrides)`: configs/default.py as a tiny run on `shapes/small`.

    A U-Net with BatchNorm at width 1/16 on 32 px crops, SGD at a constant rate, 4 steps
    logged one by one, no evaluation or checkpoint before the last step (`TINY_DATA`,
    `TINY_RECIPE`): a few seconds per run.
    """
    from configs import default

    def make(**overrides):
        return shrink_to_tiny(default.get_config(), **{**TINY_RECIPE, **overrides})

    return make


@pytest.fixture(scope='session')
def tiny_main_command(shapes_small_data_dir) -> Callable[..., list[str]]:
    """`tiny_main_command(workdir, *flags, **overrides)`: `tiny_config` as a command line.

    Returns the argv of `python -m fcn_unet_jax.main` training `tiny_config(**overrides)`
    in `workdir` (every field as a `--config.` flag), followed by `flags`.
    """

    def command(workdir, *flags: str, **overrides) -> list[str]:
        fields = {**TINY_DATA, 'dataset.data_dir': shapes_small_data_dir, **TINY_RECIPE}
        fields.update(overrides)
        return [
            sys.executable,
            '-m',
            'fcn_unet_jax.main',
            f'--config={REPO}/configs/default.py',
            f'--workdir={workdir}',
            *[f'--config.{key}={value}' for key, value in fields.items()],
            *flags,
        ]

    return command


@dataclasses.dataclass(frozen=True)
class TinyRun:
    """A finished training run.

    Attributes:
      workdir: its run directory (read-only for tests: copy it to change it).
      summaries: what `train.train_and_evaluate` returned.
    """

    workdir: pathlib.Path
    summaries: dict[str, Any]


@pytest.fixture(scope='session')
def tiny_trained_run(tiny_config, compilation_cache_dir, tmp_path_factory) -> TinyRun:
    """`tiny_config()` trained for its 4 steps on all 4 devices, once per session.

    The reference that train tests compare other runs with, and the model that prediction
    tests load. Tests must not write into its workdir.
    """
    from fcn_unet_jax import train

    workdir = tmp_path_factory.mktemp('tiny_run')
    # The settings of `fast_compile`, which a session fixture cannot request.
    with _jax_config(_fast_compile_settings(compilation_cache_dir)):
        summaries = train.train_and_evaluate(tiny_config(), str(workdir))
    return TinyRun(workdir, summaries)


@pytest.fixture(scope='session')
def repo_root() -> str:
    """The repository's root: the working directory and PYTHONPATH of subprocesses."""
    return REPO


@pytest.fixture
def subprocess_env(fast_compile) -> dict[str, str]:
    """The environment of a program run as a subprocess: 2 simulated devices, fast compiles.

    The repository is on PYTHONPATH and the `fast_compile` settings (with the session's
    compilation cache) are passed as environment variables.
    """
    env = dict(os.environ, PYTHONPATH=REPO, **fast_compile)
    env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
    return env
