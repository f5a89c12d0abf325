"""Single-task baselines: the JSON file that :class:`~lightning_mtl.callbacks.DeltaM` compares a multi-task run against.

A baseline file (format 1) holds, per evaluation split, the per-task metrics of the single-task
models, the direction of each metric, and optional free-form provenance::

    {
      "format": 1,
      "metrics": {
        "val":  {"left": {"loss": 0.31, "accuracy": 0.912}, "depth": {"loss": 0.05, "mae": 0.171}},
        "test": {"left": {"loss": 0.33, "accuracy": 0.905}, "depth": {"loss": 0.06, "mae": 0.180}}
      },
      "directions": {"left/accuracy": "max", "depth/mae": "min"},
      "config": {"seed": 0, "...": "..."}
    }

- ``metrics``: ``{split: {task: {metric: value}}}`` with split ``"val"`` and/or ``"test"``, the values
  each single-task run logged as ``{split}/{task}/{metric}`` (its loss included, as ``loss``). ``DeltaM``
  compares ``val/...`` against the ``val`` values and ``test/...`` against the ``test`` values.
- ``directions``: ``{"task/metric": "max" | "min"}``, whether higher or lower is better; optional per
  metric. ``DeltaM`` uses it for a metric whose class declares no direction.
- ``config``: anything JSON can hold (the resolved config, seeds, versions); never read.

:func:`write_baselines` writes such a file, :func:`read_baselines` reads and checks one,
:func:`logged_task_metrics` collects one split's values from a run's ``trainer.callback_metrics``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from lightning_mtl.task import validate_task_name

FORMAT = 1
SPLITS = ("val", "test")
Direction = Literal["max", "min"]
#: ``{split: {task: {metric: value}}}``
SplitMetrics = Mapping[str, Mapping[str, Mapping[str, float]]]


@dataclass(frozen=True)
class Baselines:
    """The contents of a baseline file: ``metrics[split][task][metric]``, ``directions["task/metric"]``, ``config``."""

    metrics: dict[str, dict[str, dict[str, float]]]
    directions: dict[str, Direction] = field(default_factory=dict)
    config: Any = None
    source: str = "baselines"  # where they came from, for error messages


def metric_direction(name: str, metric: Any) -> Optional[Direction]:
    """``"max"`` or ``"min"`` for a task's metric: a loss is lower-is-better; a torchmetrics ``Metric``
    says so in its ``higher_is_better`` class attribute; ``None`` when it does not (``PearsonCorrCoef``,
    ``MeanMetric``, a custom metric)."""
    if name == "loss":
        return "min"
    higher = getattr(metric, "higher_is_better", None)
    return None if higher is None else ("max" if higher else "min")


def task_directions(tasks: Mapping[str, Any]) -> dict[str, Direction]:
    """``{"task/metric": direction}`` of every task's loss and of each metric that declares a direction,
    for the ``directions`` of :func:`write_baselines` (``tasks``: a ``MultiTaskModule.tasks`` registry)."""
    out: dict[str, Direction] = {}
    for task_name, task in tasks.items():
        out[f"{task_name}/loss"] = "min"
        for metric_name, metric in task.metrics.items():
            direction = metric_direction(metric_name, metric)
            if direction is not None:
                out[f"{task_name}/{metric_name}"] = direction
    return out


def logged_task_metrics(logged: Mapping[str, Any], task_names: Iterable[str], split: str) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from the ``{split}/{task}/{metric}`` keys of ``logged``
    (``trainer.callback_metrics`` after a fit, validate or test), each task's loss included as ``loss``.

    A task that logged nothing is absent. Keys of several evaluation dataloaders (``.../dataloader_idx_{i}``)
    are refused: a baseline holds one evaluation set per split.
    """
    tasks = list(task_names)
    out: dict[str, dict[str, float]] = {}
    for key, value in logged.items():
        parts = key.split("/")
        if len(parts) < 3 or parts[0] != split or parts[1] not in tasks:
            continue
        if len(parts) > 3:
            raise ValueError(
                f"logged key {key!r}: the run has several {split} dataloaders; a baseline holds one evaluation set "
                "per split. Evaluate the baseline on one dataloader."
            )
        out.setdefault(parts[1], {})[parts[2]] = float(value)
    return {task: out[task] for task in tasks if task in out}


