r"""Replication table: the final metrics of finished runs next to the papers' numbers.

Reads each run directory that `train.train_and_evaluate` wrote (`config.json`,
`eval_results.json`, `run_info.json`), works out which paper recipe the run replicates from
its config (model name, dataset name and eval split, as set by the recipe's config file in
`configs/`) and writes

* `OUTPUT/replication.md`: a Markdown table, one row per run: recipe, model, dataset /
  split, the reported number, the reproduced mean IoU (%), the delta in points
  (reproduced - reported), pixel accuracy (%), steps, global batch, hardware (e.g.
  `4 x TPU v4`), wall time; then the caveats of the compared numbers, their sources and the
  run directories that were left out;
* `OUTPUT/replication.json`: the same rows with every field, the skipped runs and the
  table of record (`REPORTED`).

    python -m experiments.replicate \
        --runs=workdirs/fcn32s_voc,workdirs/fcn16s_voc,workdirs/fcn8s_voc \
        --output=workdirs/replication
    python -m experiments.replicate --runs='workdirs/*' --output=workdirs/replication

`--runs` takes run directories and glob patterns (quote them so the shell leaves them
alone). A run that matches no recipe is still listed, with `—` as its reported number. A
directory without `config.json` or `eval_results.json` (not a run, or a run that has not
finished its final evaluation) is skipped with a warning that the table lists under
`Skipped`, so a glob over `workdirs/` still gives the table of the finished runs;
`--strict` turns that into an error naming the path. A path that does not exist, or a
pattern that matches nothing, is always an error. Without `run_info.json` (runs from before
it was written) the hardware reads `unknown` and the global batch comes from config.json.
Wall time is the `wall_seconds` of run_info.json, shown only for a run trained in one
go (a resumed run's file covers its last segment only).
"""

import dataclasses
import functools
import glob
import importlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags, logging

