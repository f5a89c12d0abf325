"""UPGrad: unconflicting projection of gradients (Quinton & Rey, 2024)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_mtl.balancers._qp import host_gramian, project_dual_cone, project_pair, trace_normalised
from lightning_mtl.balancers.base import GramianBalancer


class UPGrad(GramianBalancer):
    """UPGrad, from `Jacobian Descent for Multi-Objective Optimization <https://arxiv.org/abs/2406.16232>`_
    (Quinton & Rey, 2024).

    Projects each task gradient ``g_i`` onto the dual cone ``{d : G d ≥ 0}`` of the task gradients (the
    directions that conflict with none) and averages the projections. Each projection is, in its dual form,
    the non-negative quadratic program ``w_i = e_i + v``, ``v = argmin_{v ≥ 0} ½ (e_i + v)ᵀ Q (e_i + v)`` on the
    Gramian ``Q = G Gᵀ`` (derived in the paper), and the weights are ``(1/K) Σ_i w_i``.

    Solved exactly here in float64 on the host (:func:`~lightning_mtl.balancers._qp.project_dual_cone`: an
    active-set method for all K projections at once, each answer checked against the KKT conditions), not
    by a regularised QP solver: the direction conflicts with no task, ``g_k · d ≥ 0`` up to the rounding of
    the Gramian's entries (about ``1e-14 ‖g_k‖ ‖d‖`` for a float64 Gramian), also for strongly opposed
    gradients. The weights do not depend on the gradients' scale (the Gramian is divided by its trace) and
    are invariant to the order of the tasks. They equal ``torchjd.aggregation.UPGradWeighting``'s wherever
    its ``1e-4`` regularisation does not matter.
    """

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        Q, precision = host_gramian(gramian)
        K = Q.shape[0]
        W = project_dual_cone(Q, np.eye(K), precision)
        return torch.from_numpy(W.sum(axis=0) / K)

    def _pair_weights(self, a: float, b: float, c: float, dtype: torch.dtype) -> tuple[float, float]:
        a, b, c = trace_normalised(a, b, c)
        (first, second), (third, fourth) = project_pair(a, b, c, 1.0, 0.0), project_pair(a, b, c, 0.0, 1.0)
        return (first + third) / 2, (second + fourth) / 2
