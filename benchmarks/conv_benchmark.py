r"""Single 3x3 convolutions: XLA's direct convolution against Winograd's minimal filtering.

For each layer shape of the model zoo that `fcn_unet_jax/ops/winograd.py` may transform, times the
jitted forward pass and the forward pass with both gradients (a train step's share of
the layer), best of `--repeats` runs after one warm-up, and the compile time of each,
on random float32 inputs:

* `direct`: `lax.conv_general_dilated` and its XLA gradients;
* `winograd`: `winograd.conv3x3`, which runs F(4x4) (or F(2x2), by
  `winograd.inference_tile_size`) forward alone and F(2x2) differentiated where
  `winograd.pays(..., 'training')`, the direct gradient elsewhere, exactly as the
  models use it.

    python -m benchmarks.conv_benchmark [--batch_size=4] [--repeats=3] [--table=decoder ...]

Prints a Markdown table with the speed-up of each and whether `winograd.pays` takes the
transformed form for inference and for training. More tables follow:

* the kernel gradient of padded stride-1 3x3 convolutions as XLA forms it (padding inside
  the convolution), over the padded input, and as the convolution of the output gradient
  with the padded input as its window (`ops/kernel_gradient.py`; `kernel_grad` takes the
  latter on CPU where the last column says so);
* thin 3x3 convolutions (the skip ablation's narrow FCN and U-Net) directly and over 2x2
  pixel blocks (`ops/space_to_depth.py`), forward and with both gradients;
* the input gradient of VALID convolutions with a small output (FCN's fc6) as XLA forms it
  and tap by tap (`convolutions.input_grad_by_taps`);
* the first conv of the smp-style U-Net decoder blocks (U-Net-ResNet50 at 320 px): the
  3x3 conv of `concat([upsample_nearest2x(x), skip])` (`convolutions.Conv`) against
  `upsampling.UpsampledConcatConv`, forward and forward with both gradients.

The thresholds in `fcn_unet_jax/ops/` (`winograd.MIN_HARMONIC_CHANNELS`,
`winograd.MIN_MAP_POSITIONS`, `kernel_gradient.MAX_OUTPUT_CHANNELS_SWAPPED`, ...) were set
from these tables; `docs/performance.md` holds the results.
"""

import time
from collections.abc import Callable

import numpy as np
from absl import app, flags

from fcn_unet_jax import errors, xla_options

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch_size', 4, 'Batch size.')
flags.DEFINE_integer('repeats', 3, 'Timed runs per measurement (the best is reported).')
TABLES = ('winograd', 'kernel_gradient', 'decoder', 'space_to_depth', 'valid_input_gradient')
flags.DEFINE_multi_enum('table', list(TABLES), TABLES, 'Tables to measure (default: all).')

