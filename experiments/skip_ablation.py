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

* `OUTPUT/results.md`: per variant the mean, sample std and 95% confidence interval
  (Student t, n - 1 degrees of freedom) over seeds of mean IoU and Boundary IoU, and the
  paired difference to the full model (`8s` for FCN, `full` for U-Net) over the seeds both
  have, with its 95% interval; a second table of the other metrics (pixel and mean
  accuracy, f.w. IoU, Dice, trimap mean IoU per band width) as mean ± std; then every
  run's numbers, train loss and flags;
* `OUTPUT/results.png`: per variant, each seed's mean IoU and Boundary IoU and the mean
  with its 95% interval;
* `OUTPUT/results.json`: every run's metrics, wall time and flags, and the aggregates.

Collapsed runs: a run whose final train loss is still at least `COLLAPSE_LOSS_FRACTION` of
the entropy of the class prior (estimated from the eval split's ground truth: the loss of
predicting the class frequencies everywhere; checked only when the loss is plain
cross-entropy, the one that entropy bounds: a weighted loss such as the U-Net border map
has another scale), or that predicts one class only, learned nothing but the prior. So did
a run that never predicts a class which most of the other seeds of its variant predict:
that class failed to train in this seed (a U-Net that never starts predicting the thin
bars, say). Either is flagged in its row and left out of its variant's statistics and of
every paired difference, with a note under the table. A class that most seeds of a variant
never predict is named in their rows without excluding them: a stride-32 output may never
resolve a 2 px bar, which is the effect being measured.

On `shapes_fine` (budgets and results: docs/replication.md):

    python -m experiments.skip_ablation --family=fcn --config=configs/skip_ablation_shapes.py:fcn \
        --variants=32s,16s,8s --seeds=0,1,2,3,4 --output=workdirs/ablation_fcn
    python -m experiments.skip_ablation --family=unet \
        --config=configs/skip_ablation_shapes.py:unet --variants=full,no_s1,none \
        --seeds=0,1,2,3,4 --output=workdirs/ablation_unet

On real data, point `--config` at another config of the same family (e.g.
`--config=configs/fcn_voc.py:8s --config.init_from=...`); `--steps` overrides
`num_train_steps` and the per-variant budgets (`config.variant_train_steps`), and
`--variants=32s,8s` limits the variants.
"""

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from matplotlib.figure import Figure
from scipy import stats

from fcn_unet_jax import config_files, errors, metrics, models, run_programs, train, xla_options
from fcn_unet_jax import workdir as workdir_files

FLAGS = flags.FLAGS
config_files.define_config_flag(help_string='Base config of the sweep (a file or a name).')
flags.DEFINE_enum('family', None, ['fcn', 'unet'], 'Model family whose skips are ablated.')
flags.DEFINE_list('seeds', ['0', '1', '2', '3', '4'], 'Seeds (config.seed) of each variant.')
flags.DEFINE_string('output', None, 'Directory for runs/, results.md, .png and .json.')
flags.DEFINE_integer(
    'steps', None, 'Overrides config.num_train_steps (and every variant_train_steps) when given.'
)
flags.DEFINE_list('variants', None, 'Subset of the variants to run (default: all).')

# The headline metrics: mean, std, 95% interval and paired difference to the full model.
HEADLINE = {'mean_iou': 'mean IoU', 'boundary_iou': 'Boundary IoU'}
# The other metrics of the eval report, as mean ± std.
OTHER = {
    'pixel_accuracy': 'pixel acc',
    'mean_accuracy': 'mean acc',
    'frequency_weighted_iou': 'f.w. IoU',
    'dice': 'Dice',
} | {f'trimap_mean_iou_{w}px': f'trimap IoU {w} px' for w in metrics.TRIMAP_WIDTHS}
COLUMNS = HEADLINE | OTHER
# The variant every other one is compared with, seed by seed: the paper's full model.
REFERENCE = {'fcn': '8s', 'unet': 'full'}
# A final train loss at or above this fraction of the class-prior entropy: nothing learned.
COLLAPSE_LOSS_FRACTION = 0.9
CONFIDENCE = 0.95
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


def _final_train_loss(workdir: str) -> float | None:
    """The mean train loss of the run's last logging interval (metrics.jsonl)."""
    losses = [r['train/loss'] for r in workdir_files.read_metrics_log(workdir) if 'train/loss' in r]
    return float(losses[-1]) if losses else None


