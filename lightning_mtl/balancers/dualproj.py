"""DualProj: projection of the mean gradient onto the dual cone (Lopez-Paz & Ranzato, 2017)."""

from __future__ import annotations

from torch import Tensor
from torchjd.aggregation import DualProjWeighting

from lightning_mtl.balancers._utils import unit_trace
from lightning_mtl.balancers.base import GramianBalancer


class DualProj(GramianBalancer):
    """DualProj: the projection of the mean gradient onto the dual cone of the task gradients, i.e. the
    closest direction to the mean that conflicts with no task; Eq. 11 of `Gradient Episodic Memory for
    Continual Learning <https://arxiv.org/abs/1706.08840>`_ (Lopez-Paz & Ranzato, NeurIPS 2017), named
    and studied as an aggregator in `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_.

    A quadratic program on the Gramian. Wraps ``torchjd.aggregation.DualProjWeighting`` (needs
    ``quadprog`` and ``qpsolvers``); as for :class:`~lightning_mtl.balancers.UPGrad`, "conflicts with
    no task" holds to the solver's regularisation, about 1e-3 of the largest squared gradient norm,
    and the weights do not depend on the gradients' scale (the Gramian is divided by its trace first).
    """

    def __init__(self) -> None:
        super().__init__()
        self.weighting = DualProjWeighting()

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        return self.weighting(unit_trace(gramian))
