r"""Skip-connection ablation: train the skip variants of one model family over several seeds.

FCN (`--family=fcn`, e.g. `fcn8s_vgg16`): `32s` (no skips), `16s` (pool4), `8s` (pool4 +
pool3), each fused by a sum (the paper) and, for `16s_concat` / `8s_concat`, by a concat
(32s has nothing to merge, so it appears once). U-Net (`--family=unet`): `full` (every
skip of the model), `no_sK` (the skip at encoder stride K removed, for each K in turn) and
`none` (no skips at all). The variants only change `config.model.skip_strides` and
`config.model.merge`; everything else comes from `--config`.

Each run trains in `OUTPUT/runs/<variant>_seed<k>` (config.seed = k) with
`train.train_and_evaluate`; a run that already finished (its eval_results.json is at the
final step) is reused, an unfinished one resumes from its checkpoints. The sweep writes

* `OUTPUT/results.md`: a Markdown table, one row per variant, of the mean ± std over seeds
  (sample std, ddof=1; 0 with a single seed) of mean IoU, pixel accuracy, mean accuracy,
  frequency-weighted IoU and Dice on the config's eval split;
* `OUTPUT/results.png`: a bar chart of mean IoU ± std per variant;
* `OUTPUT/results.json`: every run's metrics, wall time and the aggregates.

On `shapes` (minutes on a CPU):

    python -m experiments.skip_ablation --family=unet \
        --config=configs/skip_ablation_shapes.py:unet --seeds=0,1,2 --output=workdirs/ablation_unet

On real data, point `--config` at another config of the same family (e.g.
`--config=configs/fcn_voc.py:8s --config.init_from=...`); `--steps` overrides
`num_train_steps` and `--variants=32s,8s` limits the variants.
"""

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags, logging
from matplotlib.figure import Figure
from ml_collections import config_flags

from fcn_unet_jax import models, train, xla_options
from fcn_unet_jax import workdir as workdir_files

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Base config of the sweep.', lock_config=True)
flags.DEFINE_enum('family', None, ['fcn', 'unet'], 'Model family whose skips are ablated.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (config.seed) of each variant.')
flags.DEFINE_string('output', None, 'Directory for runs/, results.md, .png and .json.')
flags.DEFINE_integer('steps', None, 'Overrides config.num_train_steps when given.')
flags.DEFINE_list('variants', None, 'Subset of the variants to run (default: all).')

# Metric key in the eval report -> column title, mean IoU first (the headline number).
COLUMNS = {
    'mean_iou': 'mean IoU',
    'pixel_accuracy': 'pixel acc',
    'mean_accuracy': 'mean acc',
    'frequency_weighted_iou': 'f.w. IoU',
    'dice': 'Dice',
}
# FCN variants: name -> (skip_strides, merge). 32s has no skip to merge, so it runs once.
FCN_VARIANTS = {
    '32s': ((), 'sum'),
    '16s': ((16,), 'sum'),
    '8s': ((16, 8), 'sum'),
    '16s_concat': ((16,), 'concat'),
    '8s_concat': ((16, 8), 'concat'),
}

Variant = tuple[tuple[int, ...], str]


def family_variants(family: str, model_name: str) -> dict[str, Variant]:
    """The ablation variants of `family` for the registered model `model_name`.

    Args:
      family: 'fcn' or 'unet'.
      model_name: a key of `models.MODELS`; its family must be `family`.

    Returns:
      Variant name -> (skip_strides, merge), in table order.

    Raises:
      ValueError: `model_name` is not of `family`.
    """
    info = models.MODELS[model_name]
    if info.family != family:
        raise ValueError(
            f'--family={family} but config.model.name={model_name!r} is a {info.family!r} '
            'model; pass a config of that family.'
        )
    if family == 'fcn':
        return dict(FCN_VARIANTS)
    full = tuple(info.default_skip_strides)
    variants = {'full': (full, 'concat')}
    for stride in sorted(full):
        variants[f'no_s{stride}'] = (tuple(s for s in full if s != stride), 'concat')
    variants['none'] = ((), 'none')
    return variants


def _finished_report(workdir: str, num_steps: int) -> dict[str, Any] | None:
    """The run's final eval report if it finished all `num_steps` steps, else None."""
    report = workdir_files.read_eval_results(workdir)
    return report if report is not None and report.get('step') == num_steps else None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return float(values.mean()), std