def loss_is_plain_cross_entropy(config: ml_collections.ConfigDict) -> bool:
    """Whether the logged train loss is the unweighted per-pixel mean cross-entropy.

    Only that loss is comparable with the class-prior entropy: class weights, the U-Net
    border map, a Dice term or an auxiliary head change its scale.
    """
    return (
        config.loss.name == 'cross_entropy'
        and config.loss.normalization == 'mean'
        and config.loss.class_weights is None
        and not config.input.get('border_weights', False)
        and not config.model.get('aux_head', False)
    )


def prior_entropy(confusion: np.ndarray) -> float:
    """Entropy (nats) of the ground-truth class frequencies: the loss of predicting them."""
    counts = np.asarray(confusion, np.float64).sum(axis=1)
    prior = counts[counts > 0] / counts.sum()
    return float(-(prior * np.log(prior)).sum())


def collapse_check(
    confusion: np.ndarray, train_loss: float | None, class_names: Sequence[str]
) -> tuple[str | None, list[str]]:
    """Whether a run collapsed, and the classes it never predicts.

    Args:
      confusion: the run's eval confusion matrix (rows ground truth).
      train_loss: its final train loss (None if unknown or not plain cross-entropy, see
        `loss_is_plain_cross_entropy`: then only the predictions are checked).
      class_names: the dataset's class names.

    Returns:
      (reason, never_predicted): `reason` is None for a run that learned more than the
      class prior, else why it did not; `never_predicted` names the classes present in the
      ground truth that the run never predicts.
    """
    confusion = np.asarray(confusion)
    present = confusion.sum(axis=1) > 0
    predicted = confusion.sum(axis=0) > 0
    never = [
        name for name, p, q in zip(class_names, present, predicted, strict=True) if p and not q
    ]
    entropy = prior_entropy(confusion)
    if predicted.sum() <= 1:
        return 'predicts a single class', never
    if train_loss is not None and train_loss >= COLLAPSE_LOSS_FRACTION * entropy:
        return f'train loss {train_loss:.3f} >= 0.9 x class-prior entropy {entropy:.3f}', never
    return None, never


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float]:
    """Mean, sample std and the half-width of the Student-t confidence interval of the mean.

    Args:
      values: one value per seed.
      confidence: coverage of the interval.

    Returns:
      `n`, `mean`, `std` (ddof=1) and `ci` (half-width; NaN, as `std`, for n < 2; the mean
      is NaN for n = 0).
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    mean = float(values.mean()) if n else math.nan
    if n < 2:
        return {'n': n, 'mean': mean, 'std': math.nan, 'ci': math.nan}
    std = float(values.std(ddof=1))
    quantile = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    return {'n': n, 'mean': mean, 'std': std, 'ci': quantile * std / math.sqrt(n)}


def variant_train_steps(config: ml_collections.ConfigDict, name: str) -> int:
    """The train steps of variant `name`.

    `config.variant_train_steps[name]` where the config gives one (a variant whose learning
    curve flattens later than the others', such as a U-Net without skips), else
    `config.num_train_steps`.
    """
    budgets = config.get('variant_train_steps') or {}
    return int(budgets.get(name, config.num_train_steps))


def _run(config, name, variant, seed, output) -> dict[str, Any]:
    """Trains (or reuses) one run and returns its metrics, wall time, loss and flags."""
    workdir = os.path.join(output, 'runs', f'{name}_seed{seed}')
    steps = variant_train_steps(config, name)
    report = _finished_report(workdir, steps)
    if report is None:
        run_config = config.copy_and_resolve_references()
        run_config.seed = seed
        run_config.num_train_steps = steps
        run_config.model.skip_strides, run_config.model.merge = variant
        report = train.train_and_evaluate(run_config, workdir)['eval']
    else:
        logging.info('Reusing the finished run in %s.', workdir)
    info = workdir_files.read_run_info(workdir) or {}
    loss = _final_train_loss(workdir)
    comparable_loss = loss if loss_is_plain_cross_entropy(config) else None
    collapsed, never = collapse_check(
        report['confusion_matrix'], comparable_loss, report['class_names']
    )
    # eval_results.json stores an undefined metric (NaN) as null.
    run = {key: math.nan if report[key] is None else float(report[key]) for key in COLUMNS}
    run |= {
        'seconds': info.get('wall_seconds'),
        'train_loss': loss,
        'collapsed': collapsed,
        'never_predicted': never,
    }
    logging.info(
        '%s seed %d: mean IoU %.4f, Boundary IoU %.4f%s',
        name,
        seed,
        run['mean_iou'],
        run['boundary_iou'],
        f' (collapsed: {collapsed})' if collapsed else '',
    )
    return run


def run_sweep(
    config: ml_collections.ConfigDict,
    family: str,
    seeds: Sequence[int],
    output: str,
    variant_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Trains every (variant, seed) run and writes results.md, results.png and results.json.

    Args:
      config: the base config; only `seed`, `model.skip_strides`, `model.merge` and, for a
        variant in `config.variant_train_steps`, `num_train_steps` change.
      family: 'fcn' or 'unet' (must match `config.model.name`).
      seeds: values of `config.seed`.
      output: directory for `runs/` and the results files.
      variant_names: a subset of the family's variants, in the given order; None = all.

    Returns:
      The content of results.json: `family`, `model`, `dataset`, `seeds`,
      `num_train_steps`, `reference` (the variant of the paired differences, or None when
      it is not in the sweep), `confidence` and `variants`: name -> `skip_strides`,
      `merge`, `num_train_steps`, `runs` (seed -> metrics, `seconds`, `train_loss`,
      `collapsed` (None or the reason), `never_predicted`), `stats` (metric -> `interval`
      over the runs that did not collapse), `paired` (metric -> `interval` of the per-seed
      differences to the reference, over the seeds where neither collapsed), `mean` and
      `std` (metric -> value, from `stats`).

    Raises:
      ValueError: an unknown variant name or a config of another family.
    """
    available = family_variants(family, config.model.name)
    names = list(variant_names) if variant_names else list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f'Unknown variants {unknown}; {family} variants: {list(available)}.')
    reference = REFERENCE[family] if REFERENCE[family] in names else None
    results: dict[str, Any] = {
        'family': family,
        'model': config.model.name,
        'dataset': config.dataset.name,
        'seeds': list(seeds),
        'num_train_steps': config.num_train_steps,
        'reference': reference,
        'confidence': CONFIDENCE,
        'variants': {},
    }
    # A variant's seeds run one after another with the same config but the seed, so each
    # takes over the previous run's compiled programs instead of tracing them again.
    with run_programs.reuse_across_runs():
        for name in names:
            results['variants'][name] = {
                'skip_strides': list(available[name][0]),
                'merge': available[name][1],
                'num_train_steps': variant_train_steps(config, name),
                'runs': {
                    str(seed): _run(config, name, available[name], seed, output) for seed in seeds
                },
            }
    summarize(results)
    results = workdir_files.jsonable(results)  # NaN (undefined) -> None, as in JSON.
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, 'results.json'), 'w') as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(output, 'results.md'), 'w') as f:
        f.write(markdown_table(results) + '\n')
    plot_results(results, os.path.join(output, 'results.png'))
    return results


