"""The files of a run directory (workdir), and their readers.

A training run writes, next to its `checkpoints/` (see `checkpointing.py`):

* `config.json`: the resolved config, rewritten by every call that trains;
* `metrics.jsonl`: one JSON object per logged step (train means, eval scalars);
* `eval_results.json`: the final evaluation report (`eval_results_<split>.json` for an
  evaluation of another split);
* `run_info.json`: the hardware and software the run trained on and its wall time.

`train.py` writes them through the writers here; `predict`, `predict_volume`,
`experiments/` and the tests read them through the readers (`read_config`,
`read_metrics_log`, `read_eval_results`, `read_run_info`), so no other module spells a
file name. Only process 0 writes; every writer is a no-op on the others.
"""

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
from etils import epath

CONFIG_FILE = 'config.json'
METRICS_LOG_FILE = 'metrics.jsonl'
EVAL_RESULTS_FILE = 'eval_results.json'
RUN_INFO_FILE = 'run_info.json'
# The run_info fields that must agree for two segments of a run to share one wall time.
HARDWARE_KEYS = ('platform', 'device_kind', 'device_count', 'process_count')


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
    """

    def __init__(self, workdir: str | os.PathLike[str]):
        self._path = epath.Path(workdir) / METRICS_LOG_FILE if jax.process_index() == 0 else None

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Appends `{'step': step, **scalars}`."""
        if self._path is None:
            return
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
    """
    return ml_collections.ConfigDict(_tuples(read_json(os.path.join(workdir, CONFIG_FILE))))


def eval_results_file(split: str, default_split: str) -> str:
    """`eval_results.json` for the config's eval split, `eval_results_<split>.json` else."""
    if split == default_split:
        return EVAL_RESULTS_FILE
    return f'eval_results_{re.sub(r"[^A-Za-z0-9]+", "_", split).strip("_")}.json'


def write_eval_results(
    workdir: str | os.PathLike[str], report: Mapping[str, Any], default_split: str
) -> None:
    """Writes an `eval_report` to the file of its split (see `eval_results_file`).

    Args:
      workdir: the run's workdir.
      report: the report of `eval_report`; its `split` names the file.
      default_split: the run's `config.dataset.eval_split`, whose report is
        `eval_results.json`.
    """
    write_json(epath.Path(workdir) / eval_results_file(report['split'], default_split), report)


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
      `global_batch_size`, `jax_version` and `flax_version`.
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
