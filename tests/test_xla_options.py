"""The XLA flags the programs set before JAX starts (`fcn_unet_jax.xla_options`)."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import pytest

from fcn_unet_jax import xla_options

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROGRAMS = [
    'fcn_unet_jax/main.py',
    'fcn_unet_jax/predict.py',
    'fcn_unet_jax/predict_volume.py',
    'experiments/demo.py',
    'experiments/skip_ablation.py',
    'benchmarks/model_benchmark.py',
    'benchmarks/profile_train_step.py',
    'benchmarks/aot_compile.py',
]


def test_the_flags_are_for_the_cpu_backend_only():
    # XLA_FLAGS reaches every backend of the process (libtpu and the CUDA plugin parse it
    # too); an `xla_cpu_` flag changes only how XLA:CPU compiles. `make accel-check`
    # compiles for TPU (and H100) with these flags set, which they accept.
    assert all(name.startswith('xla_cpu_') for name in xla_options.DEFAULT_FLAGS)


def test_default_flags_are_added_to_the_users_flags(monkeypatch):
    monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
    value = xla_options.set_default_flags()
    assert value.split() == [
        '--xla_force_host_platform_device_count=2',
        '--xla_cpu_enable_concurrency_optimized_scheduler=false',
        '--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce',
    ]
    assert xla_options.set_default_flags() == value  # Idempotent.


def test_extra_flags_are_added_the_same_way(monkeypatch):
    monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
    extra = {'xla_force_host_platform_device_count': '4', 'xla_cpu_use_thunk_runtime': 'true'}
    assert xla_options.set_default_flags(extra).split() == [
        '--xla_force_host_platform_device_count=2',  # The user's value is kept.
        '--xla_cpu_enable_concurrency_optimized_scheduler=false',
        '--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce',
        '--xla_cpu_use_thunk_runtime=true',
    ]


def test_a_flag_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_concurrency_optimized_scheduler=true')
    assert xla_options.set_default_flags().split() == [
        '--xla_cpu_enable_concurrency_optimized_scheduler=true',
        '--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce',
    ]


def test_without_xla_flags(monkeypatch):
    monkeypatch.delenv('XLA_FLAGS', raising=False)
    assert xla_options.set_default_flags().split() == [
        '--xla_cpu_enable_concurrency_optimized_scheduler=false',
        '--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce',
    ]


def test_the_test_process_runs_convolutions_in_xlas_own_kernels():
    # conftest set the flags before JAX started, as the programs do: a convolution must
    # reach the compiled program as a plain `convolution`, not inside a YNNPACK fusion
    # (which is what XLA does when the flag is missing or no longer understood; it leaves
    # tiny convolutions to Eigen anyway, so the shape is a real layer's).
    def conv(x, kernel):
        dims = ('NHWC', 'HWIO', 'NHWC')
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=dims)

    compiled = jax.jit(conv).lower(jnp.ones((4, 80, 80, 64)), jnp.ones((3, 3, 64, 64))).compile()
    entry = compiled.as_text().split('ENTRY')[1]
    assert 'convolution(' in entry
    assert 'fusion' not in entry


@pytest.mark.parametrize('path', PROGRAMS)
def test_programs_set_the_flags_before_running(path):
    # `if __name__ == '__main__':` must call set_default_flags() before app.run(main): XLA
    # reads the flags once, when the first computation creates its backend.
    tree = ast.parse((ROOT / path).read_text())
    main_blocks = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and "__name__ == '__main__'" in ast.unparse(node.test)
    ]
    assert len(main_blocks) == 1
    calls = [ast.unparse(stmt) for stmt in main_blocks[0].body]
    assert calls[0] == 'xla_options.set_default_flags()'
    assert any(call.startswith('app.run(') for call in calls[1:])
