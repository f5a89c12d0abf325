"""DualProj: projection of the mean gradient onto the dual cone (Lopez-Paz & Ranzato, 2017)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_mtl.balancers._qp import host_gramian, project_dual_cone, project_pair, trace_normalised
from lightning_mtl.balancers.base import GramianBalancer


class DualProj(GramianBalancer):
    """DualProj: the projection of the mean gradient onto the dual cone of the task gradients, i.e. the
    closest direction to the mean that conflicts with no task; Eq. 11 of `Gradient Episodic Memory for
    Continual Learning <https://arxiv.org/abs/1706.08840>`_ (Lopez-Paz & Ranzato, NeurIPS 2017), named
    and studied as an aggregator in `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_.

    The projection of ``g_0 = Gᵀ a`` (``a = 1/K``) onto ``{d : G d ≥ 0}`` is, in GEM's dual form (its Section 3),
    ``d = Gᵀ (a + v)`` with ``v = argmin_{v ≥ 0} ½ (a + v)ᵀ Q (a + v)`` on the Gramian ``Q = G Gᵀ``; the weights
    are ``a + v``. Solved exactly in float64 on the host
    (:func:`~lightning_mtl.balancers._qp.project_dual_cone`), as for :class:`~lightning_mtl.balancers.UPGrad`:
    the direction conflicts with no task up to the rounding of the Gramian's entries, and the weights do not
    depend on the gradients' scale. They equal ``torchjd.aggregation.DualProjWeighting``'s wherever its
    ``1e-4`` regularisation does not matter.
    """

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        Q, precision = host_gramian(gramian)
        K = Q.shape[0]
        return torch.from_numpy(project_dual_cone(Q, np.full((1, K), 1.0 / K), precision)[0])

    def _pair_weights(self, a: float, b: float, c: float, dtype: torch.dtype) -> tuple[float, float]:
        return project_pair(*trace_normalised(a, b, c), 0.5, 0.5)
