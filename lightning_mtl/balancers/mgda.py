"""MGDA: multiple-gradient descent (Désidéri, 2012; Sener & Koltun, 2018)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from lightning_mtl.balancers._qp import host_gramian, min_norm_pair, min_norm_point, trace_normalised
from lightning_mtl.balancers._utils import check_range
from lightning_mtl.balancers.base import GramianBalancer


class MGDA(GramianBalancer):
    """Multiple-gradient descent, from `Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization <https://doi.org/10.1016/j.crma.2012.03.014>`_ (Désidéri, 2012), as used for deep
    multi-task learning in `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_ (Sener & Koltun, NeurIPS 2018).

    The direction is the minimum-norm point of the convex hull of the task gradients,
    ``w = argmin_{w ∈ Δ} wᵀ (G Gᵀ) w``. It does not conflict with any task: ``g_k · d ≥ ‖d‖²``.

    Solved exactly in float64 on the host (:func:`~lightning_mtl.balancers._qp.min_norm_point`): two tasks
    in closed form (Sener & Koltun's Algorithm 1), more by an active-set method on the equivalent
    non-negative QP, whose answer is checked against the KKT conditions. Sener & Koltun's Frank–Wolfe solver
    (their Algorithm 2, torchjd's ``MGDAWeighting``) stops at a step size and leaves a gap to the optimum;
    this solution is the optimum, to rounding. The weights do not depend on the gradients' scale, and are
    invariant to the order of the tasks where the optimum is unique.

    Args:
        epsilon: Frank–Wolfe's step-size threshold in earlier releases; the exact solver has no use for it.
            Still accepted (a config from an earlier release runs); a value other than the default warns
            (``DeprecationWarning``) that it is ignored.
        max_iters: a cap on the active-set iterations, i.e. linear solves on the current support (per phase:
            the primal–dual steps, then Lawson–Hanson for a degenerate Gramian). The exact solution takes 2–6
            for most Gramians and about the number of tasks at most; if the cap is reached, the weights are
            those of the last iterate (on the simplex, not optimal) and a ``RuntimeWarning`` says so.
    """

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__()
        self.epsilon = check_range("epsilon", epsilon, 0.0, open_low=True)
        if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
            raise ValueError(f"max_iters must be a positive int, got {max_iters!r}")
        self.max_iters = max_iters
        if self.epsilon != 0.001:
            warnings.warn(
                "MGDA(epsilon=...) is ignored: the min-norm problem is now solved exactly, without Frank–Wolfe "
                "steps; remove the argument",
                DeprecationWarning,
                stacklevel=2,
            )

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        Q, precision = host_gramian(gramian)
        weights, solved = min_norm_point(Q, self.max_iters, precision)
        if not solved:
            warnings.warn(
                f"MGDA: the active-set solver reached max_iters={self.max_iters} before the optimum; the weights "
                "are its last iterate. Raise max_iters.",
                RuntimeWarning,
                stacklevel=2,
            )
        return torch.from_numpy(weights)

    def _pair_weights(self, a: float, b: float, c: float, dtype: torch.dtype) -> tuple[float, float]:
        return min_norm_pair(*trace_normalised(a, b, c))
