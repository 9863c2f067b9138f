r"""Replication table: the final metrics of finished runs next to the papers' numbers.

Reads each run directory that `train.train_and_evaluate` wrote (`config.json`,
`eval_results.json`, `run_info.json`) and takes the paper's number from the run's own
config: the `reported` section that a replication config in `configs/` fills (see
`configs/default.py:set_reported`), so the number is written once, in that config. Then it
writes

* `OUTPUT/replication.md`: a Markdown table, one row per run: recipe, model, dataset /
  split, the reported number, the reproduced mean IoU (%), the delta in points
  (reproduced - reported), pixel accuracy (%), the boundary metrics (Boundary IoU and the
  trimap mean IoU within `TRIMAP_WIDTH` px of the ground-truth boundaries, in %; `—` for
  runs evaluated before they were reported), steps, global batch, hardware (e.g.
  `4 x TPU v4`), wall time; then the caveats of the compared numbers, their sources and the
  run directories that were left out;
* `OUTPUT/replication.json`: the same rows with every field, the skipped runs and the
  reported sections of the recipes in the table.

    python -m experiments.replicate \
        --runs=workdirs/fcn_voc_32s,workdirs/fcn_voc_16s,workdirs/fcn_voc_8s \
        --output=workdirs/replication
    python -m experiments.replicate --runs='workdirs/*' --output=workdirs/replication

`--runs` takes run directories and glob patterns (quote them so the shell leaves them
alone). A run is compared with its recipe's number only while it keeps the recipe's values
of the fields the number applies to (`reported.applies_to`: model, dataset and eval split,
plus e.g. the padding for the VALID U-Net): a run launched with a recipe's config but
another model, say, is listed with `—` as its reported number and a note naming the
field, as is a run of a config that replicates no paper. Steps and batch may differ from
the recipe's; the notes say so. A directory without `config.json` or `eval_results.json`
(not a run, or a run that has not finished its final evaluation) is skipped with a warning
that the table lists under `Skipped`, so a glob over `workdirs/` still gives the table of
the finished runs; `--strict` turns that into an error naming the path. A path that does
not exist, or a pattern that matches nothing, is always an error. Without `run_info.json`
(runs from before it was written) the hardware reads `unknown` and the global batch comes
from config.json. Wall time is the `wall_seconds` of run_info.json, shown only for a run
trained in one go (a resumed run's file covers its last segment only).
"""

import glob
import importlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging

from fcn_unet_jax import errors
from fcn_unet_jax import workdir as workdir_files

FLAGS = flags.FLAGS
# The trimap band of the table's trimap column (eval reports hold every width of
# `fcn_unet_jax.metrics.TRIMAP_WIDTHS`): 4 px, about the width of VOC's void outlines.
TRIMAP_WIDTH = 4


def define_flags() -> None:
    """Defines the command-line flags; called only when run as a program, so that importing
    this module next to another experiment (e.g. in the tests) defines no clashing flags."""
    flags.DEFINE_list('runs', None, 'Run directories or glob patterns (comma-separated).')
    flags.DEFINE_string('output', None, 'Directory for replication.md and replication.json.')
    flags.DEFINE_bool(
        'strict', False, 'Fail on a directory without config.json or eval_results.json.'
    )


# Files a run directory must hold to be tabulated, and what their absence means.
_REQUIRED = {
    workdir_files.CONFIG_FILE: 'not a run directory, or a run that never started',
    workdir_files.EVAL_RESULTS_FILE: (
        'the run has not finished its final evaluation: rerun its training command, '
        'which resumes, or evaluate its last checkpoint with `--mode=eval`'
    ),
}


class IncompleteRunError(FileNotFoundError):
    """A run directory without config.json or eval_results.json."""


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for key in dotted.split('.'):
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def recipe_config(recipe: str) -> ml_collections.ConfigDict:
    """The config that `recipe` (a `--config` value, e.g. 'configs/fcn_voc.py:32s') builds."""
    path, _, arg = recipe.partition(':')
    module = importlib.import_module(os.path.splitext(path)[0].replace('/', '.'))
    return module.get_config(arg or None)


