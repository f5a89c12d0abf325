"""Per-task metrics and losses of a :class:`~lightning_mtl.MultiTaskModule`, logged at each epoch's end.

:class:`TaskEvaluation` keeps, per stage, one torchmetrics collection per task (deep copies of the
``Task.metrics``, so train/val/test never share state) and, for validation and test, each task's
mean loss weighted by its labelled samples. The module registers these ``ModuleDict`` s under its own
names (``train_metrics``, ``val_metrics``, ``test_metrics``, ``val_task_losses``, ``test_task_losses``),
so they move with it and keep their checkpoint keys; this unit updates and logs them.

Logged keys: ``{stage}/{task}/loss``, ``{stage}/{task}/{metric}`` and ``{stage}/loss``; with several
evaluation dataloaders each ends in ``/dataloader_idx_{i}`` (Lightning's convention).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from lightning_mtl.forward import ModuleUnit
from lightning_mtl.task import Task, task_module_dict

if TYPE_CHECKING:
    from lightning_mtl.module import MultiTaskModule

Stage = Literal["train", "val", "test"]


def stage_metrics(tasks: dict[str, Task]) -> nn.ModuleDict:
    """``{task: {name: metric}}``: fresh deep copies of every task's metrics, for one stage."""
    return nn.ModuleDict(
        {name: task_module_dict(copy.deepcopy(task.metrics), f"metrics of task {name!r}") for name, task in tasks.items()}
    )


def stage_task_losses(tasks: dict[str, Task]) -> nn.ModuleDict:
    """``{task: MeanMetric}``: each task's loss averaged over an evaluation epoch, weighted by labelled samples."""
    # A NaN batch loss must make the task's loss NaN: the default ("warn") drops it, and a diverging task would report
    # the mean of its other batches. nan_strategy=NaN replaces a NaN by NaN, keeping the batch weights, which
    # nan_strategy="disable" ignores (torchmetrics 1.9: every batch then weighs 1).
    return nn.ModuleDict({name: MeanMetric(nan_strategy=math.nan) for name in tasks})


