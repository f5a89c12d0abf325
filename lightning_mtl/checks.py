"""Checks of a model against its configuration and its run, made once (at construction or fit start).

Each raises with the task or setting at fault and the fix, before a step runs, instead of letting a
run fail later or train silently wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_mtl.balancers import Balancer
from lightning_mtl.task import Task


def task_registry(tasks: Any) -> dict[str, Task]:
    """``{name: Task}`` from a sequence of ``Task`` or a mapping ``{name: Task}``, checked."""
    if isinstance(tasks, Mapping):
        items = list(tasks.items())
        for key, task in items:
            if isinstance(task, Task) and key != task.name:
                raise ValueError(f"tasks[{key!r}] is a Task named {task.name!r}; the key and the name must match")
        tasks = [task for _, task in items]
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a sequence of Task or a mapping {{name: Task}}, got {type(tasks).__name__}")
    if not tasks:
        raise ValueError("tasks is empty: a MultiTaskModule needs at least one Task")
    registry: dict[str, Task] = {}
    for task in tasks:
        if not isinstance(task, Task):
            raise TypeError(f"every entry of tasks must be a Task, got {type(task).__name__}: {task!r}")
        if task.name in registry:
            raise ValueError(f"duplicate task name {task.name!r}: task names must be unique")
        registry[task.name] = task
    return registry


def check_no_shared_head_parameters(
    backbone: nn.Module, heads: nn.ModuleDict, losses: nn.ModuleDict, balancer: Balancer
) -> None:
    """Gradient-level balancing needs the backbone's parameters apart from the heads' and losses'."""
    shared = {id(p) for p in backbone.parameters()}
    for name in heads:
        modules = [heads[name]] + ([losses[name]] if name in losses else [])
        if any(id(p) in shared for module in modules for p in module.parameters()):
            raise ValueError(
                f"task {name!r}: its head (or loss) shares parameters with the backbone (tied weights). "
                f"Balancer {type(balancer).__name__} combines the task gradients at the backbone "
                "output, so a shared parameter would also get the head's unbalanced gradient. Untie the "
                "weights, or use a loss-level balancer."
            )


def check_gradient_strategy(strategy: Any, balancer: Balancer, gradients: str) -> None:
    """Per-task parameter gradients need the full parameters, which sharded strategies do not keep."""
    name = type(strategy).__name__
    sharded = "FSDP" in name or "DeepSpeed" in name
    if sharded and balancer.needs != "losses" and gradients == "parameters":
        raise ValueError(
            f"balancer {type(balancer).__name__} with gradients='parameters' is not supported under "
            f"{name}: the strategy shards the parameters and owns backward, so per-task parameter "
            "gradients cannot be formed. Use gradients='representation' (gradients w.r.t. the backbone "
            "output) or a loss-level balancer."
        )


def _one_task_per_step(datamodule: Any) -> Optional[str]:
    """The data module's sampling mode when each of its steps holds one task (per-task data), else None."""
    sampling = getattr(datamodule, "sampling", None)
    if sampling in (None, "zip", "zip_shortest") or getattr(datamodule, "task_names", None) is None:
        return None
    return sampling


def check_sampling_under_ddp(datamodule: Any, plain_ddp: bool) -> None:
    """Single-task sampling leaves the other heads without gradient; plain DDP rejects that mid-run."""
    sampling = _one_task_per_step(datamodule)
    if sampling is not None and plain_ddp:
        raise ValueError(
            f"sampling={sampling!r} trains one task per step, so the other tasks' heads get no gradient in "
            "that step, which plain DDP rejects. Use Trainer(strategy='ddp_find_unused_parameters_true') "
            "(or DDPStrategy(find_unused_parameters=True)), or sampling='zip'."
        )


def check_balancer_under_sampling(datamodule: Any, balancer: Balancer) -> None:
    """A balancer that compares the tasks of a step does nothing when every step holds one task."""
    sampling = _one_task_per_step(datamodule)
    if sampling is None or len(datamodule.task_names) < 2:
        return
    if not balancer.supports_one_task_per_step:
        name = type(balancer).__name__
        raise ValueError(
            f"balancer {name} does nothing under sampling={sampling!r}: each step holds one task, so {name}, "
            "which weighs the tasks of a step against each other, has nothing to compare: the task's weight is "
            "always 1 (or another constant) and the run is plain per-task training. Use sampling='zip' or "
            "'zip_shortest' to have every task in every step (per-task batch sizes, batch_size={task: n}, keep "
            "the tasks' proportions), or balancer=None (static Task.weight weights) to train task by task. (A "
            "Balancer subclass whose weight of a task does not depend on the other tasks of the step declares "
            "supports_one_task_per_step = True.)"
        )


def check_data_tasks(data_tasks: Optional[Sequence[str]], task_names: Sequence[str]) -> None:
    """The data module's tasks must be the model's; a model task without training data is warned about."""
    if not data_tasks:
        return
    unknown = [name for name in data_tasks if name not in task_names]
    if unknown:
        raise ValueError(f"the data has task(s) {unknown} that the model does not have; model tasks: {list(task_names)}")
    warn_untrained(task_names, set(data_tasks), "the data module provides no training data")


def warn_untrained(task_names: Sequence[str], provided: set[str], reason: str) -> None:
    missing = [name for name in task_names if name not in provided]
    if missing:
        rank_zero_warn(f"task(s) {missing}: {reason} for them, so they are never trained")
