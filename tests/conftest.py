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