def flag_missed_classes(runs: Mapping[str, dict[str, Any]]) -> None:
    """Marks as collapsed, in place, each run that never predicts a class most others predict.

    Args:
      runs: one variant's runs (seed -> run with `collapsed` and `never_predicted`); a run
        not yet collapsed whose `never_predicted` holds a class that more than half of the
        variant's other runs predict gets `collapsed` = the reason.
    """
    for seed, run in runs.items():
        others = [other for key, other in runs.items() if key != seed]
        for name in run['never_predicted']:
            predicting = sum(name not in other['never_predicted'] for other in others)
            if not run['collapsed'] and predicting > len(others) / 2:
                run['collapsed'] = (
                    f'never predicts {name}, which {predicting} of the other {len(others)} '
                    'seeds predict'
                )


def summarize(results: dict[str, Any]) -> None:
    """Flags missed classes, then adds `stats`, `mean`, `std` and `paired` to every variant.

    Args:
      results: `run_sweep`'s dict with at least `reference` and, per variant, `runs`;
        changed in place (`flag_missed_classes`, then the statistics).
    """
    reference = results['reference']
    for variant in results['variants'].values():
        flag_missed_classes(variant['runs'])
        kept = [run for run in variant['runs'].values() if not run['collapsed']]
        variant['stats'] = {key: interval([run[key] for run in kept]) for key in COLUMNS}
        variant['mean'] = {key: value['mean'] for key, value in variant['stats'].items()}
        variant['std'] = {key: value['std'] for key, value in variant['stats'].items()}
    if not reference:
        return
    base = results['variants'][reference]['runs']
    for variant in results['variants'].values():
        # Paired by seed: the same initialisation and data order, so seed-to-seed noise
        # common to both variants cancels.
        both = [
            seed
            for seed, run in variant['runs'].items()
            if seed in base and not run['collapsed'] and not base[seed]['collapsed']
        ]
        variant['paired'] = {
            key: interval([variant['runs'][s][key] - base[s][key] for s in both])
            for key in HEADLINE
        }


