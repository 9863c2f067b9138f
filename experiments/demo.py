"""`make demo`: train a small U-Net and a small FCN-8s on `shapes`, evaluate, compare.

Builds the synthetic `shapes` dataset if needed, trains both models (configs/shapes_unet.py
and configs/shapes_fcn8s.py) into `WORKDIR/<model>`, prints a Markdown table of their
validation metrics and writes image | ground truth | prediction overlays of a few
validation images (titled, enlarged, with a class legend) to `WORKDIR/<model>/overlays/`.
Rerunning resumes (a finished run is only re-evaluated); delete WORKDIR to train from
scratch. Input errors (a WORKDIR holding other runs, missing data) are one `error: ...` line
with exit status 1 (`--traceback` adds the traceback; see `fcn_unet_jax.errors`).

    python -m experiments.demo --workdir=workdirs/demo
"""

import os
import re
import time
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from configs import shapes_fcn8s, shapes_unet
from fcn_unet_jax import checkpointing, errors, inference, train, visualize, xla_options
from fcn_unet_jax.data import builders, input_pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'workdirs/demo', 'Parent directory of the two runs.')
flags.DEFINE_string('data_dir', None, 'tfds data_dir (default: tfds default).')
flags.DEFINE_integer('num_overlays', 4, 'Validation images to render per model.')

EXPERIMENTS = {'U-Net': shapes_unet, 'FCN-8s': shapes_fcn8s}
COLUMNS = {
    'pixel_accuracy': 'pixel acc',
    'mean_accuracy': 'mean acc',
    'mean_iou': 'mean IoU',
    'frequency_weighted_iou': 'f.w. IoU',
    'dice': 'Dice',
}


def write_overlays(config: ml_collections.ConfigDict, workdir: str, count: int) -> list[str]:
    """Renders the first `count` validation images with their ground truth and prediction.

    Args:
      config: the run's config.
      workdir: the run's workdir (its latest checkpoint is used).
      count: number of images.

    Returns:
      Paths of the written PNG files.
    """
    model, variables = checkpointing.restore_model(workdir, config)
    info = input_pipeline.get_dataset_info(config)

    @jax.jit
    def predict(image):
        logits = inference.main_logits(model.apply(variables, image[None], train=False))
        return logits[0].argmax(-1)

    builder = builders.get_builder(config.dataset)
    source = builder.as_data_source(config.dataset.eval_split)
    paths = []
    for index in range(min(count, len(source))):
        example = source[index]
        image = np.asarray(example['image'])
        label = np.asarray(example['segmentation_mask'])[..., 0]
        pred = np.asarray(predict(np.asarray(input_pipeline.preprocess_image(image, config))))
        panel = visualize.labelled_panel(image, label, pred, info.class_names, info.palette)
        file_name = example['file_name']
        if isinstance(file_name, bytes):
            file_name = file_name.decode()
        name = re.sub(r'[^A-Za-z0-9_.-]+', '_', os.path.basename(file_name))
        path = os.path.join(workdir, 'overlays', f'{index:02d}_{os.path.splitext(name)[0]}.png')
        visualize.save_png(path, panel)
        paths.append(path)
    return paths


def markdown_table(reports: Mapping[str, Mapping], seconds: Mapping[str, float]) -> str:
    """Metrics of each model as a Markdown table."""
    lines = [
        '| model | ' + ' | '.join(COLUMNS.values()) + ' | steps | time (s) |',
        '|---' * (len(COLUMNS) + 3) + '|',
    ]
    for name, report in reports.items():
        values = ' | '.join(f'{report[key]:.4f}' for key in COLUMNS)
        lines.append(f'| {name} | {values} | {report["step"]} | {seconds[name]:.0f} |')
    return '\n'.join(lines)


def main(argv: list[str]) -> None:
    """Trains, evaluates and renders both demo models, then prints their metrics table."""
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    start = time.time()
    reports, seconds = {}, {}
    for name, module in EXPERIMENTS.items():
        config = module.get_config()
        config.dataset.data_dir = FLAGS.data_dir
        workdir = os.path.join(FLAGS.workdir, re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_'))
        began = time.time()
        summaries = train.train_and_evaluate(config, workdir)
        reports[name] = summaries['eval']
        seconds[name] = time.time() - began
        for path in write_overlays(config, workdir, FLAGS.num_overlays):
            logging.info('Wrote %s', path)
        print(f'{name}: mean IoU {reports[name]["mean_iou"]:.4f}; overlays in {workdir}/overlays')
    print()
    print(f'Validation metrics on `shapes` ({config.dataset.eval_split} split):')
    print()
    print(markdown_table(reports, seconds))
    print()
    print(f'Total wall time: {time.time() - start:.0f} s')


if __name__ == '__main__':
    xla_options.set_default_flags()  # Before JAX starts its backends.
    app.run(errors.guard(main), flags_parser=errors.parse_flags)
