"""Shared test set-up: simulated devices, quiet TensorFlow, compile settings, tiny data.

Four CPU devices are simulated for the whole session so that data-parallel code paths run
on one machine; single-device tests simply use the first device. This, and the project's
default XLA flags, must be set before JAX starts its backends, which is why it sits at the
top of conftest.

Fixtures: `fast_compiles` and `fast_compile` trade compiled speed for compile time in
modules that check logic; `shapes_small_data_dir` builds the tiny synthetic `shapes/small`
dataset once per session for the modules that train on it.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from fcn_unet_jax import xla_options  # noqa: E402

# The flags the programs set (`xla_options`), so tests compile what users run, plus the
# simulated devices (a device count the user already set is kept).
xla_options.set_default_flags({'xla_force_host_platform_device_count': '4'})

import jax  # noqa: E402  (after XLA_FLAGS is set)
import pytest  # noqa: E402


def _update_jax_config(settings: dict) -> dict:
    """Applies `settings` to jax.config and returns the previous values."""
    previous = {name: jax.config.values[name] for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    return previous


@pytest.fixture(scope='module')
def fast_compiles():
    """Turns off most XLA optimisations for a module that checks logic, not compiled speed.

    Use with `pytestmark = pytest.mark.usefixtures('fast_compiles')`.
    """
    previous = _update_jax_config({'jax_disable_most_optimizations': True})
    yield
    _update_jax_config(previous)


@pytest.fixture(scope='module')
def fast_compile(tmp_path_factory) -> dict[str, str]:
    """`fast_compiles` plus a persistent compilation cache for modules that train runs.

    Compiled-code speed does not matter there; compile time does, and the runs compile
    identical steps again and again, so a cache pays off.

    Yields:
      The same settings as environment variables, for subprocesses of the test.
    """
    settings = {
        'jax_disable_most_optimizations': True,
        'jax_compilation_cache_dir': str(tmp_path_factory.mktemp('jit')),
        'jax_persistent_cache_min_compile_time_secs': 0.0,
        'jax_persistent_cache_min_entry_size_bytes': 0,
    }
    previous = _update_jax_config(settings)
    yield {name.upper(): str(value) for name, value in settings.items()}
    _update_jax_config(previous)


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