def write_baselines(
    path: Union[str, os.PathLike],
    metrics: SplitMetrics,
    directions: Optional[Mapping[str, str]] = None,
    config: Any = None,
) -> Path:
    """Check and write a baseline file (format 1) at ``path``; returns the path.

    Args:
        path: the JSON file to write (parent folders are created; an existing file is replaced whole).
        metrics: ``{split: {task: {metric: value}}}``, split ``"val"`` and/or ``"test"``; e.g. the
            :func:`logged_task_metrics` of each single-task run, merged by task.
        directions: ``{"task/metric": "max" | "min"}``, e.g. :func:`task_directions` of the runs' tasks.
        config: JSON-serialisable provenance (resolved config, seeds...), stored as given.
    """
    baselines = _checked(
        {"format": FORMAT, "metrics": _plain(metrics), "directions": dict(directions or {}), "config": config}, str(path)
    )
    document = {"format": FORMAT, "metrics": baselines.metrics, "directions": baselines.directions}
    if config is not None:
        document["config"] = config
    try:
        text = json.dumps(document, indent=2, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"baselines {str(path)!r}: config is not JSON-serialisable: {error}") from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text + "\n")
    os.replace(temporary, path)
    return path


def read_baselines(path: Union[str, os.PathLike]) -> Baselines:
    """Read and check a baseline file written by :func:`write_baselines` (or by hand, in the same format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"baseline file {str(path)!r} does not exist; write it with `lightning-mtl baselines --config ...` "
            "(single-task runs of the same config) or lightning_mtl.baselines.write_baselines."
        )
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"baseline file {str(path)!r} is not valid JSON: {error}") from error
    return _checked(document, str(path))


def _plain(metrics: SplitMetrics) -> Any:
    if not isinstance(metrics, Mapping):
        return metrics
    return {
        split: {task: dict(values) if isinstance(values, Mapping) else values for task, values in tasks.items()}
        if isinstance(tasks, Mapping) else tasks
        for split, tasks in metrics.items()
    }


def _checked(document: Any, source: str) -> Baselines:
    """``document`` (a parsed baseline file) as :class:`Baselines`, or a ``ValueError`` naming what is wrong."""
    where = f"baseline file {source!r}"
    if not isinstance(document, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(document).__name__}")
    if document.get("format") != FORMAT:
        raise ValueError(
            f"{where}: unknown format {document.get('format')!r} (this version reads format {FORMAT}); "
            "write it again with write_baselines"
        )
    unknown = sorted(set(document) - {"format", "metrics", "directions", "config"})
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected format, metrics, directions and optional config")
    metrics = document.get("metrics")
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError(f"{where}: 'metrics' must be a non-empty object {{split: {{task: {{metric: value}}}}}}")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for split, tasks in metrics.items():
        if split not in SPLITS:
            raise ValueError(f"{where}: unknown split {split!r} in 'metrics'; expected {list(SPLITS)}")
        if not isinstance(tasks, Mapping) or not tasks:
            raise ValueError(f"{where}: metrics[{split!r}] must be a non-empty object {{task: {{metric: value}}}}")
        out[split] = {}
        for task, values in tasks.items():
            validate_task_name(task, what=f"{where}: task name")
            if not isinstance(values, Mapping) or not values:
                raise ValueError(f"{where}: metrics[{split!r}][{task!r}] must be a non-empty object {{metric: value}}")
            out[split][task] = {}
            for metric, value in values.items():
                validate_task_name(metric, what=f"{where}: task {task!r}: metric name")
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                    raise ValueError(f"{where}: {split}/{task}/{metric} must be a finite number, got {value!r}")
                out[split][task][metric] = float(value)
    directions = document.get("directions", {})
    if not isinstance(directions, Mapping):
        raise ValueError(f"{where}: 'directions' must be an object {{\"task/metric\": \"max\" | \"min\"}}")
    for key, direction in directions.items():
        if not isinstance(key, str) or key.count("/") != 1:
            raise ValueError(f"{where}: directions key {key!r} must read 'task/metric'")
        if direction not in ("max", "min"):
            raise ValueError(f"{where}: direction of {key!r} must be 'max' or 'min', got {direction!r}")
    return Baselines(out, dict(directions), document.get("config"), source)
