"""`MultiTaskModelSummary`: Lightning's model summary, then the parameters that are shared and each task's own."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities import rank_zero_warn

from lightning_mtl.architectures.base import parameter_counts

Row = tuple[str, int, int]


def parameter_rows(module: Any) -> list[Row]:
    """``(part, trainable, total)`` parameter counts of a ``MultiTaskModule``.

    Parts: ``"shared"`` and ``"task {name}"`` for each task, as :func:`~lightning_mtl.architectures.parameter_counts`
    splits them (a task owns its head and, for a :class:`~lightning_mtl.architectures.MultiTaskBackbone`, its
    gates, towers, columns...), ``"other"`` when the module has parameters outside backbone and heads (a
    balancer's or a loss's), and ``"total"``, Lightning's "Total params".
    """
    totals = parameter_counts(module)
    trainable = parameter_counts(module, trainable_only=True)
    rows = [("shared", trainable["shared"], totals["shared"])]
    rows += [(f"task {name}", trainable[name], totals[name]) for name in module.task_names]
    parameters = list(module.parameters())
    total = sum(p.numel() for p in parameters)
    total_trainable = sum(p.numel() for p in parameters if p.requires_grad)
    other = (total_trainable - sum(trainable.values()), total - sum(totals.values()))
    if other[1]:
        rows.append(("other", *other))
    rows.append(("total", total_trainable, total))
    return rows


def format_parameter_rows(rows: list[Row]) -> str:
    """``rows`` as fixed-width plain text: part, trainable, total and the share of the total."""
    total = rows[-1][2] or 1
    cells = [(part, f"{trainable:,}", f"{count:,}", f"{100 * count / total:.1f} %") for part, trainable, count in rows]
    header = ("parameters", "trainable", "total", "share")
    widths = [max(len(cell[i]) for cell in (header, *cells)) for i in range(4)]

    def line(*cell: str) -> str:
        return "  ".join([f"{cell[0]:<{widths[0]}}", *(f"{c:>{w}}" for c, w in zip(cell[1:], widths[1:]))])

    rule = line(*("-" * width for width in widths))
    return "\n".join([line(*header), rule, *(line(*cell) for cell in cells)])


class MultiTaskModelSummary(ModelSummary):
    """Lightning's ``ModelSummary``, followed by the parameters that are shared and those of each task.

    At the start of fit it prints Lightning's layer table (``max_depth`` and the other arguments work
    as for ``ModelSummary``; ``max_depth=0`` turns the whole summary off), then on global rank zero a
    table of trainable and total parameter counts: ``shared`` (the backbone's parameters every task
    uses; for a plain backbone, all of them), ``task {name}`` (its head and, for an architecture of
    :mod:`lightning_mtl.architectures`, its own gates, towers, columns...), ``other`` when some parameters
    belong to neither (a balancer's, e.g. uncertainty weighting's), and ``total``. The split is
    :func:`~lightning_mtl.architectures.parameter_counts`'s; :func:`parameter_rows` returns it.

    Lightning adds its own ``ModelSummary`` to a ``Trainer`` unless the callbacks hold one: passing this
    one replaces it (also with ``enable_model_summary=False``, which only stops the default).

    Args:
        max_depth: the depth of Lightning's layer table (``0``: no summary at all).
        **summarize_kwargs: passed to Lightning's ``ModelSummary``.
    """

    def __init__(self, max_depth: int = 1, **summarize_kwargs: Any) -> None:
        super().__init__(max_depth=max_depth, **summarize_kwargs)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not all(hasattr(pl_module, name) for name in ("backbone", "heads", "task_names")):
            raise ValueError(
                f"MultiTaskModelSummary: the model ({type(pl_module).__name__}) has no backbone, heads and task "
                "registry; use it with a MultiTaskModule, or Lightning's ModelSummary for another model."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if not self._max_depth or not trainer.is_global_zero:
            return
        if "shared" in pl_module.task_names:
            rank_zero_warn(
                "MultiTaskModelSummary: a task is named 'shared', which parameter_counts reserves for the shared "
                "count; the shared and per-task parameter counts are not shown. Rename the task to see them."
            )
            return
        print("\nParameters shared by the tasks and each task's own\n" + format_parameter_rows(parameter_rows(pl_module)))