class TaskEvaluation(ModuleUnit):
    """Updates and logs the module's per-task metrics and evaluation losses."""

    def __init__(self, module: "MultiTaskModule") -> None:
        super().__init__(module)
        # (name, metric) pairs per task, looked up once instead of per step (the same Metric objects).
        self._train_metric_items = {name: list(module.train_metrics[name].items()) for name in module.task_names}
        # metrics and task losses of the evaluation dataloaders after the first: {(stage, index): (metrics, losses)}
        self._more_dataloaders: dict[tuple[str, int], tuple[nn.ModuleDict, nn.ModuleDict]] = {}
        self._checked: set[str] = set()  # tasks whose metrics were checked against the head once

    def renew_inference_states(self) -> None:
        """Give every metric whose state was last reset under ``torch.inference_mode`` fresh, ordinary states.

        ``trainer.validate``/``test`` run under inference mode, and a metric reset there (at the epoch's end)
        holds inference tensors, which a later ``trainer.fit`` validates without inference mode and cannot
        update in place ("Inplace update to inference tensor outside InferenceMode"). Called at fit start;
        the states are empty between epochs, so nothing is lost.
        """
        units = [self.module, *(module for pair in self._more_dataloaders.values() for module in pair)]
        with torch.inference_mode(False):
            for unit in units:
                for metric in unit.modules():
                    if isinstance(metric, Metric) and any(
                        isinstance(state, Tensor) and state.is_inference() for state in metric.metric_state.values()
                    ):
                        metric.reset()

    def update_train(self, name: str, prediction: Tensor, target: Tensor) -> None:
        """Update task ``name``'s training metrics with one step's labelled samples."""
        if self._train_metric_items[name]:
            self._update(name, self._train_metric_items[name], prediction.detach(), target)

    def _update(self, name: str, metrics: Any, prediction: Tensor, target: Tensor) -> None:
        """Update ``metrics`` (``(metric name, metric)`` pairs) of task ``name``; an error names the task and metric.

        The first update of a task also checks what can be checked once: a metric with ``num_classes``
        against the width of a class-score head (``MulticlassAccuracy(10)`` on a single-logit head
        reports a meaningless value in some runs and crashes in others).
        """
        if name not in self._checked:
            for metric_name, metric in metrics:
                _check_num_classes(name, metric_name, metric, prediction)
            self._checked.add(name)
        for metric_name, metric in metrics:
            try:
                metric.update(prediction, target)
            except (RuntimeError, ValueError, IndexError, TypeError) as error:
                raise type(error)(
                    f"task {name!r}: metric {metric_name!r} ({type(metric).__name__}) failed on prediction of shape "
                    f"{tuple(prediction.shape)} ({prediction.dtype}) and target of shape {tuple(target.shape)} "
                    f"({target.dtype}): {error}"
                ) from error

    def evaluation_step(self, batch: Any, stage: Stage, dataloader_idx: int) -> None:
        """Update the task losses and metrics of ``stage`` (of this dataloader); they are logged at the epoch's end."""
        metrics, task_losses = self._metrics(stage, dataloader_idx)
        forward = self.module.task_forward
        for name, prediction, target, maybe_missing in forward.run(forward.groups(batch))[1]:
            loss, prediction, target, count = forward.loss(name, prediction, target, maybe_missing)
            if loss is None:
                continue
            task_losses[name].update(loss.detach(), weight=count)
            if len(metrics[name]):
                self._update(name, metrics[name].items(), prediction, target)

    def _metrics(self, stage: Stage, dataloader_idx: int) -> tuple[nn.ModuleDict, nn.ModuleDict]:
        """``({task: {name: metric}}, {task: mean loss})`` of one evaluation dataloader: the module's own for the
        first, fresh copies (created at first use) for the others, so several dataloaders are never pooled."""
        own = (getattr(self.module, f"{stage}_metrics"), getattr(self.module, f"{stage}_task_losses"))
        if dataloader_idx == 0:
            return own
        key = (stage, dataloader_idx)
        if key not in self._more_dataloaders:
            copies = copy.deepcopy(nn.ModuleList(own)).to(self.module.device)
            for module in copies.modules():
                if isinstance(module, Metric):
                    module.reset()
            self._more_dataloaders[key] = (copies[0], copies[1])
        return self._more_dataloaders[key]

    def log_evaluation(self, stage: Stage) -> None:
        """Log ``{stage}/{task}/loss``, ``{stage}/{task}/{metric}`` and ``{stage}/loss`` for the epoch, then reset.

        Every process computes every task's values in the same order (each ``compute`` synchronises the
        processes), including tasks it had no label of: a key logged on some processes only would leave
        the others waiting in its synchronisation. A task with no labelled sample on any process is not
        logged. A task with data whose loss is NaN or infinite (diverged) is logged as it is, with a warning, and
        makes ``{stage}/loss`` non-finite too: a checkpoint monitoring it never takes that epoch for the best.
        ``{stage}/loss`` is the static-weighted sum of the task losses of the tasks with data.
        With several dataloaders every key ends in ``/dataloader_idx_{i}``, one set per dataloader
        (Lightning's convention), never pooled; ``{stage}/loss`` without suffix is then the first
        dataloader's (which ``lr_scheduler``'s ``ReduceLROnPlateau`` and checkpoints monitoring it follow).
        """
        module = self.module
        batches = getattr(module.trainer, f"num_{stage}_batches", None) if module._trainer is not None else None
        count = max(len(batches), 1) if isinstance(batches, list) else 1
        for index in range(count):
            metrics, task_losses = self._metrics(stage, index)
            suffix = f"/dataloader_idx_{index}" if count > 1 else ""
            total, found = 0.0, False
            for name, has_data in zip(module.task_names, tasks_with_data(module, task_losses, module.task_names)):
                value = _compute_quietly(task_losses[name])
                if has_data:
                    if not torch.isfinite(value):
                        rank_zero_warn(f"{stage}/{name}/loss{suffix} is {value.item()} (a diverged task?)")
                    module.log(f"{stage}/{name}/loss{suffix}", value, add_dataloader_idx=False)
                    total, found = total + module.tasks[name].weight * value, True
                    for metric_name, metric in metrics[name].items():
                        value = _compute(name, metric_name, metric, quietly=False)
                        module.log(
                            f"{stage}/{name}/{metric_name}{suffix}", value, prog_bar=stage == "val", add_dataloader_idx=False
                        )
                task_losses[name].reset()
                for metric in metrics[name].values():
                    metric.reset()
            if found:
                module.log(f"{stage}/loss{suffix}", total, prog_bar=stage == "val", add_dataloader_idx=False)
                if index == 0 and suffix:  # what a scheduler or checkpoint monitoring {stage}/loss follows
                    module.log(f"{stage}/loss", total, add_dataloader_idx=False)

    def log_train_metrics(self) -> None:
        """``train/{task}/{metric}`` for the epoch, computed on every process in the same order, then reset.

        A task's metrics are computed when any process updated them (one small reduction of that
        flag per task under DDP), so every process takes part in the same synchronisations.
        """
        module = self.module
        for name in module.task_names:
            items = self._train_metric_items[name]
            if not items:
                continue
            updated = torch.tensor(float(any(metric.update_count > 0 for _, metric in items)), device=module.device)
            if module._world_size > 1:
                updated = module._all_reduce(updated, "sum")
            if updated.item() > 0:
                for metric_name, metric in items:
                    module.log(f"train/{name}/{metric_name}", _compute(name, metric_name, metric))
            for _, metric in items:
                metric.reset()