def changed_fields(config: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """The fields the reported number applies to that the run set otherwise than its recipe.

    Args:
      config: the run's config as a dict (its config.json).

    Returns:
      (field, run's value, recipe's value) for each field of `reported.applies_to` whose
      value in the run differs from the one the recipe recorded.
    """
    applies_to = _get(config, 'reported.applies_to') or []
    return [
        (field, _get(config, field), value)
        for field, value in applies_to
        if _get(config, field) != value
    ]


def match_recipe(config: Mapping[str, Any]) -> str | None:
    """The recipe whose reported number a run's config is compared with, or None.

    Args:
      config: the run's config as a dict (its config.json).

    Returns:
      `reported.recipe` of the config (e.g. 'configs/fcn_voc.py:32s') when it names one and
      the run kept the recipe's values of the fields its number applies to; else None.
      Steps, batch size and the other fields may differ; the table notes such departures.
    """
    recipe = _get(config, 'reported.recipe')
    if not recipe or changed_fields(config):
        return None
    return recipe


def expand_runs(patterns: Sequence[str]) -> list[str]:
    """Run directories from paths and glob patterns, in the given order (globs sorted).

    Args:
      patterns: directories or glob patterns.

    Returns:
      The directories, each once.

    Raises:
      FileNotFoundError: a path that does not exist or a pattern that matches no directory.
    """
    runs: list[str] = []
    for pattern in patterns:
        if any(char in pattern for char in '*?['):
            found = sorted(p for p in glob.glob(pattern) if os.path.isdir(p))
            if not found:
                raise FileNotFoundError(f'--runs pattern {pattern!r} matches no directory.')
        elif os.path.isdir(pattern):
            found = [pattern]
        else:
            raise FileNotFoundError(f'Run directory {pattern!r} does not exist.')
        runs += [p for p in found if p not in runs]
    return runs


def load_run(run_dir: str) -> dict[str, Any]:
    """The files of one run: `config`, `eval` and `run_info` (None when absent).

    Raises:
      IncompleteRunError: config.json or eval_results.json is missing; names the path.
    """
    for name, meaning in _REQUIRED.items():
        path = os.path.join(run_dir, name)
        if not os.path.exists(path):
            raise IncompleteRunError(f'{path} does not exist ({meaning}).')
    info_path = os.path.join(run_dir, workdir_files.RUN_INFO_FILE)
    return {
        'config': workdir_files.read_json(os.path.join(run_dir, workdir_files.CONFIG_FILE)),
        'eval': workdir_files.read_json(os.path.join(run_dir, workdir_files.EVAL_RESULTS_FILE)),
        'run_info': workdir_files.read_json(info_path) if os.path.exists(info_path) else None,
    }


def hardware(info: Mapping[str, Any] | None) -> str:
    """'4 x TPU v4', '8 x TPU v4 (2 hosts)', '1 x cpu', or 'unknown' without run_info."""
    if not info:
        return 'unknown'
    text = f'{info["device_count"]} x {info["device_kind"]}'
    if info.get('process_count', 1) > 1:
        text += f' ({info["process_count"]} hosts)'
    return text


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def replication_row(run_dir: str) -> dict[str, Any]:
    """One table row for the run in `run_dir` (metrics in percent, delta in points).

    Raises:
      IncompleteRunError: config.json or eval_results.json is missing.
    """
    return _row_and_reported(run_dir)[0]


def _row_and_reported(run_dir: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The row of `replication_row` and the run's `reported` section (None if not compared)."""
    run = load_run(run_dir)
    config, report, info = run['config'], run['eval'], run['run_info']
    recipe = match_recipe(config)
    reported = _get(config, 'reported') if recipe else None
    mean_iou = _percent(report.get('mean_iou'))
    num_steps = config['num_train_steps']
    batch = info['global_batch_size'] if info else config['batch_size']
    notes = []
    if reported and reported['flag']:
        notes.append(reported['flag'])
    changed = changed_fields(config)
    if changed:
        # Launched with a recipe's config but another model, data or split: not the number's.
        notes.append(
            f'not compared with {config["reported"]["recipe"]}: '
            + ', '.join(f'{field} {value} (recipe: {base})' for field, value, base in changed)
        )
    if report['step'] != num_steps:
        notes.append(f'evaluated at step {report["step"]:,} of {num_steps:,}')
    if recipe:
        # The recipe's own schedule: a run with other steps or batch is not the replication.
        base = recipe_config(recipe)
        if (base.num_train_steps, base.batch_size) != (num_steps, batch):
            notes.append(f'recipe: {base.num_train_steps:,} steps at batch {base.batch_size}')
    wall_seconds = None
    if info is None:
        notes.append('no run_info.json')
    elif info.get('start_step') == 0 and info.get('end_step') == report['step']:
        wall_seconds = info.get('wall_seconds')
    elif info.get('start_step'):
        notes.append(f'resumed at step {info["start_step"]:,}')
    delta = None
    if reported and reported['mean_iou'] is not None and mean_iou is not None:
        delta = mean_iou - reported['mean_iou']
    row = {
        'run': run_dir,
        'recipe': recipe,
        'title': reported['title'] if reported else None,
        'model': _get(config, 'model.name'),
        'dataset': _get(config, 'dataset.name'),
        'split': report.get('split'),
        'split_label': reported['split_label'] if reported else None,
        'reported_metric': reported['metric'] if reported else None,
        'reported_mean_iou': reported['mean_iou'] if reported else None,
        'reported_pixel_accuracy': reported['pixel_accuracy'] if reported else None,
        'mean_iou': mean_iou,
        'delta': delta,
        'pixel_accuracy': _percent(report.get('pixel_accuracy')),
        'boundary_iou': _percent(report.get('boundary_iou')),
        'trimap_mean_iou': _percent(report.get(f'trimap_mean_iou_{TRIMAP_WIDTH}px')),
        'step': report['step'],
        'num_train_steps': num_steps,
        'global_batch_size': batch,
        'hardware': hardware(info),
        'run_info': info,
        'wall_seconds': wall_seconds,
        'notes': notes,
    }
    return row, reported


def collect(run_dirs: Sequence[str], strict: bool = False) -> dict[str, Any]:
    """The rows of `run_dirs` and the directories left out.

    Args:
      run_dirs: run directories (see `expand_runs`).
      strict: raise on a directory without config.json or eval_results.json instead of
        skipping it.

    Returns:
      The content of replication.json: `rows` (see `replication_row`), `skipped` (`run`,
      `reason`) and `reported` (recipe -> the `reported` section of the config.json of the
      first run compared with it: the numbers, their source and caveat).

    Raises:
      IncompleteRunError: with `strict`, a directory lacks a required file; and always
        when no directory can be tabulated.
    """
    rows, skipped, reported = [], [], {}
    for run_dir in run_dirs:
        try:
            row, section = _row_and_reported(run_dir)
        except IncompleteRunError as error:
            if strict:
                raise
            logging.warning('Skipping %s: %s', run_dir, error)
            skipped.append({'run': run_dir, 'reason': str(error)})
            continue
        rows.append(row)
        if section:
            reported.setdefault(row['recipe'], section)
    if not rows:
        reasons = '; '.join(s['reason'] for s in skipped)
        raise IncompleteRunError(f'No finished run to tabulate: {reasons}')
    return {'rows': rows, 'skipped': skipped, 'reported': reported}


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return '—'
    return f'{value:+.1f}' if signed else f'{value:.1f}'


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return '—'
    if seconds < 120:
        return f'{seconds:.0f} s'
    if seconds < 7200:
        return f'{seconds / 60:.0f} min'
    return f'{seconds / 3600:.1f} h'


def markdown_table(results: Mapping[str, Any]) -> str:
    """The rows as a Markdown table, then caveats, sources and the skipped directories.

    Args:
      results: the dict that `collect` returns.

    Returns:
      The Markdown text.
    """
    lines = [
        'Metrics in %; delta = reproduced - reported mean IoU, in points; Boundary IoU (Cheng '
        f'et al. 2021, d = 2% of the image diagonal) and the trimap mean IoU within {TRIMAP_WIDTH} '
        "px of the ground-truth boundaries measure the boundaries the papers' skips refine.",
        '',
        '| recipe | model | dataset / split | reported | mean IoU (%) | delta | pixel acc (%) '
        f'| Boundary IoU (%) | trimap IoU {TRIMAP_WIDTH} px (%) '
        '| steps | global batch | hardware | wall time | notes |',
        '|---' * 14 + '|',
    ]
    used = []
    for row in results['rows']:
        split = row['split']
        if row['split_label']:
            split += f' ({row["split_label"]})'
        reported = '—'
        if row['reported_mean_iou'] is not None:
            reported = f'{row["reported_mean_iou"]:.1f} {row["reported_metric"]}'
        steps = f'{row["step"]:,}'
        cells = [
            row['title'] or '—',
            row['model'],
            f'{row["dataset"]} / {split}',
            reported,
            _number(row['mean_iou']),
            _number(row['delta'], signed=True),
            _number(row['pixel_accuracy']),
            _number(row['boundary_iou']),
            _number(row['trimap_mean_iou']),
            steps,
            str(row['global_batch_size']),
            row['hardware'],
            _duration(row['wall_seconds']),
            '; '.join(row['notes']),
        ]
        lines.append('| ' + ' | '.join(cells) + ' |')
        if row['recipe'] and row['recipe'] not in used:
            used.append(row['recipe'])
    reported = [results['reported'][recipe] for recipe in used]
    caveats = [r for r in reported if r['caveat']]
    if caveats:
        lines += ['', 'Caveats:', '']
        lines += [f'- {r["title"]}: {r["caveat"]}' for r in caveats]
    if reported:
        lines += ['', 'Sources:', '']
        lines += [f'- {r["title"]}: {r["source"]}; {r["recipe"]}' for r in reported]
    if results['skipped']:
        lines += ['', 'Skipped (not in the table):', '']
        lines += [f'- {s["run"]}: {s["reason"]}' for s in results['skipped']]
    return '\n'.join(lines)


def write_outputs(results: Mapping[str, Any], output: str) -> None:
    """Writes `output/replication.md` and `output/replication.json`."""
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, 'replication.md'), 'w') as f:
        f.write(markdown_table(results) + '\n')
    with open(os.path.join(output, 'replication.json'), 'w') as f:
        json.dump(results, f, indent=2)


def main(argv: list[str]) -> None:
    """Collects the runs that the flags name, writes the table and prints it."""
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    results = collect(expand_runs(FLAGS.runs), strict=FLAGS.strict)
    write_outputs(results, FLAGS.output)
    print(markdown_table(results))
    print()
    print(f'Wrote {FLAGS.output}/replication.md and replication.json')


if __name__ == '__main__':
    define_flags()
    flags.mark_flags_as_required(['runs', 'output'])
    # A missing or unfinished run directory (FileNotFoundError, IncompleteRunError among them)
    # is the user's input: one `error:` line naming the path, not a traceback.
    app.run(errors.guard(main, user_errors=(FileNotFoundError,)), flags_parser=errors.parse_flags)
