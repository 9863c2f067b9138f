"""Shared test set-up: simulated devices and quiet TensorFlow.

Four CPU devices are simulated for the whole session so that data-parallel code paths run
on one machine; single-device tests simply use the first device. This, and the project's
default XLA flags, must be set before JAX starts its backends, which is why it sits at the
top of conftest.
"""

import os

_FLAG = '--xla_force_host_platform_device_count=4'
if _FLAG.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _FLAG).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from fcn_unet_jax import xla_options  # noqa: E402

# The flags the programs set (`xla_options`), so tests compile what users run.
xla_options.set_default_flags()

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