from fcn_unet_jax import workdir as workdir_files

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags; called only when run as a program, so that importing
    this module next to another experiment (e.g. in the tests) defines no clashing flags."""
    flags.DEFINE_list('runs', None, 'Run directories or glob patterns (comma-separated).')
    flags.DEFINE_string('output', None, 'Directory for replication.md and replication.json.')
    flags.DEFINE_bool(
        'strict', False, 'Fail on a directory without config.json or eval_results.json.'
    )


# The config fields that identify a recipe; their values are read from the recipe's config.
MATCH_FIELDS = ('model.name', 'dataset.name', 'dataset.eval_split')


@dataclasses.dataclass(frozen=True)
class Reported:
    """A paper's number for the recipe of one config file.

    Attributes:
      title: the recipe's name in the table.
      split_label: the eval split's name in the paper (e.g. 'seg11valid').
      metric: the paper's name for its number (e.g. 'mean IU').
      mean_iou: the reported mean IoU in percent; None when no number can be compared.
      pixel_accuracy: the reported pixel accuracy in percent, when the source gives one.
      source: where the number comes from.
      flag: a short warning for the table's notes column ('' when the numbers compare).
      caveat: the full explanation of `flag`, printed under the table.
      extra_match_fields: config fields that must also match, beyond `MATCH_FIELDS`.
    """

    title: str
    split_label: str
    metric: str
    mean_iou: float | None
    source: str
    pixel_accuracy: float | None = None
    flag: str = ''
    caveat: str = ''
    extra_match_fields: tuple[str, ...] = ()


_FCN_PAPER = (
    'Long, Shelhamer, Darrell, Fully Convolutional Networks for Semantic Segmentation '
    '(CVPR 2015 / PAMI 2016) and shelhamer/fcn.berkeleyvision.org'
)
_TORCHVISION_CAVEAT = (
    'torchvision reports {value} mean IoU for its `{weights}` weights, trained and scored on '
    'the subset of COCO train2017 / val2017 with the 20 VOC categories (others mapped to '
    'background), not on VOC 2012 val; this recipe has no published VOC number, so the '
    'delta is a sanity reference only (see configs/{config}.py).'
)

# The table of record: config file in configs/ -> the number its source reports. Each
# config's docstring gives the same number and its source; keep both in step.
REPORTED: dict[str, Reported] = {
    'fcn32s_voc': Reported(
        title='FCN-32s',
        split_label='seg11valid',
        metric='mean IU',
        mean_iou=63.6,
        source=f'{_FCN_PAPER} (`voc-fcn32s/`); configs/fcn32s_voc.py',
    ),
    'fcn16s_voc': Reported(
        title='FCN-16s',
        split_label='seg11valid',
        metric='mean IU',
        mean_iou=65.0,
        source=f'{_FCN_PAPER} (`voc-fcn16s/`); configs/fcn16s_voc.py',
    ),
    'fcn8s_voc': Reported(
        title='FCN-8s',
        split_label='seg11valid',
        metric='mean IU',
        mean_iou=65.5,
        source=f'{_FCN_PAPER} (`voc-fcn8s/`); configs/fcn8s_voc.py',
    ),
    'fcn8s_atonce_voc': Reported(
        title='FCN-8s at-once',
        split_label='seg11valid',
        metric='mean IU',
        mean_iou=None,
        source=f'{_FCN_PAPER} (`voc-fcn8s-atonce/`); configs/fcn8s_atonce_voc.py',
        flag='no separate number: compare with staged FCN-8s',
        caveat=(
            'The PAMI paper reports all-at-once training of FCN-8s as on par with the staged '
            'FCN-8s (65.5 mean IU on seg11valid); no separate at-once number is given here.'
        ),
    ),
    'fcn_resnet50_voc': Reported(
        title='torchvision FCN-ResNet50',
        split_label='VOC 2012 val',
        metric='mean IoU',
        mean_iou=60.5,
        pixel_accuracy=91.4,
        source='torchvision `FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1`; '
        'configs/fcn_resnet50_voc.py',
        flag='not comparable: COCO subset',
        caveat=_TORCHVISION_CAVEAT.format(
            value=60.5,
            weights='FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1',
            config='fcn_resnet50_voc',
        ),
    ),
    'fcn_resnet101_voc': Reported(
        title='torchvision FCN-ResNet101',
        split_label='VOC 2012 val',
        metric='mean IoU',
        mean_iou=63.7,
        pixel_accuracy=91.9,
        source='torchvision `FCN_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1`; '
        'configs/fcn_resnet101_voc.py',
        flag='not comparable: COCO subset',
        caveat=_TORCHVISION_CAVEAT.format(
            value=63.7,
            weights='FCN_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1',
            config='fcn_resnet101_voc',
        ),
    ),
    'fcn8s_cityscapes': Reported(
        title='FCN-8s Cityscapes',
        split_label='Cityscapes val',
        metric='class IoU',
        mean_iou=65.3,
        source='Cordts et al., The Cityscapes Dataset for Semantic Urban Scene '
        'Understanding (CVPR 2016), Table 4; configs/fcn8s_cityscapes.py',
        flag='paper: test set',
        caveat=(
            'Cordts et al. report 65.3 class IoU on the Cityscapes test set, trained on the '
            'fine train + val annotations; the recipe trains on train and scores validation.'
        ),
    ),
    'unet_paper': Reported(
        title='U-Net (paper)',
        split_label='user folder data',
        metric='IoU',
        mean_iou=None,
        source='Ronneberger, Fischer, Brox, U-Net (MICCAI 2015); configs/unet_paper.py',
        flag='no comparable number',
        caveat=(
            'The U-Net paper reports IoU 92.03 (PhC-U373) and 77.56 (DIC-HeLa) and warping '
            'error on ISBI 2012; which applies depends on the `folder` data, which the '
            'config does not name, so no delta is computed.'
        ),
        extra_match_fields=('model.padding',),
    ),
}

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


@functools.cache
def _recipe_signatures() -> dict[str, tuple]:
    """Recipe name -> the values of its match fields in configs/<name>.py."""
    signatures = {}
    for name, reported in REPORTED.items():
        config = importlib.import_module(f'configs.{name}').get_config().to_dict()
        fields = MATCH_FIELDS + reported.extra_match_fields
        signatures[name] = tuple((f, _get(config, f)) for f in fields)
    return signatures


def match_recipe(config: Mapping[str, Any]) -> str | None:
    """The `REPORTED` recipe a run's config replicates, or None.

    Args:
      config: the run's config as a dict (its config.json).

    Returns:
      The name of the recipe's config file whose model name, dataset name and eval split
      (and the recipe's extra fields) equal the run's, or None. Steps, batch size and the
      other fields may differ; the table notes such departures from the recipe.
    """
    for name, signature in _recipe_signatures().items():
        if all(_get(config, field) == value for field, value in signature):
            return name
    return None


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


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


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
        'config': _read_json(os.path.join(run_dir, workdir_files.CONFIG_FILE)),
        'eval': _read_json(os.path.join(run_dir, workdir_files.EVAL_RESULTS_FILE)),
        'run_info': _read_json(info_path) if os.path.exists(info_path) else None,
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
    run = load_run(run_dir)
    config, report, info = run['config'], run['eval'], run['run_info']
    recipe = match_recipe(config)
    reported = REPORTED.get(recipe)
    mean_iou = _percent(report.get('mean_iou'))
    num_steps = config['num_train_steps']
    batch = info['global_batch_size'] if info else config['batch_size']
    notes = []
    if reported and reported.flag:
        notes.append(reported.flag)
    if report['step'] != num_steps:
        notes.append(f'evaluated at step {report["step"]:,} of {num_steps:,}')
    if recipe:
        # The recipe's own schedule: a run with other steps or batch is not the replication.
        base = importlib.import_module(f'configs.{recipe}').get_config()
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
    if reported and reported.mean_iou is not None and mean_iou is not None:
        delta = mean_iou - reported.mean_iou
    return {
        'run': run_dir,
        'recipe': recipe,
        'title': reported.title if reported else None,
        'model': _get(config, 'model.name'),
        'dataset': _get(config, 'dataset.name'),
        'split': report.get('split'),
        'split_label': reported.split_label if reported else None,
        'reported_metric': reported.metric if reported else None,
        'reported_mean_iou': reported.mean_iou if reported else None,
        'reported_pixel_accuracy': reported.pixel_accuracy if reported else None,
        'mean_iou': mean_iou,
        'delta': delta,
        'pixel_accuracy': _percent(report.get('pixel_accuracy')),
        'step': report['step'],
        'num_train_steps': num_steps,
        'global_batch_size': batch,
        'hardware': hardware(info),
        'run_info': info,
        'wall_seconds': wall_seconds,
        'notes': notes,
    }


def collect(run_dirs: Sequence[str], strict: bool = False) -> dict[str, Any]:
    """The rows of `run_dirs` and the directories left out.

    Args:
      run_dirs: run directories (see `expand_runs`).
      strict: raise on a directory without config.json or eval_results.json instead of
        skipping it.

    Returns:
      The content of replication.json: `rows` (see `replication_row`), `skipped` (`run`,
      `reason`) and `reported` (the table of record, recipe -> fields).

    Raises:
      IncompleteRunError: with `strict`, a directory lacks a required file; and always
        when no directory can be tabulated.
    """
    rows, skipped = [], []
    for run_dir in run_dirs:
        try:
            rows.append(replication_row(run_dir))
        except IncompleteRunError as error:
            if strict:
                raise
            logging.warning('Skipping %s: %s', run_dir, error)
            skipped.append({'run': run_dir, 'reason': str(error)})
    if not rows:
        reasons = '; '.join(s['reason'] for s in skipped)
        raise IncompleteRunError(f'No finished run to tabulate: {reasons}')
    return {
        'rows': rows,
        'skipped': skipped,
        # Lists, not tuples: the dict equals its JSON round trip.
        'reported': {
            name: dataclasses.asdict(r) | {'extra_match_fields': list(r.extra_match_fields)}
            for name, r in REPORTED.items()
        },
    }


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
        'Mean IoU and pixel accuracy in %; delta = reproduced - reported, in points.',
        '',
        '| recipe | model | dataset / split | reported | mean IoU (%) | delta | pixel acc (%) '
        '| steps | global batch | hardware | wall time | notes |',
        '|---' * 12 + '|',
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
            steps,
            str(row['global_batch_size']),
            row['hardware'],
            _duration(row['wall_seconds']),
            '; '.join(row['notes']),
        ]
        lines.append('| ' + ' | '.join(cells) + ' |')
        if row['recipe'] and row['recipe'] not in used:
            used.append(row['recipe'])
    caveats = [REPORTED[name] for name in used if REPORTED[name].caveat]
    if caveats:
        lines += ['', 'Caveats:', '']
        lines += [f'- {r.title}: {r.caveat}' for r in caveats]
    if used:
        lines += ['', 'Sources:', '']
        lines += [f'- {REPORTED[name].title}: {REPORTED[name].source}' for name in used]
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
    try:
        results = collect(expand_runs(FLAGS.runs), strict=FLAGS.strict)
    except FileNotFoundError as error:  # A message naming the path, not a traceback.
        sys.exit(f'Error: {error}')
    write_outputs(results, FLAGS.output)
    print(markdown_table(results))
    print()
    print(f'Wrote {FLAGS.output}/replication.md and replication.json')


if __name__ == '__main__':
    define_flags()
    flags.mark_flags_as_required(['runs', 'output'])
    app.run(main)