def tasks_with_data(module: "MultiTaskModule", task_losses: nn.ModuleDict, names: Sequence[str]) -> list[bool]:
    """Per task of ``names``, whether any process had a labelled sample of it this epoch (its loss metric was
    updated): one reduction under DDP. A task with data whose loss is NaN or inf has diverged; it is not absent."""
    flags = torch.tensor([float(task_losses[name].update_count > 0) for name in names], device=module.device)
    if module._world_size > 1:
        flags = module._all_reduce(flags, "sum")
    return (flags > 0).tolist()


def _compute_quietly(metric: Metric) -> Tensor:
    """``metric.compute()`` without its warning when this process never updated it (no label of the task here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric.compute()


def _compute(task: str, name: str, metric: Metric, quietly: bool = True) -> Tensor:
    """A task's metric for the epoch; an error (R2Score on one sample, ...) is re-raised naming the task and metric."""
    try:
        return _compute_quietly(metric) if quietly else metric.compute()
    except (RuntimeError, ValueError, IndexError, TypeError, ZeroDivisionError) as error:
        raise type(error)(f"task {task!r}: metric {name!r} ({type(metric).__name__}) failed to compute: {error}") from error


def _check_num_classes(task: str, name: str, metric: Metric, prediction: Tensor) -> None:
    """A class-count metric (``num_classes``) on class scores of another width: raise, naming both."""
    num_classes = getattr(metric, "num_classes", None)
    if not isinstance(num_classes, int) or not prediction.is_floating_point() or prediction.ndim < 2:
        return
    if prediction.shape[1] != num_classes:
        raise ValueError(
            f"task {task!r}: metric {name!r} ({type(metric).__name__}) expects {num_classes} classes, but the head "
            f"predicts scores of shape {tuple(prediction.shape)} ({prediction.shape[1]} per sample). Make the head's "
            f"output width {num_classes}, or build the metric with num_classes={prediction.shape[1]}"
            + (" (a single logit is binary: use BinaryAccuracy and the like)." if prediction.shape[1] == 1 else ".")
        )