# (where it occurs, map side, in channels, out channels, dilation) at 320 px input.
LAYERS = [
    ('FCN-ResNet head', 40, 2048, 512, 1),
    ('ResNet layer4, dilated (FCN)', 40, 512, 512, 4),
    ('ResNet layer3, dilated (FCN)', 40, 256, 256, 2),
    ('ResNet layer2', 40, 128, 128, 1),
    # The skip channels' convs of the U-Net decoders (`upsampling.UpsampledConcatConv`).
    ('U-Net decoder 2 skip (ResNet-50)', 40, 512, 128, 1),
    ('U-Net decoder 3 skip (ResNet-50)', 80, 256, 64, 1),
    ('U-Net decoder 4 skip (ResNet-50)', 160, 64, 32, 1),
    ('VGG16 conv3', 80, 256, 256, 1),
    ('VGG16 conv4', 40, 512, 512, 1),
    ('VGG16 conv5', 20, 512, 512, 1),
    ('U-Net decoder 1 skip (ResNet-50), decoder 0 skip (VGG16)', 20, 1024, 256, 1),
    ('ResNet layer4 (U-Net)', 10, 512, 512, 1),
    # Where small maps stop paying (`winograd.MIN_MAP_POSITIONS`).
    ('map size', 16, 512, 512, 1),
    ('map size', 24, 512, 512, 1),
    ('map size', 32, 512, 512, 1),
    ('map size', 24, 3072, 256, 1),
]
# (map side, in channels, out channels) of direct stride-1 3x3 kernel gradients.
KERNEL_GRADIENT_LAYERS = [
    (80, 64, 64),
    (40, 128, 128),
    (80, 256, 64),
    (40, 512, 128),
    (160, 64, 32),
    (40, 1024, 256),
]
# Thin 3x3 convs: (where, input map side, in channels, out channels, padding). The
# narrow models of the skip ablation (configs/skip_ablation_shapes.py: 128 px crops,
# batch 8) and the map sizes and channel counts where the blocks stop paying
# (`space_to_depth.MAX_CHANNELS`, `MIN_MAP_POSITIONS`).
THIN_LAYERS = [
    ('FCN 1/16 conv1_1 (pad 100)', 128, 3, 4, 100),
    ('FCN 1/16 conv1_2', 326, 4, 4, 1),
    ('FCN 1/16 conv2_1', 163, 4, 8, 1),
    ('FCN 1/16 conv2_2', 163, 8, 8, 1),
    ('FCN 1/16 conv3_1', 82, 8, 16, 1),
    ('FCN 1/16 conv3_2', 82, 16, 16, 1),
    ('U-Net 1/8 conv1', 128, 3, 8, 1),
    ('U-Net 1/8 conv2', 128, 8, 8, 1),
    ('U-Net 1/8 down1', 64, 8, 16, 1),
    ('VGG16 conv1_1 (pad 100)', 128, 3, 64, 100),
    ('map size', 64, 4, 4, 1),
    ('map size', 96, 4, 4, 1),
    ('map size', 96, 8, 8, 1),
]
# VALID convolutions with a small output (FCN's fc6, 7x7): (where, input map side, in
# channels, out channels, kernel side), for their input gradient.
VALID_LAYERS = [
    ('FCN 1/16 fc6, 128 px crops', 11, 32, 256, 7),
    ('FCN 1/16 fc6, 256 px images', 17, 32, 256, 7),
    ('FCN 1/4 fc6, 320 px crops', 16, 128, 1024, 7),
    ('output at half the input', 20, 32, 256, 7),
    ('classic U-Net 3x3 (not taken)', 64, 64, 64, 3),
]
# U-Net-ResNet50's decoder blocks at 320 px: (input map side, input channels, skip
# channels, output channels); the input is upsampled x2 and concatenated with the skip.
DECODER_LAYERS = [
    (10, 2048, 1024, 256),
    (20, 256, 512, 128),
    (40, 128, 256, 64),
    (80, 64, 64, 32),
    (160, 32, 0, 16),
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


def _measure_forward_and_train(conv: Callable, x, kernel, dy) -> tuple[float, float, float]:
    """(forward s, train s, train compile s) of `conv(x, kernel)`; training takes both
    gradients of `vdot(conv(x, kernel), dy)`, as a layer's backward pass does."""
    import jax
    import jax.numpy as jnp

    def train(x, k, dy):
        return jax.grad(lambda x, k: jnp.vdot(conv(x, k), dy), argnums=(0, 1))(x, k)

    forward_s, _ = _measure(conv, x, kernel)
    train_s, compile_s = _measure(train, x, kernel, dy)
    return forward_s, train_s, compile_s


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    if 'winograd' in FLAGS.table:
        _winograd_table(rng)
    if 'kernel_gradient' in FLAGS.table:
        _kernel_gradient_table(rng)
    if 'decoder' in FLAGS.table:
        _decoder_table(rng)
    if 'space_to_depth' in FLAGS.table:
        _space_to_depth_table(rng)
    if 'valid_input_gradient' in FLAGS.table:
        _valid_input_gradient_table(rng)


def _winograd_table(rng) -> None:
    import jax.numpy as jnp

    from fcn_unet_jax.ops import nhwc, winograd

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
            return nhwc.lax_conv(x, k, (1, 1), padding, dilations)

        def transformed(x, k, dilations=dilations, padding=padding):
            return winograd.conv3x3(x, k, dilations, padding)

        df, dt, dc = _measure_forward_and_train(direct, x, kernel, dy)
        wf, wt, wc = _measure_forward_and_train(transformed, x, kernel, dy)
        print(
            f'| {name} | {side} x {side} | {c_in} -> {c_out} | {dilation} '
            f'| {1e3 * df:.0f} / {1e3 * dt:.0f} | {1e3 * wf:.0f} / {1e3 * wt:.0f} '
            f'| {df / wf:.2f} / {dt / wt:.2f} | {dc:.1f} / {wc:.1f} '
            f'| {winograd.pays(c_in, c_out, shape[1:3])} '
            f'/ {winograd.pays(c_in, c_out, shape[1:3], "training")} |',
            flush=True,
        )


def _kernel_gradient_table(rng) -> None:
    import jax
    import jax.numpy as jnp

    from fcn_unet_jax.ops import kernel_gradient

    print(
        '\n| 3x3 kernel gradient | map | channels | padding inside ms | padded input ms '
        '| over the output gradient ms | taken |'
    )
    print('| --- | --- | --- | --- | --- | --- | --- |')
    padding = ((1, 1), (1, 1))
    for side, c_in, c_out in KERNEL_GRADIENT_LAYERS:
        x = jnp.asarray(rng.normal(size=(FLAGS.batch_size, side, side, c_in)), jnp.float32)
        dy = jnp.asarray(rng.normal(size=(*x.shape[:3], c_out)), jnp.float32)
        kernel = jnp.zeros((3, 3, c_in, c_out), jnp.float32)

        def inside(x, dy, kernel=kernel):
            def conv(k):
                dims = ('NHWC', 'HWIO', 'NHWC')
                return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=dims)

            return jax.vjp(conv, kernel)[1](dy)[0]

        def padded(x, dy, kernel=kernel):
            return kernel_gradient.kernel_grad_over_input(x, kernel, dy, padding, (1, 1))

        def swapped(x, dy, kernel=kernel):
            return kernel_gradient.kernel_grad_over_output_gradient(x, kernel, dy, padding, (1, 1))

        inside_s, _ = _measure(inside, x, dy)
        padded_s, _ = _measure(padded, x, dy)
        swapped_s, _ = _measure(swapped, x, dy)
        taken = kernel_gradient.transposes_output_gradient(kernel.shape, dy.shape)
        print(
            f'| | {side} x {side} | {c_in} -> {c_out} | {1e3 * inside_s:.0f} '
            f'| {1e3 * padded_s:.0f} | {1e3 * swapped_s:.0f} '
            f'| {"over dy" if taken else "padded input"} |',
            flush=True,
        )


