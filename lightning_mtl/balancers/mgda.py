"""MGDA: multiple-gradient descent (Désidéri, 2012; Sener & Koltun, 2018)."""

from __future__ import annotations

from torch import Tensor
from torchjd.aggregation import MGDAWeighting

from lightning_mtl.balancers._utils import check_range
from lightning_mtl.balancers.base import GramianBalancer


class MGDA(GramianBalancer):
    """Multiple-gradient descent, from `Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization <https://doi.org/10.1016/j.crma.2012.03.014>`_ (Désidéri, 2012), as used for deep
    multi-task learning in `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_ (Sener & Koltun, NeurIPS 2018).

    The direction is the minimum-norm point of the convex hull of the task gradients,
    ``w = argmin_{w ∈ Δ} wᵀ (G Gᵀ) w``, found by the Frank–Wolfe solver of Sener & Koltun
    (Algorithm 2). It does not conflict with any task. Wraps ``torchjd.aggregation.MGDAWeighting``.

    Args:
        epsilon: Frank–Wolfe stops when its step size falls below this.
        max_iters: maximum number of Frank–Wolfe iterations.
    """

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__()
        check_range("epsilon", epsilon, 0.0, open_low=True)
        if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
            raise ValueError(f"max_iters must be a positive int, got {max_iters!r}")
        self.weighting = MGDAWeighting(epsilon=epsilon, max_iters=max_iters)

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        return self.weighting(gramian)
