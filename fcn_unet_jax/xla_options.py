"""XLA flags the project's programs set before JAX starts its backends.

Both flags name only the CPU backend; accelerators are unaffected. XLA reads them only from
the `XLA_FLAGS` environment variable when it creates a backend (per-jit `compiler_options`
do not reach them), so the entry points call `set_default_flags()` first. XLA refuses to
start with a flag it does not know, so a jaxlib that drops one fails the whole test suite
at once (tests/conftest.py sets the same flags). Numbers: 2 cores, 320 px, batch 4, fp32;
memory from `benchmarks/model_benchmark.py`, layer times from single-layer timings.

* `xla_cpu_enable_concurrency_optimized_scheduler=false`: XLA's default CPU scheduler
  orders independent operations to run side by side, which keeps many activations alive at
  once. The FCN-ResNet50 train step needs 2,551 MiB of temporaries with it and 1,567 MiB
  without, at the same speed (peak train memory 3,293 -> 2,255 MiB, against PyTorch's
  2,539; U-Net-ResNet50 2,392 -> 1,827, against 1,883).
* `xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce`: the default list without
  `individual_convolution`, so matrix products and reductions still run in YNNPACK but
  convolutions run in XLA's Eigen kernels, which are faster here: their kernel gradients
  2-4x (64->64 at 320 x 320: 632 -> 162 ms; 128->128 at 160 x 160: 761 -> 121 ms) and the
  FCN head's 2048->512 3x3 conv 402 -> 280 ms, at equal speed elsewhere. Train steps:
  U-Net-VGG16 4.0 -> 3.4 s, U-Net-ResNet50 2.24 -> 2.15 s; FCN-ResNet50 inference
  1.30 -> 1.19 s.
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
