"""CAGrad: conflict-averse gradient descent (Liu et al., 2021)."""

from __future__ import annotations

from torch import Tensor

from lightning_mtl.balancers._utils import check_range, require_modules, unit_trace
from lightning_mtl.balancers.base import GramianBalancer


class CAGrad(GramianBalancer):
    """Conflict-averse gradient descent, from `Conflict-Averse Gradient Descent for Multi-task Learning
    <https://arxiv.org/abs/2110.14048>`_ (Liu et al., NeurIPS 2021), Algorithm 1.

    Maximises the worst task's improvement within a ball of radius ``c ‖g₀‖`` around the average
    gradient ``g₀``; the solution is ``g₀ + (c‖g₀‖ / ‖G_w‖) G_w`` with ``G_w = Gᵀ w`` and ``w`` solving
    a small convex problem on the Gramian. Wraps ``torchjd.aggregation.CAGradWeighting``, which
    solves it with cvxpy: building this class without cvxpy raises ``ImportError`` (install
    ``lightning-mtl[solvers]``). The weights do not depend on the gradients' scale: the Gramian is
    divided by its trace before torchjd sees it (torchjd would zero a Gramian of trace below
    ``norm_eps`` and return zero weights).

    Args:
        c: the radius scale ``c ≥ 0`` (0 gives the mean gradient); default 0.4, the value used with
            the official code on NYUv2.
        norm_eps: relative threshold: when ``‖Gᵀ w‖ < norm_eps ‖G‖_F`` (``w`` the problem's solution)
            the gradients are taken to be on the Pareto front and the weights are 0.
    """

    def __init__(self, c: float = 0.4, norm_eps: float = 0.0001) -> None:
        super().__init__()
        check_range("c", c, 0.0)
        check_range("norm_eps", norm_eps, 0.0)
        require_modules("CAGrad", ["cvxpy", "clarabel"])
        from torchjd.aggregation import CAGradWeighting

        self.weighting = CAGradWeighting(c=c, norm_eps=norm_eps)

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        return self.weighting(unit_trace(gramian))
