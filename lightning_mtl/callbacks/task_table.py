"""`TaskTable`: one table of every task's metrics, printed when fit, validate or test ends."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import lightning.pytorch as pl

#: The metrics each run's table shows: fit shows its last validation epoch.
_STAGES = {"fit": "val", "validate": "val", "test": "test"}

Row = tuple[Optional[str], str, float]


def task_rows(metrics: Mapping[str, Any], task_names: Sequence[str], stage: str) -> list[Row]:
    """``(task, metric, value)`` for every ``{stage}/{task}/{metric}`` key of ``metrics``, then ``{stage}/loss``.

    Rows are grouped by task in ``task_names`` order, each task's in the order the keys were logged
    (its loss first, as the module logs it). The metric is the rest of the key after the task, so a
    suffix such as ``/dataloader_idx_1`` stays in it. The overall ``{stage}/loss`` rows (the
    ``Task.weight``-weighted sum) come last, with task ``None``. Other keys are left out.
    """
    by_task: dict[Optional[str], list[Row]] = {name: [] for name in task_names}
    by_task[None] = []
    prefix = f"{stage}/"
    for key, value in metrics.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        head, _, tail = rest.partition("/")
        if head in by_task and tail:
            by_task[head].append((head, tail, float(value)))
        elif head == "loss":
            by_task[None].append((None, rest, float(value)))
    return [row for rows in by_task.values() for row in rows]


def format_rows(rows: Sequence[Row], title: str, digits: int = 4) -> str:
    """``rows`` as fixed-width plain text under ``title``; the overall rows' task reads ``(all)``."""
    cells = [(task if task is not None else "(all)", metric, f"{value:#.{digits}g}") for task, metric, value in rows]
    header = ("task", "metric", "value")
    widths = [max(len(row[i]) for row in (header, *cells)) for i in range(3)]

    def line(task: str, metric: str, value: str) -> str:
        return f"{task:<{widths[0]}}  {metric:<{widths[1]}}  {value:>{widths[2]}}"

    rule = line(*("-" * width for width in widths))
    return "\n".join([title, line(*header), rule, *(line(*cell) for cell in cells)])


class TaskTable(pl.Callback):
    """Prints one table of every task's metrics, ``(task, metric, value)``, when a run ends.

    The values are those the :class:`~lightning_mtl.MultiTaskModule` logged (``trainer.callback_metrics``)
    under ``{stage}/{task}/{metric}``: each task's loss and metrics, then the overall ``{stage}/loss``:

    - ``fit``: the last validation epoch's (``val/...``);
    - ``validate``: ``val/...``; ``test``: ``test/...`` (so ``fit`` then ``test``, as the CLI's
      ``--test_after_fit true`` runs them, prints the validation table, then the test table).

    Task names come from the module's task registry, so a key is split at the task name. The
    table is printed on global rank zero only (under DDP the logged values are already reduced
    over processes), after Lightning's own results table of ``validate``/``test``; nothing is printed
    when the stage logged no metric (a fit without validation). :meth:`rows` returns the rows.

    Args:
        digits: significant digits of the printed values.
        log_table: also log the table to every logger that can hold one (``WandbLogger.log_table``) under
            ``{stage}/task_table``; the values themselves are logged anyway, as scalars. A ``ValueError``
            at set-up when no logger of the trainer can.
    """

    def __init__(self, digits: int = 4, log_table: bool = False) -> None:
        if isinstance(digits, bool) or not isinstance(digits, int) or digits <= 0:
            raise ValueError(f"TaskTable: `digits` must be a positive int, got {digits!r}.")
        self.digits = digits
        self.log_table = log_table

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "task_names"):
            raise ValueError(
                f"TaskTable: the model ({type(pl_module).__name__}) has no task registry (`task_names`); "
                "use it with a MultiTaskModule."
            )
        if self.log_table and stage in _STAGES and not _table_loggers(trainer):
            names = [type(logger).__name__ for logger in trainer.loggers] or "none"
            raise ValueError(
                f"TaskTable(log_table=True): no logger of the trainer can log a table (loggers: {names}); "
                "use a WandbLogger, or TaskTable(log_table=False) to print the table only."
            )

    def rows(self, trainer: pl.Trainer, stage: str) -> list[Row]:
        """``(task, metric, value)`` of ``stage`` (``"val"`` or ``"test"``) from ``trainer.callback_metrics``."""
        return task_rows(trainer.callback_metrics, trainer.lightning_module.task_names, stage)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Called once a run has finished normally (not after an exception), after Lightning's results table.
        logged = _STAGES.get(stage)
        if logged is None or not trainer.is_global_zero:
            return
        rows = self.rows(trainer, logged)
        if not rows:
            return
        when = " (last validation epoch)" if stage == "fit" else ""
        print("\n" + format_rows(rows, f"Per-task {logged} metrics{when}", self.digits))
        if self.log_table:
            data = [[task if task is not None else "(all)", metric, value] for task, metric, value in rows]
            for logger in _table_loggers(trainer):
                logger.log_table(key=f"{logged}/task_table", columns=["task", "metric", "value"], data=data)


def _table_loggers(trainer: pl.Trainer) -> list[Any]:
    return [logger for logger in trainer.loggers if callable(getattr(logger, "log_table", None))]