def _value(value: float, digits: int = 4) -> str:
    return '—' if value is None or math.isnan(value) else f'{value:.{digits}f}'


def _mean_std(stat: Mapping[str, float]) -> str:
    if stat['n'] == 0:
        return '—'
    if stat['n'] == 1:
        return _value(stat['mean'])
    return f'{_value(stat["mean"])} ± {_value(stat["std"])}'


def _ci(stat: Mapping[str, float], signed: bool = False) -> str:
    if stat['n'] < 2:
        return '—'
    low, high = stat['mean'] - stat['ci'], stat['mean'] + stat['ci']
    return f'[{low:+.4f}, {high:+.4f}]' if signed else f'[{low:.4f}, {high:.4f}]'


def markdown_table(results: Mapping[str, Any]) -> str:
    """The results as Markdown: headline table, other metrics, per-run rows and notes.

    Args:
      results: the dict that `run_sweep` returns.

    Returns:
      The tables, preceded by a line naming the model, data, seeds and steps.
    """
    seeds = ', '.join(str(s) for s in results['seeds'])
    reference = results['reference']
    percent = round(100 * results['confidence'])
    lines = [
        f'{results["model"]} on {results.get("dataset", "?")}, {_budgets(results)}, '
        f'seeds {seeds}: mean ± sample std over the runs that did not collapse ({percent}% '
        f'CI: Student t)'
        + (f'; Δ: paired difference to `{reference}` over the same seeds.' if reference else '.'),
        '',
    ]
    header = ['variant', 'skip strides', 'merge', 'runs']
    for title in HEADLINE.values():
        header += [title, f'{percent}% CI']
        if reference:
            header += [f'Δ vs {reference} [{percent}% CI]']
    lines += ['| ' + ' | '.join(header) + ' |', '|---' * len(header) + '|']
    notes = []
    for name, variant in results['variants'].items():
        strides = ', '.join(str(s) for s in variant['skip_strides']) or '-'
        total = len(variant['runs'])
        kept = variant['stats']['mean_iou']['n']
        count = f'{kept}' if kept == total else f'{kept} of {total}*'
        cells = [name, strides, variant['merge'], count]
        for key in HEADLINE:
            stat = variant['stats'][key]
            cells += [_mean_std(stat), _ci(stat)]
            if reference:
                paired = variant['paired'][key]
                cells.append(
                    '—'
                    if name == reference or paired['n'] == 0
                    else f'{paired["mean"]:+.4f} {_ci(paired, signed=True)}'
                )
        lines.append('| ' + ' | '.join(cells) + ' |')
        for seed, run in variant['runs'].items():
            if run['collapsed']:
                notes.append(f'{name} seed {seed} collapsed ({run["collapsed"]}): left out.')
    if notes:
        lines += ['', '\\* ' + ' '.join(notes)]
    lines += ['', 'Other metrics (mean ± std over the same runs):', '']
    lines += [
        '| variant | ' + ' | '.join(OTHER.values()) + ' |',
        '|---' * (len(OTHER) + 1) + '|',
    ]
    for name, variant in results['variants'].items():
        cells = [_mean_std(variant['stats'][key]) for key in OTHER]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    seconds = [r['seconds'] for v in results['variants'].values() for r in v['runs'].values()]
    known = [t for t in seconds if t is not None]
    total = f'; their wall times add up to {sum(known) / 60:.1f} min' if known else ''
    lines += ['', f'Runs ({len(seconds)}{total}):', '']
    lines += [
        '| variant | seed | mean IoU | Boundary IoU | final train loss | wall time | flags |',
        '|---' * 7 + '|',
    ]
    for name, variant in results['variants'].items():
        for seed, run in variant['runs'].items():
            flags_ = []
            if run['collapsed']:
                flags_.append(f'collapsed: {run["collapsed"]}')
            # Missed classes that the collapse reason does not already name.
            missed = [
                name
                for name in run['never_predicted']
                if f'never predicts {name},' not in (run['collapsed'] or '')
            ]
            if missed:
                flags_.append('never predicts ' + ', '.join(missed))
            seconds = run['seconds']
            cells = [
                name,
                seed,
                _value(run['mean_iou']),
                _value(run['boundary_iou']),
                _value(run['train_loss'], 3),
                '—' if seconds is None else f'{seconds:.0f} s',
                '; '.join(flags_),
            ]
            lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
    return '\n'.join(lines)


