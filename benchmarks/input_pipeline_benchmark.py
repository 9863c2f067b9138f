"""Throughput of the training input pipeline (examples/s) on VOC-like data.

Generates a `folder` dataset of JPEG images (about 500 x 375, VOC's typical size, with
smooth random content) and grayscale index PNG masks in a temporary directory, prepares
it in the array_record format, and times the train pipeline (`train_dataset`) at each crop
size, with and without the elastic deformation (and optionally the border weight map).
`--compare_autotuning` times each configuration a second time with tf.data's autotuning
turned back on (the project's pipelines run without it, see
`input_pipeline._without_autotuning`); `--compare_cache` times it with the split decoded
once into memory (`config.input.cache_decoded`). Prints a Markdown table of examples/s and
of the process's CPU time per batch: in training the pipeline shares the cores with the
train step, so its CPU time, not its rate alone, is what it costs the step.

    python -m benchmarks.input_pipeline_benchmark [--crop_sizes=320,512] [--steps=20] \
        [--border_weights] [--compare_autotuning] [--compare_cache]

`--config` times a config's own train pipeline instead, on its dataset (prepared first if
needed), as its training runs would read it; the skip ablation's, for example:

    python -m benchmarks.input_pipeline_benchmark \
        --config=configs/skip_ablation_shapes.py:unet --steps=200
"""

import os
import tempfile
import time

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import app, flags
from PIL import Image

from configs import default
from fcn_unet_jax import config_files, errors
from fcn_unet_jax.data import builders, input_pipeline

FLAGS = flags.FLAGS
flags.DEFINE_integer('num_images', 120, 'Images in the generated dataset.')
flags.DEFINE_list('crop_sizes', ['320', '512'], 'Square crop sizes to time.')
flags.DEFINE_integer('batch_size', 8, 'Global batch size (one process).')
flags.DEFINE_integer('steps', 20, 'Timed steps per configuration (after 3 warm-up steps).')
flags.DEFINE_bool('border_weights', False, 'Also time the border weight map.')
flags.DEFINE_bool(
    'compare_autotuning', False, 'Also time each configuration with tf.data autotuning on.'
)
flags.DEFINE_bool(
    'compare_cache', False, 'Also time each configuration with the decoded split in memory.'
)
flags.DEFINE_string('workdir', None, 'Where to write the data; default: a temporary folder.')
config_files.define_config_flag(
    help_string="Time this config's own train pipeline instead (a file or a name)."
)

_NUM_CLASSES = 21


def _write_folder_dataset(root: str, num_images: int) -> None:
    """Writes `images/*.jpg` and `masks/*.png` with VOC-like sizes and label statistics."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, 'images'), exist_ok=True)
    os.makedirs(os.path.join(root, 'masks'), exist_ok=True)
    for i in range(num_images):
        height, width = (375, 500) if rng.random() < 0.7 else (500, 375)
        coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        noise = rng.normal(0, 8, size=(height, width, 3))
        pixels = np.clip(np.asarray(image, np.float64) + noise, 0, 255).astype(np.uint8)
        mask = np.zeros((height, width), np.uint8)
        for _ in range(rng.integers(1, 4)):
            top, left = rng.integers(0, height - 60), rng.integers(0, width - 60)
            bottom = top + rng.integers(40, height - top)
            right = left + rng.integers(40, width - left)
            mask[top:bottom, left:right] = rng.integers(1, _NUM_CLASSES)
            # VOC draws a 255 (ignore) outline around objects.
            mask[top:bottom, [left, right - 1]] = 255
            mask[[top, bottom - 1], left:right] = 255
        Image.fromarray(pixels).save(os.path.join(root, 'images', f'{i:05d}.jpg'), quality=90)
        Image.fromarray(mask).save(os.path.join(root, 'masks', f'{i:05d}.png'))


def _rate_and_cpu(config, steps: int, autotuning: bool) -> tuple[float, float]:
    """Examples/s and CPU milliseconds (all threads) per batch over `steps` batches."""
    dataset = input_pipeline.train_dataset(config)
    if autotuning:
        options = tf.data.Options()
        options.autotune.enabled = True  # Overrides the pipeline's own option.
        dataset = dataset.with_options(options)
    iterator = dataset.as_numpy_iterator()
    for _ in range(3):
        next(iterator)
    start, cpu = time.perf_counter(), os.times()
    for _ in range(steps):
        next(iterator)
    seconds, end_cpu = time.perf_counter() - start, os.times()
    cpu_seconds = end_cpu.user + end_cpu.system - cpu.user - cpu.system
    return steps * config.batch_size / seconds, 1000 * cpu_seconds / steps


def _time_config(config, steps: int) -> None:
    """Prints one row for `config`'s own train pipeline."""
    builders.prepare(config.dataset)
    rate, cpu = _rate_and_cpu(config, steps, autotuning=False)
    crop = 'x'.join(str(c) for c in config.input.crop_size)
    print(f'\n{config.dataset.name}, batch {config.batch_size}, {os.cpu_count()} CPUs\n')
    print('| crop | border weights | decoded cache | examples/s | CPU ms/batch |')
    print('| ---: | :---: | :---: | ---: | ---: |')
    print(
        f'| {crop} | {bool(config.input.get("border_weights"))} | '
        f'{"yes" if config.input.get("cache_decoded") else "no"} | {rate:.1f} | {cpu:.1f} |'
    )


def main(argv):
    del argv
    if FLAGS.config is not None:
        _time_config(FLAGS.config, FLAGS.steps)
        return
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix='input_pipeline_benchmark_')
    root = os.path.join(workdir, 'voc_like')
    if not os.path.isdir(root):
        _write_folder_dataset(root, FLAGS.num_images)
    config = default.get_config()
    config.dataset.name = 'folder'
    config.dataset.folder_root = root
    config.dataset.data_dir = os.path.join(workdir, 'tfds')
    config.batch_size = FLAGS.batch_size
    config.model.name = 'fcn8s_vgg16'
    config.model.num_classes = _NUM_CLASSES
    builders.get_builder(config.dataset).download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )

    variants = [('no', False), ('yes', True)]
    tunings = [False, True] if FLAGS.compare_autotuning else [False]
    caches = [False, True] if FLAGS.compare_cache else [False]
    rows = []
    for crop in (int(c) for c in FLAGS.crop_sizes):
        for elastic_name, elastic in variants:
            config.input.crop_size = (crop, crop)
            config.input.elastic = elastic
            config.input.border_weights = FLAGS.border_weights
            for autotuning in tunings:
                for cache in caches:
                    config.input.cache_decoded = cache
                    rate, cpu = _rate_and_cpu(config, FLAGS.steps, autotuning)
                    rows.append(
                        f'| {crop} | {elastic_name} | {FLAGS.border_weights} | '
                        f'{"on" if autotuning else "off"} | {"yes" if cache else "no"} | '
                        f'{rate:.1f} | {cpu:.0f} |'
                    )

    print(
        f'\n{FLAGS.num_images} JPEGs of ~500x375, batch {FLAGS.batch_size}, {os.cpu_count()} CPUs'
    )
    print('scale (0.5, 2.0), hflip, no colour jitter, FCN BGR normalisation\n')
    print(
        '| crop | elastic | border weights | tf.data autotuning | decoded cache | examples/s '
        '| CPU ms/batch |'
    )
    print('| ---: | :---: | :---: | :---: | :---: | ---: | ---: |')
    print('\n'.join(rows))


if __name__ == '__main__':
    app.run(errors.guard(main), flags_parser=errors.parse_flags)
