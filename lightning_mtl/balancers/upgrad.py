"""UPGrad: unconflicting projection of gradients (Quinton & Rey, 2024)."""

from __future__ import annotations

from torch import Tensor
from torchjd.aggregation import UPGradWeighting

from lightning_mtl.balancers._utils import unit_trace
from lightning_mtl.balancers.base import GramianBalancer


class UPGrad(GramianBalancer):
    """UPGrad, from `Jacobian Descent for Multi-Objective Optimization <https://arxiv.org/abs/2406.16232>`_
    (Quinton & Rey, 2024).

    Projects each task gradient onto the dual cone of all the task gradients (the directions that
    conflict with none) and averages the projections; each projection is a quadratic program on the
    Gramian. The result never conflicts with a task, and is invariant to the order of the tasks.
    Wraps ``torchjd.aggregation.UPGradWeighting`` (needs ``quadprog`` and ``qpsolvers``: ``torchjd``'s
    ``quadprog-projector`` extra). The weights do not depend on the gradients' scale: the Gramian is
    divided by its trace before torchjd sees it (torchjd would zero a Gramian of trace below 1e-4 and
    fall back to the mean). The solver works on that normalised, slightly regularised Gramian, so
    "never conflicts" holds to about 1e-3 of the largest squared gradient norm.
    """

    def __init__(self) -> None:
        super().__init__()
        self.weighting = UPGradWeighting()

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        return self.weighting(unit_trace(gramian))