def plot_results(results: Mapping[str, Any], path: str) -> None:
    """Writes per-seed points and mean ± 95% CI of mean IoU and Boundary IoU to `path` (PNG).

    Args:
      results: the dict that `run_sweep` returns.
      path: output file.
    """
    names = list(results['variants'])
    # A bare Figure renders with the Agg canvas and never touches pyplot's global state or
    # a display, so the sweep also runs on headless machines and inside tests.
    figure = Figure(figsize=(1.1 * len(names) * len(HEADLINE) + 3.0, 4.0), layout='constrained')
    for axes, (key, title) in zip(figure.subplots(1, len(HEADLINE)), HEADLINE.items(), strict=True):
        for x, name in enumerate(names):
            variant = results['variants'][name]
            runs = list(variant['runs'].values())
            # Spread the seeds sideways so equal values stay visible.
            offsets = np.linspace(-0.15, 0.15, len(runs)) if len(runs) > 1 else [0.0]
            for offset, run in zip(offsets, runs, strict=True):
                if run[key] is None:
                    continue
                axes.plot(
                    x + offset,
                    run[key],
                    'x' if run['collapsed'] else 'o',
                    color='tab:red' if run['collapsed'] else 'tab:blue',
                    alpha=0.7,
                    markersize=5,
                )
            stat = variant['stats'][key]
            if stat['n']:
                error = stat['ci'] if stat['n'] > 1 else 0.0
                axes.errorbar(x + 0.3, stat['mean'], yerr=error, fmt='s', color='black', capsize=4)
        axes.set_xticks(range(len(names)), names)
        axes.set_ylabel(title)
        axes.set_title(f'{title}: seeds (o; x collapsed), mean ± 95% CI')
        axes.grid(axis='y', alpha=0.3)
    figure.suptitle(
        f'{results["model"]} skip ablation ({len(results["seeds"])} seeds, {_budgets(results)})'
    )
    figure.savefig(path, dpi=100)


def _budgets(results: Mapping[str, Any]) -> str:
    """'400 steps', or '400 steps (none: 800)' when a variant has its own budget."""
    base = results['num_train_steps']
    own = [
        f'{name}: {variant["num_train_steps"]}'
        for name, variant in results['variants'].items()
        if variant.get('num_train_steps', base) != base
    ]
    return f'{base} steps' + (f' ({", ".join(own)})' if own else '')


def main(argv: list[str]) -> None:
    """Runs the sweep that the flags describe and prints the results table."""
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    config = FLAGS.config
    # The runs of a variant differ only in their seed, a runtime value: with a persistent
    # compilation cache every seed after the first loads the compiled steps instead of
    # compiling them again (about 10 s per run on 2 CPU cores).
    jax.config.update('jax_compilation_cache_dir', os.path.join(FLAGS.output, 'jit_cache'))
    if FLAGS.steps is not None:  # One budget for every variant.
        config.num_train_steps = FLAGS.steps
        if 'variant_train_steps' in config:
            config.variant_train_steps = ml_collections.ConfigDict()
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
    app.run(errors.guard(main), flags_parser=errors.parse_flags)
