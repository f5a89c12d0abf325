"""IMTL-G: the gradient-balancing half of Impartial Multi-Task Learning (Liu et al., 2021)."""

from __future__ import annotations

from torch import Tensor
from torchjd.aggregation import IMTLGWeighting

from lightning_mtl.balancers.base import GramianBalancer


class IMTLG(GramianBalancer):
    """IMTL-G, from `Towards Impartial Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_
    (Liu et al., ICLR 2021).

    Chooses the combination ``d = Gᵀ w`` (weights summing to 1) whose projections on every task's
    unit gradient are equal, so that no task dominates the step: ``w ∝ (G Gᵀ)⁺ ‖g‖``. Wraps
    ``torchjd.aggregation.IMTLGWeighting`` (the pseudo-inverse form of `Jacobian Descent for
    Multi-Objective Optimization <https://arxiv.org/abs/2406.16232>`_, which also covers linearly
    dependent gradients). The loss-balancing half is :class:`~lightning_mtl.balancers.IMTLL`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.weighting = IMTLGWeighting()

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        return self.weighting(gramian)
