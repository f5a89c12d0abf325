"""What multi-task architectures share: a task list, task-specific parameters, parameter counts.

Hard sharing needs no class: any backbone returning one tensor, given to
``MultiTaskModule(backbone, tasks)``, *is* hard parameter sharing (Caruana, 1997, "Multitask
Learning"): every backbone parameter is shared and each head is its task's own.
:func:`parameter_counts` reports that split for any backbone, and for the architectures here
(subclasses of :class:`MultiTaskBackbone`, which return ``{task: tensor}``) it also counts their
task-specific parts (gates, towers, columns, attention modules) per task.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_mtl.task import validate_task_name


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is a positive int, else a ``ValueError`` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return value


def check_widths(name: str, widths: Sequence[int]) -> tuple[int, ...]:
    """A (possibly empty) sequence of positive ints, as a tuple."""
    if isinstance(widths, str) or not isinstance(widths, Sequence):
        raise ValueError(f"`{name}` must be a sequence of positive ints, got {widths!r}.")
    for width in widths:
        if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
            raise ValueError(f"`{name}` must hold positive ints only, got {list(widths)!r}.")
    return tuple(widths)


def check_task_list(tasks: Sequence[str], owner: str) -> tuple[str, ...]:
    """A non-empty tuple of unique, valid task names."""
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise ValueError(f"{owner}: `tasks` must be a sequence of task names, got {tasks!r}.")
    names = tuple(validate_task_name(name, what=f"{owner}: task name") for name in tasks)
    if not names:
        raise ValueError(f"{owner}: `tasks` is empty; name at least one task.")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{owner}: `tasks` has duplicate name(s) {duplicates}.")
    return names


def flatten_input(x: Tensor) -> Tensor:
    """``(batch, ...)`` -> ``(batch, features)``: expert/gate networks act on flat inputs."""
    return x.reshape(x.shape[0], -1) if x.ndim != 2 else x


def expert_network(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Sequential:
    """``(Linear -> ReLU)`` for every width of ``hidden`` and for ``out_features``.

    The expert of Ma et al. (2018): "identical multilayer perceptrons with ReLU activations"; the
    output is activated too, as a shared bottom's features are.
    """
    layers: list[nn.Module] = []
    previous = in_features
    for width in (*hidden, out_features):
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    return nn.Sequential(*layers)


class MultiTaskBackbone(nn.Module):
    """Base of the architectures that return ``{task: tensor}``, one input per task head.

    Subclasses store their task-specific modules and implement :meth:`task_parameters`; all other
    parameters are shared. The task list is fixed when the architecture is built and must match the
    ``MultiTaskModule``'s tasks: a task the architecture lacks makes the module raise a ``KeyError``
    naming it at the first forward, and :meth:`check_tasks` (called by :func:`parameter_counts` and
    by the callbacks of :mod:`lightning_mtl.callbacks`) also rejects tasks the module lacks.

    Attributes:
        tasks: the task names, in order.
    """

    tasks: tuple[str, ...]

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = check_task_list(tasks, type(self).__name__)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The parameters that belong to ``task`` (its gate, tower, column, attention modules...)."""
        self._check_task(task)
        yield from self.task_modules()[task].parameters()

    def task_modules(self) -> Mapping[str, nn.Module]:
        """``{task: module holding that task's parameters}``; subclasses override this."""
        raise NotImplementedError

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters that belong to no single task."""
        owned = {id(p) for task in self.tasks for p in self.task_parameters(task)}
        return (p for p in self.parameters() if id(p) not in owned)

    def check_tasks(self, task_names: Sequence[str]) -> None:
        """Raise a ``ValueError`` unless ``task_names`` (e.g. a module's tasks) equal this architecture's."""
        missing = [name for name in task_names if name not in self.tasks]
        extra = [name for name in self.tasks if name not in task_names]
        if missing or extra:
            problems = []
            if missing:
                problems.append(f"it has no output for task(s) {missing}")
            if extra:
                problems.append(
                    f"its task(s) {extra} have no head, so their parameters would never be trained"
                )
            raise ValueError(
                f"{type(self).__name__} was built for tasks {list(self.tasks)} but the model's tasks are "
                f"{list(task_names)}: {'; '.join(problems)}. Give the architecture the model's task names."
            )

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"{type(self).__name__} has no task {task!r}; its tasks are {list(self.tasks)}.")


def parameter_counts(module: Any, trainable_only: bool = False) -> dict[str, int]:
    """Number of parameters that are shared and that belong to each task, for a ``MultiTaskModule``.

    ``"shared"``: backbone parameters used by all tasks (for a plain backbone, i.e. hard sharing, all
    of them). Each task: its head plus, for a :class:`MultiTaskBackbone`, what
    :meth:`~MultiTaskBackbone.task_parameters` yields (gates, towers, columns, attention modules).
    Parameters reachable twice (tied weights) count once. The values add up to the number of distinct
    parameters of backbone and heads (a balancer's own parameters, if any, are not counted).
    ``trainable_only=True`` counts only the parameters that require gradients, with the same split.
    """
    backbone, heads, task_names = module.backbone, module.heads, list(module.task_names)
    if "shared" in task_names:
        raise ValueError(
            "parameter_counts: a task is named 'shared', which collides with the key of the shared count; "
            "rename the task."
        )
    owned: dict[str, dict[int, nn.Parameter]] = {name: {} for name in task_names}
    if isinstance(backbone, MultiTaskBackbone):
        backbone.check_tasks(task_names)
        for name in task_names:
            owned[name].update((id(p), p) for p in backbone.task_parameters(name))
    for name in task_names:
        owned[name].update((id(p), p) for p in heads[name].parameters())

    def size(p: nn.Parameter) -> int:
        return p.numel() if p.requires_grad or not trainable_only else 0

    seen: set[int] = set()
    counts: dict[str, int] = {}
    for name in task_names:
        counts[name] = sum(size(p) for key, p in owned[name].items() if key not in seen)
        seen.update(owned[name])
    counts["shared"] = sum(size(p) for p in backbone.parameters() if id(p) not in seen)
    return {"shared": counts.pop("shared"), **counts}
