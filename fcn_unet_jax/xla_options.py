"""XLA flags the project's programs set before JAX starts its backends.

On CPU, XLA's default "concurrency-optimised" scheduler orders independent operations to
run side by side, which keeps many activations alive at once: the compiled FCN-ResNet50
train step (320 px, batch 4) needs 2,551 MiB of temporaries with it and 1,567 MiB without,
at the same speed (`benchmarks/model_benchmark.py`: peak train memory 3,293 -> 2,255 MiB,
against PyTorch's 2,539; U-Net-ResNet50 2,392 -> 1,827, against 1,883). XLA reads this
option only from the `XLA_FLAGS` environment variable when it creates a backend (per-jit
`compiler_options` do not reach it), so the entry points call `set_default_flags()` first.
The flag names only the CPU backend; accelerators are unaffected.
"""

import os
from collections.abc import Mapping

# flag name -> value; a flag the user already put in XLA_FLAGS is left as they set it.
DEFAULT_FLAGS = {'xla_cpu_enable_concurrency_optimized_scheduler': 'false'}


def set_default_flags(extra_flags: Mapping[str, str] | None = None) -> str:
    """Adds `DEFAULT_FLAGS` to the `XLA_FLAGS` environment variable and returns its value.

    Call before the first JAX computation (backends read XLA_FLAGS once, when created);
    later calls change nothing for the running process.

    Args:
      extra_flags: more flag name -> value pairs to add the same way (e.g. the tests'
        simulated device count).
    """
    flags = {**DEFAULT_FLAGS, **(extra_flags or {})}
    current = os.environ.get('XLA_FLAGS', '')
    added = [f'--{name}={value}' for name, value in flags.items() if name not in current]
    if added:
        os.environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
    return os.environ.get('XLA_FLAGS', '')
