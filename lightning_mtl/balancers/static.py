"""Static weighting: the plain weighted sum of task losses."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from lightning_mtl.balancers.base import Balancer


class Static(Balancer):
    """``L = Σ_k w_k L_k`` with each ``w_k`` the task's fixed ``Task.weight`` (the usual MTL baseline).

    Tasks without data in a step contribute nothing; the weights are not renormalised over the
    present tasks, so a task's effective learning rate does not depend on which others share the step.
    """

    supports_one_task_per_step: ClassVar[bool] = True  # the task's own weight, whoever shares the step

    def forward(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        weights = (self.task_weights * present).to(losses.dtype)
        return weights @ losses, weights
