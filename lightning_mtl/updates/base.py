"""The interface of a balancing path: how one training step's task losses become the update Lightning applies."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from torch import Tensor, nn

from lightning_mtl.balancers import Balancer
from lightning_mtl.gradients import TaskJacobian
from lightning_mtl.nonfinite import NonfiniteCheck
from lightning_mtl.step import StepContext

#: ``() -> (backbone parameters, all parameters)`` of the module, gathered once per fit.
ParameterLists = Callable[[], tuple[tuple[nn.Parameter, ...], tuple[nn.Parameter, ...]]]


@dataclass
class Tap:
    """What a path asks of the step's forward, and what the forward gave it.

    ``captured`` (parameter mode): the heads read detached leaves, recorded here as
    ``{task: (backbone output, leaf)}``. ``balance`` (representation mode): each head reads its own view
    of the backbone output, and the backward calls ``balance`` with the task cotangents' Jacobian. ``sources``:
    what the heads read (the backbone outputs, or their views), filled in by the forward.
    """

    captured: Optional[dict[str, tuple[Tensor, Tensor]]] = None
    balance: Optional[Callable[[TaskJacobian], list[Tensor]]] = None
    sources: list[Any] = field(default_factory=list)
    #: representation mode in one process: the loss, checked by the backward with the Gramian
    deferred_total: Optional[Tensor] = None


class BalancingPath:
    """One way of getting a step's update from its task losses; ``MultiTaskModule`` calls it once per step.

    :meth:`tap` says what the forward must provide (before the forward), :meth:`combine` returns the
    scalar that Lightning back-propagates (its value ``Σ_k L_k`` or the balancer's loss; its gradient the
    balanced update) and fills the step record's weights and Gramian, or returns None when the step is
    skipped (``nonfinite_loss="skip"``). Paths whose weights come in the backward set
    :attr:`weights_after_backward`: the module then logs the step after the backward.
    """

    #: Whether the weights are known only after Lightning's backward (representation mode).
    weights_after_backward: ClassVar[bool] = False

    def __init__(
        self,
        balancer: Balancer,
        task_names: Sequence[str],
        nonfinite: NonfiniteCheck,
        parameter_lists: ParameterLists,
    ) -> None:
        self.balancer = balancer
        self.task_names = list(task_names)
        self.nonfinite = nonfinite
        self.parameter_lists = parameter_lists

    def tap(self, context: StepContext) -> Tap:
        """What the step's forward must provide (nothing by default: the heads read the backbone output)."""
        return Tap()

    def end_step(self) -> None:
        """Release what :meth:`tap` set up but :meth:`combine` did not use: called after every training step,
        also one that ended before :meth:`combine` (no labelled sample in one process, an error in a loss)."""

    def combine(
        self, tap: Tap, losses: Tensor, present: Tensor, context: StepContext, empty: bool = False
    ) -> Optional[Tensor]:  # pragma: no cover - interface
        """The loss to back-propagate for ``losses`` (float32, one per task, ``present`` marking the tasks with
        labels on this process; ``empty``: none has), or None to skip the step."""
        raise NotImplementedError
