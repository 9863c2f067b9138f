"""The files of a run directory (workdir), and their readers.

A training run writes, next to its `checkpoints/` (see `checkpointing.py`):

* `config.json`: the resolved config, rewritten by every call that trains;
* `config_history.jsonl`: one JSON object per call that resumed with changed safe fields
  (`record_config`);
* `metrics.jsonl`: one JSON object per logged step and kind (train means, eval scalars);
* `eval_results.json`: the final evaluation report (`eval_results_<split>.json` for an
  evaluation of another split);
* `run_info.json`: the hardware and software the run trained on and its wall time.

`train.py` writes them through the writers here; `predict`, `predict_volume`,
`experiments/` and the tests read them through the readers (`read_config`,
`read_metrics_log`, `read_eval_results`, `read_run_info`), so no other module spells a
file name. Only process 0 writes; every writer is a no-op on the others.

Which config changes a workdir accepts: a command whose config differs from the workdir's
`config.json` in a field that changes the parameter (or optimiser state) tree or the
examples is refused before any checkpoint is touched (`check_config_fits`), because its
checkpoints cannot be resumed, or would be resumed on other data. The fields are listed
once, in `RUN_DEFINING_FIELDS` (with the exceptions `RESUMABLE_FIELDS` and the
value-dependent `_STATE_STRUCTURE_CHANGES`); every other field (steps, cadences, schedule,
loss, augmentation, evaluation, batch sizes, ...) may change on resume and the change is
recorded in `config_history.jsonl`. `move_run_aside` moves a run into
`previous_runs/<n>/` when the user asks to start afresh in its workdir (nothing is deleted).
"""

import json
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax
import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from fcn_unet_jax import errors, huge_pages

CONFIG_FILE = 'config.json'
CONFIG_HISTORY_FILE = 'config_history.jsonl'
METRICS_LOG_FILE = 'metrics.jsonl'
PREVIOUS_RUNS_DIR = 'previous_runs'
EVAL_RESULTS_FILE = 'eval_results.json'
RUN_INFO_FILE = 'run_info.json'
# The run_info fields that must agree for two segments of a run to share one wall time.
HARDWARE_KEYS = ('platform', 'device_kind', 'device_count', 'process_count')

# Config fields (dotted paths; a section stands for every field in it, also fields added
# later) that a resumed run must share with the run in its workdir: they change the
# parameter tree (model), the optimiser state's tree (its checkpointed shape) or the examples
# and their labels (dataset, normalisation).
RUN_DEFINING_FIELDS = (
    'model',
    'dataset',
    'input.normalization',
    'optimizer.name',
    'optimizer.frozen_params',  # Moves leaves between the optimiser's masked groups.
)
# Fields inside those sections that change neither the parameters nor the examples: the
# compute dtype and the ops (parameters stay float32), rematerialisation, dropout, where
# the prepared data lives, and which split the run evaluates on.
RESUMABLE_FIELDS = (
    'model.dtype',
    'model.remat',
    'model.plain_ops',
    'model.dropout_rate',
    'dataset.data_dir',
    'dataset.manual_dir',
    'dataset.eval_split',
)
# Safe fields whose change alters the optimiser state's tree for some values only: gradient
# clipping adds a state when switched on, SGD keeps a momentum trace only when momentum > 0.
_STATE_STRUCTURE_CHANGES = {
    'optimizer.grad_clip_norm': lambda old, new: (old is None) != (new is None),
    'optimizer.momentum': lambda old, new: bool(old) != bool(new),
}


def jsonable(value: Any) -> Any:
    """Converts NaN and infinities to None (valid JSON) and numpy scalars to Python numbers."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str | os.PathLike[str], content: Mapping[str, Any]) -> None:
    """Writes `content` as JSON atomically (process 0 only; a no-op elsewhere).

    The text goes to a temporary file that is then renamed over `path`, so a reader, or a
    crash mid-write, never sees half a file.

    Args:
      path: the file to (over)write.
      content: JSON-serialisable values; numpy scalars are converted and NaN / Inf written
        as null (see `jsonable`). Keys are sorted.
    """
    if jax.process_index() != 0:
        return
    path = epath.Path(path)
    tmp = path.parent / (path.name + '.tmp')
    tmp.write_text(json.dumps(jsonable(content), indent=2, sort_keys=True) + '\n')
    os.replace(tmp, path)


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in `path` (e.g. a run's config.json as a plain dict).

    Raises:
      FileNotFoundError: when `path` does not exist.
    """
    with open(path) as f:
        return json.load(f)


