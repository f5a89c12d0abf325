"""`DeltaM`: the multi-task model's mean relative gain over single-task baselines (Maninis et al. 2019), logged."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_mtl.baselines import Baselines, Direction, metric_direction, read_baselines
from lightning_mtl.callbacks.task_table import _table_loggers
from lightning_mtl.evaluation import _compute, _compute_quietly, tasks_with_data

Average = Literal["tasks", "metrics"]
#: The split each run's table shows: fit shows its last validation epoch.
_SPLITS = {"fit": "val", "validate": "val", "test": "test"}


class Row(NamedTuple):
    """One compared metric: ``change`` is ``(value − baseline) / |baseline|`` in %, ``gain`` the same signed so that
    positive is better (``−change`` for a lower-is-better metric)."""

    task: str
    metric: str
    direction: Direction
    baseline: float
    value: float
    change: float
    gain: float


def relative_gain(value: float, baseline: float, direction: str) -> float:
    """``(−1)^l (value − baseline) / |baseline| × 100``, ``l = 1`` when lower is better: positive means better.

    ``|baseline|`` rather than ``baseline`` keeps "positive is better" for a negative baseline (an R² below
    zero); for the usual positive baselines it is Maninis et al.'s formula. A zero baseline is a ``ValueError``.
    """
    if baseline == 0:
        raise ValueError("the baseline is 0: the relative change (value − baseline) / |baseline| is undefined")
    change = (value - baseline) / abs(baseline) * 100.0
    return change if direction == "max" else -change


def delta_m(
    values: Mapping[str, Mapping[str, float]],
    baselines: Mapping[str, Mapping[str, float]],
    directions: Mapping[str, str],
    average: Average = "tasks",
) -> float:
    """Δm in %: the mean of :func:`relative_gain` over the ``{task: {metric: value}}`` of ``values``.

    ``average="tasks"``: ``(1/T) Σ_t (1/|M_t|) Σ_m gain_{t,m}``, each task counts once whatever its number of
    metrics (Maninis et al. 2019 and Vandenhende et al. 2021, one metric per task; LibMTL's ``Δp``).
    ``average="metrics"``: the mean over all task-metric pairs (Navon et al. 2022's ``Δm%`` on NYUv2).
    ``baselines`` must hold every task and metric of ``values`` and ``directions["task/metric"]`` say
    ``"max"`` or ``"min"`` for each.
    """
    if average not in ("tasks", "metrics"):
        raise ValueError(f"delta_m: average must be 'tasks' or 'metrics', got {average!r}")
    per_task = []
    for task, metrics in values.items():
        gains = []
        for metric, value in metrics.items():
            key = f"{task}/{metric}"
            if task not in baselines or metric not in baselines[task]:
                raise ValueError(f"delta_m: no baseline for {key!r}")
            if directions.get(key) not in ("max", "min"):
                raise ValueError(f"delta_m: the direction of {key!r} must be 'max' or 'min', got {directions.get(key)!r}")
            try:
                gains.append(relative_gain(value, baselines[task][metric], directions[key]))
            except ValueError as error:
                raise ValueError(f"delta_m: {key}: {error}") from error
        if gains:
            per_task.append(gains)
    if not per_task:
        raise ValueError("delta_m: nothing to compare (no task with a metric)")
    if average == "tasks":
        return sum(sum(gains) / len(gains) for gains in per_task) / len(per_task)
    return sum(sum(gains) for gains in per_task) / sum(len(gains) for gains in per_task)


class DeltaM(pl.Callback):
    """Logs ``val/delta_m`` and ``test/delta_m``: Δm of the multi-task model against single-task baselines.

    Δm (Maninis et al. 2019, "Attentive Single-Tasking of Multiple Tasks"; the multi-task performance
    measure of Vandenhende et al. 2021 and most MTL papers) is the mean relative gain of the multi-task
    model over one model per task, in %, each metric's change signed so that positive is better::

        Δm = (1/T) Σ_t (1/|M_t|) Σ_m (−1)^{l_{t,m}} (M_{t,m} − B_{t,m}) / |B_{t,m}| × 100,

    ``l = 1`` when lower is better (``average="metrics"``: the plain mean over all task-metric pairs).
    ``ModelCheckpoint(monitor="val/delta_m", mode="max")`` then keeps the best multi-task model.

    At each validation (test) epoch's end it reads the epoch's per-task metrics, the values the
    :class:`~lightning_mtl.MultiTaskModule` logs as ``val/{task}/{metric}``, and compares them with the
    baselines' ``val`` (``test``) values. Lightning runs a callback's ``on_validation_epoch_end``
    *before* the module's, so the callback computes the module's own metric objects: torchmetrics caches
    the value, the module then logs that same value, and under DDP it is the synchronised one, so Δm
    is identical on every process. The key is logged in that hook, where every ``ModelCheckpoint`` and
    ``EarlyStopping`` sees it, whatever their order in the callback list.

    Direction of each metric: ``directions`` if given; else ``loss`` is lower-is-better and a torchmetrics
    metric's ``higher_is_better`` decides; else the baseline file's ``directions``; a metric with none
    of these (``PearsonCorrCoef``, a custom metric) is a ``ValueError``, as is a file direction that
    contradicts the metric's class.

    Baselines and run must name the same tasks and metrics of the split: else a ``ValueError`` names
    what is missing on either side, or with ``partial=True`` Δm is taken over the pairs both have,
    with a warning naming the others (a Δm over fewer tasks is not comparable with a full one). A
    task with no labelled sample in an epoch gives NaN (``partial=True``: leaves it out, with a
    warning); a labelled task whose value is NaN or inf (diverged) is compared as it is, so Δm is not
    finite (with a warning), never left out. A baseline of 0 is a ``ValueError`` naming its task and metric.

    When fit (its last validation epoch), validate or test ends it prints, on global rank zero, a
    table: per task and metric, the baseline, the multi-task value, the relative change, the signed
    gain and Δm. :meth:`rows` returns the last compared rows of a split. The same table goes, as a table
    (:func:`delta_m_table`: the numbers unrounded, change and gain in %, Δm as a last row), to every logger
    of the trainer that can hold one: a ``WandbLogger`` logs it as a W&B Table under ``{split}/delta_m_table``.

    A callback rather than a module argument: the model's constructor and checkpoints stay unchanged,
    it is added like any Lightning callback (in YAML under ``trainer.callbacks``), and runs without
    baselines (the baselines themselves) simply leave it out.

    Args:
        baselines: a baseline file (see :mod:`lightning_mtl.baselines`), read when the run is set up,
            or :class:`~lightning_mtl.baselines.Baselines`.
        directions: ``{"task/metric": "max" | "min"}``, overriding every other source of direction.
        average: ``"tasks"`` (mean over tasks of each task's mean over metrics) or ``"metrics"``.
        partial: compare only the task-metric pairs both the baselines and the run have (warns).
        include_loss: also compare each task's loss (``{split}/{task}/loss``, lower is better); by
            default Δm compares metrics only, as the papers do.
        digits: significant digits of the printed values.
        log_table: log the table to the loggers that can hold one (``WandbLogger.log_table``): ``None`` (the
            default) when the trainer has such a logger, ``True`` always (a ``ValueError`` at set-up when no logger
            can), ``False`` never (the table is still printed, ``{split}/delta_m`` still logged).
    """

    def __init__(
        self,
        baselines: Union[str, Path, Baselines],
        directions: Optional[dict[str, Literal["max", "min"]]] = None,
        average: Average = "tasks",
        partial: bool = False,
        include_loss: bool = False,
        digits: int = 4,
        log_table: Optional[bool] = None,
    ) -> None:
        if not isinstance(baselines, (str, os.PathLike, Baselines)):
            raise TypeError(f"DeltaM: baselines must be a file path or Baselines, got {type(baselines).__name__}")
        for key, direction in (directions or {}).items():
            if not isinstance(key, str) or key.count("/") != 1:
                raise ValueError(f"DeltaM: directions key {key!r} must read 'task/metric', e.g. 'depth/mae'")
            if direction not in ("max", "min"):
                raise ValueError(f"DeltaM: direction of {key!r} must be 'max' (higher is better) or 'min', got {direction!r}")
        if average not in ("tasks", "metrics"):
            raise ValueError(f"DeltaM: average must be 'tasks' or 'metrics', got {average!r}")
        if isinstance(digits, bool) or not isinstance(digits, int) or digits <= 0:
            raise ValueError(f"DeltaM: digits must be a positive int, got {digits!r}")
        if log_table not in (None, True, False):
            raise ValueError(f"DeltaM: log_table must be None (when a logger can), True or False, got {log_table!r}")
        self.baselines = baselines
        self.directions: dict[str, Direction] = dict(directions or {})
        self.average = average
        self.partial = partial
        self.include_loss = include_loss
        self.digits = digits
        self.log_table = log_table
        self._loaded: Optional[Baselines] = None
        self._plans: dict[str, dict[str, list[tuple[str, float, Direction]]]] = {}
        self._last: dict[str, tuple[list[Row], float]] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not all(hasattr(pl_module, name) for name in ("tasks", "task_names")):
            raise ValueError(
                f"DeltaM: the model ({type(pl_module).__name__}) has no task registry; use it with a MultiTaskModule."
            )
        baselines = self.baselines
        self._loaded = baselines if isinstance(baselines, Baselines) else read_baselines(baselines)
        self._plans = {}
        self._last.pop(_SPLITS.get(stage, ""), None)  # a run without evaluation prints no earlier run's table
        if self.log_table and stage in _SPLITS and not _table_loggers(trainer):
            names = [type(logger).__name__ for logger in trainer.loggers] or "none"
            raise ValueError(
                f"DeltaM(log_table=True): no logger of the trainer can log a table (loggers: {names}); use a "
                "WandbLogger, or DeltaM(log_table=None) to log the table only when a logger can."
            )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._plan(trainer, pl_module, "val")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._plan(trainer, pl_module, "test")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluate(trainer, pl_module, "test")

    def rows(self, split: str) -> list[Row]:
        """The rows of the last compared ``split`` (``"val"`` or ``"test"``) epoch of this or the last run; empty before one."""
        return list(self._last.get(split, ([], math.nan))[0])

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        split = _SPLITS.get(stage)
        if split is None or split not in self._last:
            return
        rows, value = self._last[split]
        if trainer.is_global_zero:
            when = ", last validation epoch" if stage == "fit" else ""
            title = f"Δm against single-task baselines ({split}{when}): {value:+.2f} %"
            print("\n" + format_delta_m(rows, value, title, self.average, self.digits))
            if self.log_table is not False:
                columns, data = delta_m_table(rows, value, self.average)
                for logger in _table_loggers(trainer):
                    logger.log_table(key=f"{split}/delta_m_table", columns=columns, data=data)

    def _plan(self, trainer: pl.Trainer, pl_module: Any, split: str) -> None:
        """Check the baselines of ``split`` against the run once: ``{task: [(metric, baseline, direction)]}``."""
        count = len(getattr(trainer, f"num_{split}_batches"))
        if count > 1:
            raise ValueError(
                f"DeltaM: the run has {count} {split} dataloaders; Δm compares one evaluation set with the baselines. "
                f"Give the {split} split one dataloader (a MultiTaskDataModule with per-task datasets makes one)."
            )
        if split in self._plans:
            return
        assert self._loaded is not None
        source = self._loaded.source
        if split not in self._loaded.metrics:
            raise ValueError(
                f"DeltaM: the baselines ({source}) hold no {split!r} metrics (only {sorted(self._loaded.metrics)}), "
                f"so {split}/delta_m cannot be computed; write the baselines with {split} metrics."
            )
        filed = {
            (task, metric): value
            for task, metrics in self._loaded.metrics[split].items()
            for metric, value in metrics.items()
            if self.include_loss or metric != "loss"
        }
        run = [
            (task, metric)
            for task in pl_module.task_names
            for metric in (["loss"] if self.include_loss else []) + list(pl_module.tasks[task].metrics)
        ]
        unknown = sorted(set(self.directions) - {f"{task}/{metric}" for task, metric in run})
        if unknown:
            raise ValueError(f"DeltaM: directions names {unknown}, which the run does not log (it logs {_keys(run)})")
        missing = [pair for pair in run if pair not in filed]
        logged = set(run)
        extra = [pair for pair in filed if pair not in logged]
        bare = [task for task in pl_module.task_names if not any(name == task for name, _ in run)]
        if (missing or extra or bare) and not self.partial:
            raise ValueError(
                f"DeltaM: the {split} baselines ({source}) do not match the run: "
                + _mismatch(missing, extra, pl_module.task_names, filed, bare)
                + ". Write the baselines again for this run's tasks and metrics, or pass DeltaM(partial=True) to "
                "compare only the pairs both have."
            )
        compared = [pair for pair in run if pair in filed]
        if not compared:
            raise ValueError(f"DeltaM: the {split} baselines ({source}) and the run have no task metric in common")
        if missing or extra or bare:
            rank_zero_warn(
                f"DeltaM(partial=True): {split}/delta_m compares {len(compared)} task-metric pairs; left out: "
                + _mismatch(missing, extra, pl_module.task_names, filed, bare)
                + ". It is not comparable with a Δm over all of them."
            )
        plan: dict[str, list[tuple[str, float, Direction]]] = {}
        for task, metric in compared:
            if filed[(task, metric)] == 0:
                raise ValueError(
                    f"DeltaM: the {split} baseline of {task}/{metric} ({source}) is 0, so its relative change is "
                    "undefined; compare another metric of the task (remove this one from the file and pass "
                    "partial=True) or check the baseline run."
                )
            direction = self._direction(pl_module, task, metric)
            plan.setdefault(task, []).append((metric, filed[(task, metric)], direction))
        self._plans[split] = plan

    def _direction(self, pl_module: Any, task: str, metric: str) -> Direction:
        key = f"{task}/{metric}"
        if key in self.directions:
            return self.directions[key]
        instance = pl_module.tasks[task].metrics.get(metric)
        own = metric_direction(metric, instance)
        assert self._loaded is not None
        filed = self._loaded.directions.get(key)
        if own is not None and filed is not None and own != filed:
            declared = "a loss is best at 'min'" if metric == "loss" else (
                f"{type(instance).__name__}.higher_is_better says {own!r}"
            )
            raise ValueError(
                f"DeltaM: the baselines ({self._loaded.source}) say {key!r} is best at {filed!r}, but {declared}; "
                f"fix the file or pass DeltaM(directions={{{key!r}: ...}})."
            )
        direction = own or filed
        if direction is None:
            raise ValueError(
                f"DeltaM: task {task!r}: metric {metric!r} ({type(instance).__name__}) declares no direction "
                "(its higher_is_better is None) and the baselines give none; pass "
                f"DeltaM(directions={{{key!r}: 'max'}}) if higher is better, or 'min' if lower is."
            )
        return direction

    def _evaluate(self, trainer: pl.Trainer, pl_module: Any, split: str) -> None:
        """Log ``{split}/delta_m`` from the module's metric objects of the epoch (computed, so cached for the module)."""
        plan = self._plans[split]
        metrics = getattr(pl_module, f"{split}_metrics")
        losses = getattr(pl_module, f"{split}_task_losses")
        rows: list[Row] = []
        # A task is absent when no process had a label of it; one whose loss is NaN or inf (diverged) is compared.
        absent = [task for task, has_data in zip(plan, tasks_with_data(pl_module, losses, list(plan))) if not has_data]
        for task, compared in plan.items():
            if task in absent:
                continue
            for metric, baseline, direction in compared:
                value = _compute_quietly(losses[task]) if metric == "loss" else _compute(task, metric, metrics[task][metric])
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(
                        f"DeltaM: {split}/{task}/{metric} is not one number ({shape}); Δm compares scalar metrics "
                        "(e.g. average='macro' rather than None)."
                    )
                value = float(value)
                change = (value - baseline) / abs(baseline) * 100.0
                rows.append(Row(task, metric, direction, baseline, value, change, relative_gain(value, baseline, direction)))
        if absent and not trainer.sanity_checking:  # the sanity check's few batches may hold only some tasks
            result = "Δm leaves them out" if self.partial else f"{split}/delta_m is NaN"
            rank_zero_warn(f"DeltaM: no labelled sample of task(s) {absent} in this {split} epoch: {result}.")
        diverged = [f"{row.task}/{row.metric}" for row in rows if not math.isfinite(row.value)]
        if diverged:
            rank_zero_warn(f"DeltaM: {split} values of {diverged} are not finite (a diverged task?): {split}/delta_m is not finite.")
        if rows and (self.partial or not absent):
            by_task: dict[str, dict[str, float]] = {}
            for row in rows:
                by_task.setdefault(row.task, {})[row.metric] = row.value
            value = delta_m(
                by_task,
                {task: {metric: baseline for metric, baseline, _ in compared} for task, compared in plan.items()},
                {f"{row.task}/{row.metric}": row.direction for row in rows},
                self.average,
            )
        else:
            value = math.nan
        pl_module.log(f"{split}/delta_m", value, prog_bar=split == "val")
        if not trainer.sanity_checking:
            self._last[split] = (rows, value)


def format_delta_m(rows: list[Row], value: float, title: str, average: str = "tasks", digits: int = 4) -> str:
    """``rows`` as fixed-width plain text under ``title``: baseline, multi-task value, change and gain, then Δm."""
    cells = [
        (
            row.task,
            row.metric,
            "higher" if row.direction == "max" else "lower",
            f"{row.baseline:#.{digits}g}",
            f"{row.value:#.{digits}g}",
            f"{row.change:+.2f} %",
            f"{row.gain:+.2f} %",
        )
        for row in rows
    ]
    header = ("task", "metric", "better", "baseline", "multi-task", "change", "gain")
    widths = [max(len(cell[i]) for cell in (header, *cells)) for i in range(len(header))]

    def line(*cell: str) -> str:
        return "  ".join(
            [f"{cell[0]:<{widths[0]}}", f"{cell[1]:<{widths[1]}}", f"{cell[2]:<{widths[2]}}"]
            + [f"{c:>{w}}" for c, w in zip(cell[3:], widths[3:])]
        )

    rule = line(*("-" * width for width in widths))
    how = "mean over tasks of each task's mean gain" if average == "tasks" else "mean gain over all task-metric pairs"
    footer = f"Δm = {value:+.2f} % ({how}; gain: the change signed so that positive is better)"
    return "\n".join([title, line(*header), rule, *(line(*cell) for cell in cells), footer])


def delta_m_table(rows: list[Row], value: float, average: str = "tasks") -> tuple[list[str], list[list[Any]]]:
    """``(columns, data)`` of the printed table for a logger's table: the printed columns, the numbers unrounded
    (change and gain in %), then a row ``Δm``, ``mean over tasks`` (or ``metrics``) with Δm as its gain."""
    columns = ["task", "metric", "better", "baseline", "multi-task", "change", "gain"]
    data: list[list[Any]] = [
        [row.task, row.metric, "higher" if row.direction == "max" else "lower", row.baseline, row.value, row.change, row.gain]
        for row in rows
    ]
    data.append(["Δm", f"mean over {average}", "higher", None, None, None, value])
    return columns, data


def _keys(pairs: Any) -> list[str]:
    return [f"{task}/{metric}" for task, metric in pairs]


def _mismatch(missing: list, extra: list, task_names: list[str], filed: Mapping, bare: list[str]) -> str:
    """What differs, by task where a whole task differs, else by ``task/metric``."""
    filed_tasks = {task for task, _ in filed}
    parts = []
    unknown_tasks = sorted(filed_tasks - set(task_names))
    if unknown_tasks:
        parts.append(f"tasks {unknown_tasks} are in the baselines but not in the run")
    unbased = [task for task in task_names if task not in filed_tasks and task not in bare]
    if unbased:
        parts.append(f"tasks {unbased} of the run have no baseline")
    if bare:
        parts.append(f"tasks {bare} of the run have no metric (give them metrics, or DeltaM(include_loss=True))")
    lacking = _keys((t, m) for t, m in missing if t in filed_tasks)
    if lacking:
        parts.append(f"metrics {lacking} of the run have no baseline")
    surplus = _keys((t, m) for t, m in extra if t in task_names)
    if surplus:
        parts.append(f"metrics {surplus} are in the baselines but not in the run")
    return "; ".join(parts)
