"""XLA flags the project's programs set before JAX starts its backends.

Both flags name only the CPU backend (`xla_cpu_...`), so they act on CPU compilations
only, whatever else runs: `XLA_FLAGS` reaches every XLA in the process (libtpu and the CUDA
plugin parse it too, and refuse a flag they do not know), but these two change nothing
except XLA:CPU's compilation. `make accel-check` compiles TPU (and H100) programs with them
set. XLA reads them only from the `XLA_FLAGS` environment variable when it creates a
backend (per-jit `compiler_options` do not reach them), so the entry points call
`set_default_flags()` first. XLA refuses to start with a flag it does not know, so a
jaxlib that drops one fails the whole test suite at once (tests/conftest.py sets the same
flags). What each flag buys is measured by
`python -m benchmarks.model_benchmark` (train-step time and memory) and
`python -m benchmarks.conv_benchmark` (single layers); results in `docs/performance.md`.

* `xla_cpu_enable_concurrency_optimized_scheduler=false`: XLA's default CPU scheduler
  orders independent operations to run side by side, which keeps many activations alive at
  once. Without it the ResNet models' train steps need far fewer temporaries, at the same
  speed, and their peak memory falls below PyTorch's.
* `xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce`: the default list without
  `individual_convolution`, so matrix products and reductions still run in YNNPACK but
  convolutions run in XLA's Eigen kernels, which are faster here: above all their kernel
  gradients, and wide 3x3 convolutions such as the FCN head's, at equal speed elsewhere,
  so train steps and inference of the convolution-heavy models get faster.
"""

import os
from collections.abc import Mapping

# flag name -> value; a flag the user already put in XLA_FLAGS is left as they set it.
DEFAULT_FLAGS = {
    'xla_cpu_enable_concurrency_optimized_scheduler': 'false',
    'xla_cpu_experimental_ynn_fusion_type': 'individual_dot,reduce',
}


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
