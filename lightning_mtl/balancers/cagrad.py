"""CAGrad: conflict-averse gradient descent (Liu et al., 2021)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lightning_mtl.balancers._cagrad_dual import cagrad_dual, cagrad_pair
from lightning_mtl.balancers._qp import host_gramian, trace_normalised
from lightning_mtl.balancers._utils import check_range
from lightning_mtl.balancers.base import GramianBalancer


class CAGrad(GramianBalancer):
    """Conflict-averse gradient descent, from `Conflict-Averse Gradient Descent for Multi-task Learning
    <https://arxiv.org/abs/2110.14048>`_ (Liu et al., NeurIPS 2021), Algorithm 1.

    Maximises the worst task's improvement within a ball of radius ``c ‖g₀‖`` around the average
    gradient ``g₀``; the solution is ``g₀ + (c‖g₀‖ / ‖G_w‖) G_w`` with ``G_w = Gᵀ w`` and ``w`` solving the dual
    ``min_{w ∈ Δ} G_wᵀ g₀ + c ‖g₀‖ ‖G_w‖`` on the Gramian; as a weighting, ``1/K + (c‖g₀‖ / ‖G_w‖) w``.

    The dual is solved exactly in float64 on the host, without cvxpy
    (:func:`~lightning_mtl.balancers._cagrad_dual.cagrad_dual`: the solution path of a parametric QP followed from
    MGDA's point, with the last piece solved in closed form). The weights equal those of
    ``torchjd.aggregation.CAGradWeighting`` (cvxpy's CLARABEL) to that solver's precision, and do not depend
    on the gradients' scale: the Gramian is divided by its trace.

    Args:
        c: the radius scale ``c ≥ 0`` (0 gives the mean gradient); default 0.4, the value used with
            the official code on NYUv2.
        norm_eps: relative threshold: when ``‖Gᵀ w‖ < norm_eps ‖G‖_F`` (``w`` the problem's solution)
            the gradients are taken to be on the Pareto front and the weights are 0.
    """

    def __init__(self, c: float = 0.4, norm_eps: float = 0.0001) -> None:
        super().__init__()
        self.c = check_range("c", c, 0.0)
        self.norm_eps = check_range("norm_eps", norm_eps, 0.0)

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        Q, _ = host_gramian(gramian)
        K = Q.shape[0]
        a = np.full(K, 1.0 / K)
        phi = self.c * math.sqrt(max(a @ Q @ a, 0.0))  # c ‖g₀‖
        w, s = cagrad_dual(Q, a, phi)
        if phi == 0.0:  # the mean, unless the problem's solution G_w is (nearly) zero
            norm = math.sqrt(max(w @ Q @ w, 0.0))
            return torch.from_numpy(a if norm >= self.norm_eps else np.zeros(K))
        if s == 0.0 or phi * s < self.norm_eps:  # ‖G_w‖ = φ s (0: G_w = 0 even with norm_eps = 0)
            return torch.zeros(K, dtype=torch.float64)
        return torch.from_numpy(a + w / s)

    def _pair_weights(self, a: float, b: float, c: float, dtype: torch.dtype) -> tuple[float, float]:
        a, b, c = trace_normalised(a, b, c)
        q_first, q_second = 0.5 * (a + b), 0.5 * (b + c)  # Q (½, ½)
        phi = self.c * math.sqrt(max(0.5 * (q_first + q_second), 0.0))
        if phi == 0.0:  # the vertex argmin q (the first at a tie), kept unless its gradient is (nearly) zero
            norm = math.sqrt(a if q_first <= q_second else c)
            return (0.5, 0.5) if norm >= self.norm_eps else (0.0, 0.0)
        first, s = cagrad_pair(a, b, c, q_first, q_second, phi)
        if s == 0.0 or phi * s < self.norm_eps:
            return 0.0, 0.0
        return 0.5 + first / s, 0.5 + (1.0 - first) / s
