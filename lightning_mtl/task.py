"""The `Task` spec: one entry of a multi-task model's task registry."""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Union

from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

LossFn = Union[nn.Module, Callable[[Tensor, Tensor], Tensor]]
MetricsSpec = Union[Metric, MetricCollection, Mapping[str, Metric], None]

#: Characters a task name may not hold: ``/`` separates logged keys
#: (``{stage}/{task}/{metric}``) and ``.`` separates module paths in a ``state_dict``.
_FORBIDDEN_NAME_CHARACTERS = ("/", ".")


def snake_case(name: str) -> str:
    """``MulticlassAccuracy`` -> ``multiclass_accuracy``; the name a bare metric is logged under."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def validate_task_name(name: object, what: str = "task name") -> str:
    """Return ``name`` if it can be a task name, else raise a ``ValueError`` that says why."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    for character in _FORBIDDEN_NAME_CHARACTERS:
        if character in name:
            raise ValueError(
                f"{what} {name!r} contains {character!r}, which is not allowed: '/' separates logged keys "
                f"({{stage}}/{{task}}/{{metric}}) and '.' separates state_dict keys. "
                f"Rename the task, e.g. {name.replace('/', '_').replace('.', '_')!r}."
            )
    return name


class Task:
    """One task of a multi-task model: its head, loss, metrics and static weight.

    Args:
        name: unique task name; used in logged keys (``train/{name}/loss``), batch dicts and the
            ``state_dict``. It may not contain ``/`` or ``.``.
        head: module mapping the backbone output (or the backbone's entry for this task, when the
            backbone returns ``{task: tensor}``) to this task's prediction.
        loss: ``loss(prediction, target) -> scalar``; an ``nn.Module`` (moved with the model) or any
            callable. Its ``ignore_index`` (default ``-100``) marks unlabelled classification targets.
        metrics: a torchmetrics ``Metric`` (logged under its class name in snake_case), a
            ``MetricCollection`` (logged under its keys) or a dict ``{name: Metric}``.
        weight: static, non-negative weight of this task's loss (used by the default ``Static``
            balancer).
    """

    def __init__(
        self,
        name: str,
        head: nn.Module,
        loss: LossFn,
        metrics: MetricsSpec = None,
        weight: float = 1.0,
    ) -> None:
        self.name = validate_task_name(name)
        if not isinstance(head, nn.Module):
            raise TypeError(f"task {name!r}: head must be an nn.Module, got {type(head).__name__}")
        if isinstance(loss, type):
            raise TypeError(
                f"task {name!r}: loss is the class {loss.__name__}, not a loss; pass an instance, e.g. {loss.__name__}()"
            )
        if not callable(loss):
            raise TypeError(
                f"task {name!r}: loss must be callable as loss(prediction, target), got {type(loss).__name__} "
                f"{loss!r}; pass e.g. torch.nn.CrossEntropyLoss() or torch.nn.functional.mse_loss"
            )
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f"task {name!r}: weight must be a number, got {weight!r}")
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"task {name!r}: weight must be finite and >= 0, got {weight}")
        self.head = head
        self.loss = loss
        self.metrics = _metrics_as_dict(name, metrics)
        self.weight = weight

    @property
    def ignore_index(self) -> int:
        """Class target value that marks a missing label: the loss's ``ignore_index`` (an attribute, or a
        ``functools.partial`` keyword such as ``partial(F.cross_entropy, ignore_index=255)``), else -100."""
        if isinstance(self.loss, functools.partial):
            return int(self.loss.keywords.get("ignore_index", -100))
        return int(getattr(self.loss, "ignore_index", -100))

    def __repr__(self) -> str:
        return (
            f"Task(name={self.name!r}, head={type(self.head).__name__}, loss={getattr(self.loss, '__name__', self.loss)!r}, "
            f"metrics={list(self.metrics)}, weight={self.weight})"
        )


#: Log keys the module writes under ``{stage}/{task}/`` itself: a metric may not take these names.
RESERVED_METRIC_NAMES = ("loss", "weight")


def _metrics_as_dict(task: str, metrics: MetricsSpec) -> dict[str, Metric]:
    return {_metric_name(task, key): metric for key, metric in _named_metrics(task, metrics).items()}


def _metric_name(task: str, key: str) -> str:
    """``key`` checked as a log-key component that does not clash with the module's own keys."""
    validate_task_name(key, what=f"task {task!r}: metric name")
    if key in RESERVED_METRIC_NAMES:
        raise ValueError(
            f"task {task!r}: a metric named {key!r} would clash with the module's own '{{stage}}/{task}/{key}' "
            f"log key; rename it (reserved: {list(RESERVED_METRIC_NAMES)})"
        )
    return key


def _named_metrics(task: str, metrics: MetricsSpec) -> dict[str, Metric]:
    if metrics is None:
        return {}
    if isinstance(metrics, MetricCollection):
        return dict(metrics.items(keep_base=False, copy_state=False))
    if isinstance(metrics, Metric):
        return {snake_case(type(metrics).__name__): metrics}
    if isinstance(metrics, Mapping):
        out = {}
        for key, metric in metrics.items():
            if not isinstance(metric, Metric):
                raise TypeError(
                    f"task {task!r}: metric {key!r} must be a torchmetrics Metric, got {type(metric).__name__}"
                )
            out[key] = metric
        return out
    raise TypeError(
        f"task {task!r}: metrics must be a torchmetrics Metric, MetricCollection or dict of Metrics, "
        f"got {type(metrics).__name__}"
    )


def task_module_dict(modules: Mapping[str, nn.Module], what: str) -> nn.ModuleDict:
    """``nn.ModuleDict(modules)`` keyed by task (or metric) name, refusing names that collide with its attributes."""
    for name in modules:
        if hasattr(nn.ModuleDict, name):
            raise ValueError(f"{what}: the name {name!r} collides with an attribute of torch.nn.ModuleDict; rename it")
    return nn.ModuleDict(modules)
