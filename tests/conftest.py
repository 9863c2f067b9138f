"""Shared test set-up: simulated devices and quiet TensorFlow.

Four CPU devices are simulated for the whole session so that data-parallel code paths run
on one machine; single-device tests simply use the first device. This must happen before
JAX is imported anywhere, which is why it sits at the top of conftest.
"""

import os

_FLAG = '--xla_force_host_platform_device_count=4'
if _FLAG.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _FLAG).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402  (after XLA_FLAGS is set)
import pytest  # noqa: E402


@pytest.fixture(scope='module')
def fast_compiles():
    """Turns off most XLA optimisations for a module that checks logic, not compiled speed.

    Use with `pytestmark = pytest.mark.usefixtures('fast_compiles')`.
    """
    previous = jax.config.read('jax_disable_most_optimizations')
    jax.config.update('jax_disable_most_optimizations', True)
    yield
    jax.config.update('jax_disable_most_optimizations', previous)
