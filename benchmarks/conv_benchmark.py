r"""Single 3x3 convolutions: XLA's direct convolution against Winograd's minimal filtering.

For each layer shape of the model zoo that `models/winograd.py` may transform, times the
jitted forward pass and the forward pass with both gradients (a train step's share of
the layer), best of `--repeats` runs after one warm-up, and the compile time of each,
on random float32 inputs:

* `direct`: `lax.conv_general_dilated` and its XLA gradients;
* `winograd`: `winograd.conv3x3`, which runs F(4x4) (or F(2x2), by
  `winograd.inference_tile_size`) forward alone and F(2x2) differentiated where
  `winograd.pays(..., 'training')`, the direct gradient elsewhere, exactly as the
  models use it.

    python -m benchmarks.conv_benchmark [--batch_size=4] [--repeats=3]

Prints a Markdown table with the speed-up of each and whether `winograd.pays` takes the
transformed form for inference and for training.
"""

import time
from collections.abc import Callable

import numpy as np
from absl import app, flags

from fcn_unet_jax import xla_options

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch_size', 4, 'Batch size.')
flags.DEFINE_integer('repeats', 3, 'Timed runs per measurement (the best is reported).')

# (where it occurs, map side, in channels, out channels, dilation) at 320 px input.
LAYERS = [
    ('FCN-ResNet head', 40, 2048, 512, 1),
    ('ResNet layer4, dilated (FCN)', 40, 512, 512, 4),
    ('ResNet layer3, dilated (FCN)', 40, 256, 256, 2),
    ('ResNet layer2', 40, 128, 128, 1),
    ('U-Net decoder 1 (ResNet-50)', 20, 3072, 256, 1),
    ('U-Net decoder 2 (ResNet-50)', 40, 768, 128, 1),
    ('U-Net decoder 3 (ResNet-50)', 80, 384, 64, 1),
    ('U-Net decoder 4 (ResNet-50)', 160, 128, 32, 1),
    ('VGG16 conv3', 80, 256, 256, 1),
    ('VGG16 conv4', 40, 512, 512, 1),
    ('VGG16 conv5', 20, 512, 512, 1),
    ('U-Net decoder 0 (VGG16)', 20, 1024, 256, 1),
    ('ResNet layer4 (U-Net)', 10, 512, 512, 1),
    # Where small maps stop paying (`winograd.MIN_MAP_POSITIONS`).
    ('map size', 16, 512, 512, 1),
    ('map size', 24, 512, 512, 1),
    ('map size', 32, 512, 512, 1),
    ('map size', 24, 3072, 256, 1),
]


def _measure(fn: Callable, *args) -> tuple[float, float]:
    """(best run time, compile time) of the jitted `fn` in seconds."""
    import jax

    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    best = float('inf')
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - start)
    return best, compile_s


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from fcn_unet_jax.models import winograd

    rng = np.random.default_rng(0)
    print(
        '| layer | map | channels | dilation | direct fwd / train ms | Winograd fwd / train ms '
        '| speed-up fwd / train | compile s direct / Winograd (train) | transformed '
        'infer / train |'
    )
    print('| --- | --- | --- | --- | --- | --- | --- | --- | --- |')
    for name, side, c_in, c_out, dilation in LAYERS:
        shape = (FLAGS.batch_size, side, side, c_in)
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)) * 0.05, jnp.float32)
        dy = jnp.asarray(rng.normal(size=(*shape[:3], c_out)), jnp.float32)
        dilations, padding = (dilation, dilation), ((dilation, dilation),) * 2

        def direct(x, k, dilations=dilations, padding=padding):
            return jax.lax.conv_general_dilated(
                x,
                k,
                (1, 1),
                padding,
                rhs_dilation=dilations,
                dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            )

        def transformed(x, k, dilations=dilations, padding=padding):
            return winograd.conv3x3(x, k, dilations, padding)

        times = {}
        for label, conv in (('direct', direct), ('winograd', transformed)):

            def train(x, k, dy, conv=conv):
                return jax.grad(lambda x, k: jnp.vdot(conv(x, k), dy), argnums=(0, 1))(x, k)

            forward_s, _ = _measure(conv, x, kernel)
            train_s, compile_s = _measure(train, x, kernel, dy)
            times[label] = (forward_s, train_s, compile_s)
        (df, dt, dc), (wf, wt, wc) = times['direct'], times['winograd']
        print(
            f'| {name} | {side} x {side} | {c_in} -> {c_out} | {dilation} '
            f'| {1e3 * df:.0f} / {1e3 * dt:.0f} | {1e3 * wf:.0f} / {1e3 * wt:.0f} '
            f'| {df / wf:.2f} / {dt / wt:.2f} | {dc:.1f} / {wc:.1f} '
            f'| {winograd.pays(c_in, c_out, shape[1:3])} '
            f'/ {winograd.pays(c_in, c_out, shape[1:3], "training")} |',
            flush=True,
        )


if __name__ == '__main__':
    xla_options.set_default_flags()  # Before JAX starts its backends.
    app.run(main)