class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl` (process 0 only).

    NaN values are written as null (see `jsonable`); `read_metrics_log` reads the lines back.
    Given the step a run resumes from, the log keeps each step's record of each kind once:
    records of later steps (written after the checkpoint the run resumes from, and about to
    be written again) are dropped on opening, and a record of the resume step replaces an
    earlier one with the same keys (a finished run that is evaluated again).
    """

    def __init__(self, workdir: str | os.PathLike[str], start_step: int | None = None):
        """Opens the log of `workdir`.

        Args:
          workdir: the run's workdir.
          start_step: the step the run resumes from; None appends without any check.
        """
        self._path = epath.Path(workdir) / METRICS_LOG_FILE if jax.process_index() == 0 else None
        self._start_step = start_step
        self._resume_records: list[dict[str, Any]] = []
        if self._path is None or start_step is None or not self._path.exists():
            return
        records = read_metrics_log(workdir)
        kept = [r for r in records if r.get('step', 0) <= start_step]
        if len(kept) != len(records):
            self._rewrite(kept)
        self._resume_records = [r for r in kept if r.get('step') == start_step]

    def _rewrite(self, records: Sequence[Mapping[str, Any]]) -> None:
        # A temporary file renamed over the log: a crash leaves the old log or the new one.
        tmp = self._path.parent / (self._path.name + '.tmp')
        tmp.write_text(''.join(json.dumps(r) + '\n' for r in records))
        os.replace(tmp, self._path)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Appends `{'step': step, **scalars}`."""
        if self._path is None:
            return
        if step == self._start_step and any(set(r) & set(scalars) for r in self._resume_records):
            replaced = [r for r in self._resume_records if set(r) & set(scalars)]
            records = [r for r in read_metrics_log(self._path.parent) if r not in replaced]
            self._rewrite(records)
            self._resume_records = [r for r in self._resume_records if r not in replaced]
        with open(self._path, 'a') as f:
            f.write(json.dumps(jsonable({'step': step, **scalars})) + '\n')


def read_metrics_log(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of `workdir/metrics.jsonl`, in the order written.

    Args:
      workdir: the run's workdir.

    Returns:
      One dict per logged step and kind (`step` plus `train/...` means or `eval/...` scores);
      a resumed run's records continue those of the runs before it.
    """
    with open(epath.Path(workdir) / METRICS_LOG_FILE) as f:
        return [json.loads(line) for line in f]


def _tuples(value: Any) -> Any:
    # JSON turned the config's tuples into lists; ConfigDict fields such as window_size and
    # scales are tuples in configs/default.py.
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def write_config(workdir: str | os.PathLike[str], config: ml_collections.ConfigDict) -> None:
    """Writes the resolved config to `workdir/config.json`."""
    write_json(epath.Path(workdir) / CONFIG_FILE, config.to_dict())


def read_config(workdir: str | os.PathLike[str]) -> ml_collections.ConfigDict:
    """Reads the resolved config a training run wrote to `workdir/config.json`.

    Args:
      workdir: the run's workdir.

    Returns:
      The config (unlocked, so prediction flags can override fields).

    Raises:
      MissingInputError: `workdir` holds no config.json (it is not a training workdir).
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        what = 'does not exist' if not os.path.exists(workdir) else f'holds no {CONFIG_FILE}'
        raise errors.MissingInputError(
            f'{workdir} {what}: it is not the workdir of a training run.',
            hint='pass the --workdir that python -m fcn_unet_jax.main trained in',
        )
    return ml_collections.ConfigDict(_tuples(read_json(path)))


class ConfigChange(NamedTuple):
    """A field whose value in a command's config differs from the workdir's config.json.

    Attributes:
      field: the dotted field path, e.g. 'model.width'.
      old: the value in config.json (JSON: lists for tuples).
      new: the command's value, in the same JSON form.
    """

    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f'{self.field} {self.old!r} -> {self.new!r}'


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def config_changes(
    workdir: str | os.PathLike[str], config: ml_collections.ConfigDict
) -> list[ConfigChange]:
    """The fields in which `config` differs from `workdir/config.json`, sorted.

    Only fields present in both are compared: a field added to the code since the run
    started, or removed since, has no recorded value to differ from.

    Args:
      workdir: a workdir (with or without config.json).
      config: the command's config.

    Returns:
      One `ConfigChange` per differing field; empty when there is no config.json.
    """
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        return []
    old = _flatten(read_json(path))
    # The JSON round trip gives both sides the same types (lists, None for NaN).
    new = _flatten(json.loads(json.dumps(jsonable(config.to_dict()))))
    return [
        ConfigChange(field, old[field], new[field])
        for field in sorted(old.keys() & new.keys())
        if old[field] != new[field]
    ]


def is_run_defining(change: ConfigChange) -> bool:
    """Whether resuming a run across `change` is refused (see `RUN_DEFINING_FIELDS`)."""
    field = change.field
    if field in _STATE_STRUCTURE_CHANGES:
        return _STATE_STRUCTURE_CHANGES[field](change.old, change.new)
    if field in RESUMABLE_FIELDS:
        return False
    return any(field == f or field.startswith(f + '.') for f in RUN_DEFINING_FIELDS)


def run_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config's run-defining fields (`RUN_DEFINING_FIELDS`) as dotted path -> JSON value.

    Checkpoints record them, so a checkpoint can say what it was trained with.
    """
    flat = _flatten(json.loads(json.dumps(jsonable(config.to_dict()))))
    return {
        field: value
        for field, value in sorted(flat.items())
        if field not in _STATE_STRUCTURE_CHANGES
        and is_run_defining(ConfigChange(field, None, None))
    }


def config_mismatch_error(
    workdir: str | os.PathLike[str], changes: Sequence[ConfigChange], hint: str
) -> errors.UserError:
    """The error for a command whose config does not fit the run in `workdir`.

    Args:
      workdir: the run's workdir.
      changes: the run-defining changes (`is_run_defining`).
      hint: what the user can do instead.
    """
    listing = ', '.join(str(c) for c in changes)
    return errors.UserError(
        f'The run in {workdir} was trained with other parameters or data than this command '
        f'asks for ({CONFIG_FILE} -> command): {listing}.',
        hint=hint,
    )


def check_config_fits(
    workdir: str | os.PathLike[str], config: ml_collections.ConfigDict, hint: str
) -> list[ConfigChange]:
    """The changes of `config` against the run in `workdir`; refuses run-defining ones.

    Args:
      workdir: the run's workdir (with or without a config.json).
      config: the config a command asks for.
      hint: what the user can do instead, for the error.

    Returns:
      Every change (all of them safe ones).

    Raises:
      UserError: `config_mismatch_error` of the run-defining changes, if any.
    """
    changes = config_changes(workdir, config)
    defining = [c for c in changes if is_run_defining(c)]
    if defining:
        raise config_mismatch_error(workdir, defining, hint)
    return changes


def record_config(
    workdir: str | os.PathLike[str],
    config: ml_collections.ConfigDict,
    changes: Sequence[ConfigChange],
    step: int,
) -> None:
    """Writes config.json and, when a resumed run changed safe fields, a history line.

    Args:
      workdir: the run's workdir.
      config: the config the run continues with.
      changes: what changed against the previous config.json (none for a new run).
      step: the step the run resumes from.
    """
    write_config(workdir, config)
    if changes and jax.process_index() == 0:
        record = {
            'step': step,
            'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
            'changes': {c.field: [c.old, c.new] for c in changes},
        }
        with open(epath.Path(workdir) / CONFIG_HISTORY_FILE, 'a') as f:
            f.write(json.dumps(jsonable(record)) + '\n')


def read_config_history(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of `record_config`: `step`, `time` and `changes` ({field: [old, new]})."""
    path = epath.Path(workdir) / CONFIG_HISTORY_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def next_previous_run_dir(workdir: str | os.PathLike[str]) -> epath.Path:
    """Where `move_run_aside` puts the run in `workdir`: `previous_runs/<n>`, n = 1, 2, ..."""
    parent = epath.Path(workdir) / PREVIOUS_RUNS_DIR
    taken = [int(p.name) for p in parent.iterdir() if p.name.isdigit()] if parent.exists() else []
    return parent / str(max(taken, default=0) + 1)


def move_run_aside(workdir: str | os.PathLike[str]) -> epath.Path | None:
    """Moves every file of `workdir` (earlier moved runs excepted) into a new previous run.

    Nothing is deleted: the run keeps its layout under `next_previous_run_dir(workdir)`,
    where its checkpoints and files can still be read (e.g. as a `--workdir`). Process 0
    moves; every process must call this.

    Args:
      workdir: the workdir to empty.

    Returns:
      The folder the run went to, or None when there was nothing to move.
    """
    workdir = epath.Path(workdir)
    entries = []
    if workdir.exists():
        entries = sorted(p for p in workdir.iterdir() if p.name != PREVIOUS_RUNS_DIR)
    target = next_previous_run_dir(workdir) if entries else None
    if target is not None and jax.process_index() == 0:
        target.mkdir(parents=True)
        for entry in entries:
            shutil.move(os.fspath(entry), os.fspath(target / entry.name))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices('move_run_aside')
    return target


def eval_results_file(split: str, default_split: str) -> str:
    """`eval_results.json` for the config's eval split, `eval_results_<split>.json` else."""
    if split == default_split:
        return EVAL_RESULTS_FILE
    return f'eval_results_{re.sub(r"[^A-Za-z0-9]+", "_", split).strip("_")}.json'


def write_eval_results(
    workdir: str | os.PathLike[str], report: Mapping[str, Any], default_split: str
) -> epath.Path:
    """Writes an `eval_report` to the file of its split (see `eval_results_file`).

    A report never replaces one of a later step: the evaluation of an older checkpoint (an
    evaluation that fell back because the newest could not be read) goes beside it, to
    `<file>_step<N>.json`.

    Args:
      workdir: the run's workdir.
      report: the report of `eval_report`; its `split` names the file.
      default_split: the run's `config.dataset.eval_split`, whose report is
        `eval_results.json`.

    Returns:
      The file written.
    """
    path = epath.Path(workdir) / eval_results_file(report['split'], default_split)
    try:
        stored_step = read_json(path).get('step') if path.exists() else None
    except (OSError, ValueError, AttributeError):  # Unreadable: nothing worth keeping.
        stored_step = None
    if isinstance(stored_step, int) and stored_step > report['step']:
        path = path.with_name(f'{path.stem}_step{report["step"]}{path.suffix}')
    write_json(path, report)
    return path


def read_eval_results(
    workdir: str | os.PathLike[str], split: str | None = None
) -> dict[str, Any] | None:
    """An evaluation report that a run wrote, or None when it has not written it (yet).

    Args:
      workdir: the run's workdir.
      split: the evaluated split; None reads `eval_results.json`, the final evaluation on
        the run's own eval split. Another split's file name depends on the run's eval split,
        read from its config.json.

    Returns:
      The report (see `eval_report`: `step`, `split`, every metric, `class_names`), or None.
    """
    name = EVAL_RESULTS_FILE
    if split is not None:
        name = eval_results_file(split, read_config(workdir).dataset.eval_split)
    path = epath.Path(workdir) / name
    return read_json(path) if path.exists() else None


def eval_report(
    result: Mapping[str, Any], class_names: Sequence[str], step: int, split: str
) -> dict[str, Any]:
    """The JSON-ready evaluation report: every metric, per-class values named by class."""
    report = {'step': step, 'split': split}
    for key, value in result.items():
        if key.startswith('per_class_'):
            report[key] = dict(zip(class_names, value, strict=True))
        else:
            report[key] = value
    report['class_names'] = list(class_names)
    return jsonable(report)


def run_info(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> dict[str, Any]:
    """The hardware and software a run trains on, for reports next to its metrics.

    Args:
      config: the run's config (`batch_size` is the global batch).
      devices: the mesh's devices; default all devices of all processes.

    Returns:
      `platform` ('cpu', 'gpu', 'tpu'), `device_kind` (e.g. 'TPU v4'), `device_count` (devices
      of the mesh), `local_device_count` (those of this process), `process_count`,
      `global_batch_size`, `jax_version`, `flax_version` and `huge_pages` (whether the
      process allocates on huge pages, `huge_pages.in_use`; it changes the wall time).
    """
    devices = list(devices) if devices is not None else jax.devices()
    return {
        'platform': devices[0].platform,
        'device_kind': devices[0].device_kind,
        'device_count': len(devices),
        'local_device_count': sum(d.process_index == jax.process_index() for d in devices),
        'process_count': jax.process_count(),
        'global_batch_size': config.batch_size,
        'jax_version': jax.__version__,
        'flax_version': flax.__version__,
        'huge_pages': huge_pages.in_use(),
    }


def write_run_info(workdir: str | os.PathLike[str], info: Mapping[str, Any]) -> None:
    """Writes `workdir/run_info.json` (see `run_info` and `continue_run_info`)."""
    write_json(epath.Path(workdir) / RUN_INFO_FILE, info)


def read_run_info(workdir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run's `run_info.json`, or None for a run that never wrote one.

    Args:
      workdir: the run's workdir.

    Returns:
      `run_info(...)` plus `start_step`, `end_step` and `wall_seconds` (see
      `continue_run_info`), or None.
    """
    path = epath.Path(workdir) / RUN_INFO_FILE
    return read_json(path) if path.exists() else None


def continue_run_info(
    workdir: str | os.PathLike[str], info: dict[str, Any], start_step: int
) -> dict[str, Any]:
    """`info` with `start_step` and `wall_seconds` carried on from the workdir's last record.

    The previous call's record is continued when it ended where this one starts (finished,
    or stopped by SIGTERM) on the same hardware; otherwise the time of the steps in between
    is unknown and the record starts again at `start_step` with no wall time.

    Args:
      workdir: the run's workdir (its run_info.json, if any, is the previous record).
      info: this call's `run_info(...)`.
      start_step: the step this call resumes from (0 for a new run).

    Returns:
      A copy of `info` with `start_step` and `wall_seconds` (0.0, or the previous record's).
    """
    info = dict(info, start_step=start_step, wall_seconds=0.0)
    previous = read_run_info(workdir) if start_step else None
    if (
        previous is not None
        and previous.get('end_step') == start_step
        and all(previous.get(key) == info[key] for key in HARDWARE_KEYS)
    ):
        info.update(start_step=previous['start_step'], wall_seconds=previous['wall_seconds'])
    return info