def _decoder_table(rng) -> None:
    import jax
    import jax.numpy as jnp

    from fcn_unet_jax.ops import convolutions, upsampling

    print(
        '\n| decoder conv1 | input map | channels (input + skip -> out) '
        '| conv of the concatenation fwd / train ms | UpsampledConcatConv fwd / train ms |'
    )
    print('| --- | --- | --- | --- | --- |')
    for side, c_in, c_skip, c_out in DECODER_LAYERS:
        n = FLAGS.batch_size
        x = jnp.asarray(rng.normal(size=(n, side, side, c_in)), jnp.float32)
        skip = jnp.asarray(rng.normal(size=(n, 2 * side, 2 * side, c_skip)), jnp.float32)
        dy = jnp.asarray(rng.normal(size=(n, 2 * side, 2 * side, c_out)), jnp.float32)
        concat_conv = convolutions.Conv(c_out, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
        split_conv = upsampling.UpsampledConcatConv(c_out, (3, 3), use_bias=False)
        skip_or_none = skip if c_skip else None

        def merged(x, skip, c_skip=c_skip):
            up = upsampling.upsample_nearest2x(x)
            return jnp.concatenate([up, skip], axis=-1) if c_skip else up

        params = split_conv.init(jax.random.key(0), x, skip_or_none)

        def concatenated(params, x, skip, concat_conv=concat_conv, merged=merged):
            return concat_conv.apply(params, merged(x, skip))

        def split(params, x, skip, split_conv=split_conv, skip_or_none=skip_or_none):
            return split_conv.apply(params, x, skip_or_none)

        times = []
        for forward in (concatenated, split):

            def train(params, x, skip, dy, forward=forward):
                def loss(params, x, skip):
                    return jnp.vdot(forward(params, x, skip), dy)

                return jax.grad(loss, argnums=(0, 1, 2))(params, x, skip)

            times.append(
                (_measure(forward, params, x, skip)[0], _measure(train, params, x, skip, dy)[0])
            )
        (cf, ct), (sf, st) = times
        print(
            f'| | {side} x {side} | {c_in} + {c_skip} -> {c_out} '
            f'| {1e3 * cf:.0f} / {1e3 * ct:.0f} | {1e3 * sf:.0f} / {1e3 * st:.0f} |',
            flush=True,
        )


def _space_to_depth_table(rng) -> None:
    import jax.numpy as jnp

    from fcn_unet_jax.ops import convolutions, space_to_depth

    print(
        '\n| thin 3x3 conv | input map | channels | direct fwd / train ms '
        '| 2x2 blocks fwd / train ms | speed-up fwd / train | blocks taken |'
    )
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for name, side, c_in, c_out, pad in THIN_LAYERS:
        x = jnp.asarray(rng.normal(size=(FLAGS.batch_size, side, side, c_in)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)) * 0.1, jnp.float32)
        padding = ((pad, pad), (pad, pad))
        out_side = side + 2 * pad - 2
        dy = jnp.asarray(
            rng.normal(size=(FLAGS.batch_size, out_side, out_side, c_out)), jnp.float32
        )

        def direct(x, k, padding=padding):
            # The path a thin conv took before: `conv2d`, with its CPU kernel gradient.
            return convolutions.conv2d(x, k, (1, 1), padding, (1, 1))

        def blocks(x, k, padding=padding):
            return space_to_depth.conv3x3(x, k, padding)

        df, dt, _ = _measure_forward_and_train(direct, x, kernel, dy)
        bf, bt, _ = _measure_forward_and_train(blocks, x, kernel, dy)
        print(
            f'| {name} | {side} x {side} | {c_in} -> {c_out} '
            f'| {1e3 * df:.1f} / {1e3 * dt:.1f} | {1e3 * bf:.1f} / {1e3 * bt:.1f} '
            f'| {df / bf:.2f} / {dt / bt:.2f} '
            f'| {space_to_depth.pays(c_in, c_out, (side, side))} |',
            flush=True,
        )