def run_sweep(
    config: ml_collections.ConfigDict,
    family: str,
    seeds: Sequence[int],
    output: str,
    variant_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Trains every (variant, seed) run and writes results.md, results.png and results.json.

    Args:
      config: the base config; only `seed`, `model.skip_strides` and `model.merge` change.
      family: 'fcn' or 'unet' (must match `config.model.name`).
      seeds: values of `config.seed`.
      output: directory for `runs/` and the results files.
      variant_names: a subset of the family's variants, in the given order; None = all.

    Returns:
      The content of results.json: `family`, `model`, `seeds`, `num_train_steps` and
      `variants` (name -> `skip_strides`, `merge`, `runs` (seed -> metrics and seconds),
      `mean` and `std` (metric -> value)).

    Raises:
      ValueError: an unknown variant name or a config of another family.
    """
    available = family_variants(family, config.model.name)
    names = list(variant_names) if variant_names else list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f'Unknown variants {unknown}; {family} variants: {list(available)}.')
    results: dict[str, Any] = {
        'family': family,
        'model': config.model.name,
        'seeds': list(seeds),
        'num_train_steps': config.num_train_steps,
        'variants': {},
    }
    for name in names:
        skip_strides, merge = available[name]
        runs = {}
        for seed in seeds:
            workdir = os.path.join(output, 'runs', f'{name}_seed{seed}')
            report = _finished_report(workdir, config.num_train_steps)
            seconds = 0.0
            if report is None:
                run_config = config.copy_and_resolve_references()
                run_config.seed = seed
                run_config.model.skip_strides = skip_strides
                run_config.model.merge = merge
                began = time.time()
                report = train.train_and_evaluate(run_config, workdir)['eval']
                seconds = time.time() - began
            else:
                logging.info('Reusing the finished run in %s.', workdir)
            runs[str(seed)] = {key: float(report[key]) for key in COLUMNS} | {'seconds': seconds}
            logging.info('%s seed %d: mean IoU %.4f', name, seed, runs[str(seed)]['mean_iou'])
        stats = {key: _mean_std([r[key] for r in runs.values()]) for key in COLUMNS}
        results['variants'][name] = {
            'skip_strides': list(skip_strides),
            'merge': merge,
            'runs': runs,
            'mean': {key: mean for key, (mean, _) in stats.items()},
            'std': {key: std for key, (_, std) in stats.items()},
        }
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, 'results.json'), 'w') as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(output, 'results.md'), 'w') as f:
        f.write(markdown_table(results) + '\n')
    plot_mean_iou(results, os.path.join(output, 'results.png'))
    return results


def markdown_table(results: Mapping[str, Any]) -> str:
    """The results as a Markdown table: one row per variant, `mean ± std` per metric.

    Args:
      results: the dict that `run_sweep` returns.

    Returns:
      The table, preceded by a line naming the model, seeds and steps.
    """
    seeds = ', '.join(str(s) for s in results['seeds'])
    lines = [
        f'{results["model"]}, {results["num_train_steps"]} steps, seeds {seeds} '
        '(mean ± sample std over seeds):',
        '',
        '| variant | skip strides | merge | ' + ' | '.join(COLUMNS.values()) + ' |',
        '|---' * (len(COLUMNS) + 3) + '|',
    ]
    for name, variant in results['variants'].items():
        strides = ', '.join(str(s) for s in variant['skip_strides']) or '-'
        cells = [f'{variant["mean"][key]:.4f} ± {variant["std"][key]:.4f}' for key in COLUMNS]
        lines.append(f'| {name} | {strides} | {variant["merge"]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot_mean_iou(results: Mapping[str, Any], path: str) -> None:
    """Writes a bar chart of mean IoU ± std per variant to `path` (PNG).

    Args:
      results: the dict that `run_sweep` returns.
      path: output file.
    """
    names = list(results['variants'])
    means = [results['variants'][n]['mean']['mean_iou'] for n in names]
    stds = [results['variants'][n]['std']['mean_iou'] for n in names]
    # A bare Figure renders with the Agg canvas and never touches pyplot's global state or
    # a display, so the sweep also runs on headless machines and inside tests.
    figure = Figure(figsize=(1.2 * len(names) + 2.0, 4.0), layout='constrained')
    axes = figure.subplots()
    axes.bar(names, means, yerr=stds, capsize=4, color='tab:blue')
    axes.set_ylabel('mean IoU')
    axes.set_ylim(0.0, 1.0)
    axes.set_title(
        f'{results["model"]} skip ablation ({len(results["seeds"])} seeds, '
        f'{results["num_train_steps"]} steps)'
    )
    axes.grid(axis='y', alpha=0.3)
    figure.savefig(path, dpi=100)


def main(argv: list[str]) -> None:
    """Runs the sweep that the flags describe and prints the results table."""
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    config = FLAGS.config
    if FLAGS.steps is not None:
        config.num_train_steps = FLAGS.steps
    start = time.time()
    results = run_sweep(
        config,
        FLAGS.family,
        [int(s) for s in FLAGS.seeds],
        FLAGS.output,
        FLAGS.variants,
    )
    print(markdown_table(results))
    print()
    print(f'Wrote {FLAGS.output}/results.md, results.png and results.json')
    print(f'Total wall time: {time.time() - start:.0f} s')


if __name__ == '__main__':
    xla_options.set_default_flags()  # Before JAX starts its backends.
    flags.mark_flags_as_required(['config', 'family', 'output'])
    app.run(main)
