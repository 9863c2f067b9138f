r"""Times the eval step's metric counts (`metrics.segmentation_counts`) on random label maps.

Prints ms per batch, median of `--repeats` calls after a warm-up, for the whole count set
and for its parts: the Boundary IoU counts in both of their exact forms (window extremes
of the label maps, which CPU programs run, and box sums of every class mask, which other
platforms run), the trimap bands and the confusion matrix. The label maps are blobs (a
random grid of classes scaled up), the predictions the same blobs with 10% of the pixels
changed, so the bands are those of a segmentation, not of noise.

    python -m benchmarks.metrics_benchmark                      # shapes_fine's eval batches
    python -m benchmarks.metrics_benchmark --batch_size=8 --size=500 --num_classes=21  # VOC
"""

import functools
import statistics
import time

from absl import app, flags

from fcn_unet_jax import errors, xla_options

flags.DEFINE_integer('batch_size', 20, 'Images per batch.')
flags.DEFINE_integer('size', 256, 'Square image size in pixels.')
flags.DEFINE_integer('num_classes', 7, 'Classes C.')
flags.DEFINE_integer('repeats', 5, 'Timed calls per function.')
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    for name, least in (('batch_size', 1), ('size', 2), ('num_classes', 2), ('repeats', 1)):
        if FLAGS[name].value < least:
            raise errors.UserError(f'--{name}={FLAGS[name].value}: expected at least {least}.')
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fcn_unet_jax import metrics

    batch, size, num_classes = FLAGS.batch_size, FLAGS.size, FLAGS.num_classes
    rng = np.random.default_rng(0)
    cell = max(1, size // 16)
    grid = rng.integers(0, num_classes, (batch, size // cell + 1, size // cell + 1))
    labels = np.kron(grid, np.ones((1, cell, cell), int))[:, :size, :size].astype(np.int32)
    changed = rng.random(labels.shape) < 0.1
    preds = np.where(changed, rng.integers(0, num_classes, labels.shape), labels).astype(np.int32)
    mask = np.ones(labels.shape, bool)
    labels, preds, mask = jnp.asarray(labels), jnp.asarray(preds), jnp.asarray(mask)
    radius = metrics._image_dilation(mask, metrics.BOUNDARY_DILATION_RATIO)
    max_radius = metrics.boundary_dilation(size, size) + 1
    # The arrays are arguments, never closed-over constants, which XLA would fold while
    # compiling.
    functions = {
        'all counts (segmentation_counts)': lambda labels, preds, mask, radius: (
            metrics.segmentation_counts(labels, preds, num_classes, 255, mask)
        ),
        'Boundary IoU, window extremes (CPU)': lambda labels, preds, mask, radius: (
            metrics._boundary_counts_by_windows(
                labels, preds, mask, mask, radius, num_classes, max_radius
            )
        ),
        'Boundary IoU, box sums (elsewhere)': lambda labels, preds, mask, radius: (
            metrics._boundary_counts_by_box_sums(labels, preds, mask, mask, radius, num_classes)
        ),
        'trimap bands': lambda labels, preds, mask, radius: metrics.trimap_bands(
            labels, metrics.TRIMAP_WIDTHS, mask
        ),
        'confusion matrix': lambda labels, preds, mask, radius: metrics.confusion_matrix(
            labels, preds, num_classes, 255, mask
        ),
    }
    print(f'batch {batch}, {size} x {size} px, {num_classes} classes, on {jax.devices()[0]}')
    print('| counts | ms per batch |\n| --- | ---: |')
    for name, function in functions.items():
        jitted = functools.partial(jax.jit(function), labels, preds, mask, radius)
        jax.block_until_ready(jitted())
        times = []
        for _ in range(FLAGS.repeats):
            began = time.perf_counter()
            jax.block_until_ready(jitted())
            times.append(time.perf_counter() - began)
        print(f'| {name} | {1e3 * statistics.median(times):.0f} |')


if __name__ == '__main__':
    xla_options.set_default_flags()  # Before JAX starts its backends.
    app.run(errors.guard(main), flags_parser=errors.parse_flags)