def _valid_input_gradient_table(rng) -> None:
    import jax
    import jax.numpy as jnp

    from fcn_unet_jax.ops import convolutions, nhwc

    print(
        '\n| VALID conv input gradient | input map | channels | kernel | XLA ms '
        '| tap by tap ms | speed-up | taken |'
    )
    print('| --- | --- | --- | --- | --- | --- | --- | --- |')
    for name, side, c_in, c_out, k in VALID_LAYERS:
        x = jnp.asarray(rng.normal(size=(FLAGS.batch_size, side, side, c_in)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(k, k, c_in, c_out)) * 0.05, jnp.float32)
        out = side - k + 1
        dy = jnp.asarray(rng.normal(size=(FLAGS.batch_size, out, out, c_out)), jnp.float32)

        def by_xla(x, kernel, dy):
            def conv(x):
                return nhwc.lax_conv(x, kernel, (1, 1), 'VALID')

            return jax.vjp(conv, x)[1](dy)[0]

        def by_taps(x, kernel, dy):
            return convolutions.input_grad_by_taps(dy, kernel, x.shape[1:3])

        xla_s, _ = _measure(by_xla, x, kernel, dy)
        taps_s, _ = _measure(by_taps, x, kernel, dy)
        taken = convolutions.input_grad_by_taps_pays(x.shape, dy.shape, ((0, 0), (0, 0)), (1, 1))
        print(
            f'| {name} | {side} x {side} | {c_in} -> {c_out} | {k} x {k} '
            f'| {1e3 * xla_s:.1f} | {1e3 * taps_s:.1f} | {xla_s / taps_s:.2f} | {taken} |',
            flush=True,
        )


if __name__ == '__main__':
    xla_options.set_default_flags()  # Before JAX starts its backends.
    app.run(errors.guard(main), flags_parser=errors.parse_flags)
