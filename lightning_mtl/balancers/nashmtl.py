"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., 2022)."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_mtl.balancers._utils import check_range, host_float64
from lightning_mtl.balancers.base import GramianBalancer

#: Regularisation ``ε`` (relative to the normalised Gramian) of the fallback for Gramians with no solution.
FALLBACK_EPS = 1e-8
#: An iterate with an entry above this multiple of its task's single-task weight ``1/√M_kk`` is taken as running
#: off to infinity: no solution. Relative to each task's own scale: an absolute limit took a task whose gradient is
#: 1e-4 of the others' (single-task weight ~1e4 already) for "no solution", and the fallback's direction was off.
ALPHA_LIMIT = 1.0 / math.sqrt(FALLBACK_EPS)
#: Stop when ``‖M α − 1/α‖ ≤ TOLERANCE ‖1/α‖``.
TOLERANCE = 1e-13


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def relative_residual(gramian: np.ndarray, alpha: np.ndarray) -> float:
    """``‖(G Gᵀ) α − 1/α‖ / ‖1/α‖``: how far ``α`` is from solving the bargaining equation (scale free)."""
    inverse = 1.0 / alpha
    return float(np.linalg.norm(gramian @ alpha - inverse) / np.linalg.norm(inverse))


def _two_tasks(a: float, b: float, c: float, floor: float) -> Optional[tuple[float, float]]:
    """The solution for ``M = [[a, b], [b, c]]`` in closed form, or None where it does not exist or an entry
    would exceed ``1/√floor`` times its single-task value ``1/√M_kk``.

    ``a α₁² + b α₁α₂ = 1 = b α₁α₂ + c α₂²`` gives ``α₂ = α₁ √(a/c)``, then ``α₁ = 1/√(a + b √(a/c))``: a
    solution exists unless ``b = −√(ac)`` (opposite gradients). ``a + b √(a/c) = a (1 + cos θ)``, so the test is on
    the angle alone: with an absolute floor, a task whose gradient is 1e-5 of the other's (``a`` ~ 1e-10) was
    taken for "no solution" and the regularised fallback's direction was 35–39 % off.
    """
    first, second = a + b * math.sqrt(a / c), c + b * math.sqrt(c / a)
    if first <= floor * a or second <= floor * c:
        return None
    return 1.0 / math.sqrt(first), 1.0 / math.sqrt(second)


def nash_pair(a: float, b: float, c: float) -> tuple[float, float]:
    """:func:`nash_solution` for two tasks, ``M = [[a, b], [b, c]]`` (Frobenius norm 1), in Python floats: the closed
    form, or that of ``M + ε I`` where the equation has no solution."""
    solution = _two_tasks(a, b, c, FALLBACK_EPS)
    return solution if solution is not None else _two_tasks(a + FALLBACK_EPS, b, c + FALLBACK_EPS, 0.0)  # type: ignore[return-value]


def _objective(gramian: np.ndarray, alpha: np.ndarray) -> float:
    return 0.5 * float(alpha @ gramian @ alpha) - float(np.log(alpha).sum())


def _newton(gramian: np.ndarray, alpha: np.ndarray, iterations: int) -> tuple[np.ndarray, bool]:
    """Newton's method on ``f(α) = ½ αᵀ M α − Σ log α_i`` from ``alpha``; the last iterate and whether it converged.

    ``f`` is strictly convex and self-concordant (a convex quadratic plus a log barrier) and
    ``∇f = M α − 1/α``: its minimiser solves the bargaining equation. Where the Newton decrement
    ``λ² = −∇fᵀΔ`` is at most 1/16 the full step is taken (it converges quadratically there: Nesterov &
    Nemirovskii's analysis of self-concordant functions); else a backtracking (Armijo) line search from
    the largest step that keeps every ``α_i`` positive (99 % of the way to the boundary). Stops after a
    full step with ``λ² < 1e-16`` (the next one would be below ``1e-32``: the residual is at rounding), or
    early if an entry exceeds :data:`ALPHA_LIMIT` times its single-task value; after ``iterations`` steps, converged
    means a relative residual within :data:`TOLERANCE`.
    """
    sizes = np.sqrt(gramian.diagonal())  # 1 / each task's single-task weight (see ALPHA_LIMIT)
    for _ in range(iterations):
        inverse = 1.0 / alpha
        product = gramian @ alpha
        gradient = product - inverse
        step = np.linalg.solve(gramian + np.diag(inverse * inverse), gradient)  # minus the Newton step
        decrement = float(gradient @ step)
        if decrement <= 1.0 / 16.0:
            alpha = alpha - step
            if decrement < 1e-16:  # then the next decrement is below ~1e-32: converged to rounding
                return alpha, True
            continue
        growing = step > 0
        size = min(1.0, 0.99 * float(np.min(alpha[growing] / step[growing]))) if growing.any() else 1.0
        value = 0.5 * float(alpha @ product) - float(np.log(alpha).sum())
        while _objective(gramian, alpha - size * step) > value - 0.01 * size * decrement and size > 1e-12:
            size *= 0.5
        alpha = alpha - size * step
        if (alpha * sizes).max() > ALPHA_LIMIT:
            return alpha, False
    inverse = 1.0 / alpha
    return alpha, bool(np.linalg.norm(gramian @ alpha - inverse) <= TOLERANCE * np.linalg.norm(inverse))


def nash_solution(gramian: np.ndarray, start: Optional[np.ndarray], iterations: int) -> np.ndarray:
    """``α > 0`` with ``M α = 1/α`` for a K × K Gramian ``M`` of Frobenius norm 1 (no zero diagonal).

    From ``1/√diag(M)`` or ``start`` (a previous solution), whichever has the lower ``f`` once scaled along
    its ray to the minimiser of ``f`` on it (``s = √(K / αᵀMα)``), then :func:`_newton`; K ≤ 2 in closed form. Where the equation has
    no solution (``0`` in the convex hull of the gradients: the iterates run off to infinity), the solution
    for ``M + ε I`` with ``ε = FALLBACK_EPS``.
    """
    k = gramian.shape[0]
    if k == 1:
        return np.array([1.0 / math.sqrt(gramian[0, 0])])
    if k == 2:
        (a, b), (_, c) = gramian.tolist()
        return np.array(nash_pair(a, b, c))
    sizes = np.sqrt(gramian.diagonal())  # 1 / each task's single-task weight (see ALPHA_LIMIT)
    alpha, best = 1.0 / sizes, math.inf
    for candidate in (alpha,) if start is None else (alpha, start):
        curvature = float(candidate @ gramian @ candidate)
        if curvature > 0:  # f at the minimiser on the ray: ½K − ½K log(K / curvature) − Σ log candidate
            scale = math.sqrt(k / curvature)
            value = 0.5 * k - k * math.log(scale) - float(np.log(candidate).sum())
            if value < best:
                alpha, best = candidate * scale, value
    solution, converged = _newton(gramian, alpha, iterations)
    if converged or (solution * sizes).max() <= ALPHA_LIMIT:
        return solution
    regularised = gramian + FALLBACK_EPS * np.eye(k)
    return _newton(regularised, np.minimum(solution, ALPHA_LIMIT / sizes), iterations)[0]


class NashMTL(GramianBalancer):
    """Nash-MTL, from `Multi-Task Learning as a Bargaining Game <https://arxiv.org/abs/2202.01017>`_
    (Navon et al., ICML 2022), Algorithm 1.

    The update is the Nash bargaining solution between tasks: ``d = Gᵀ α`` with ``α > 0`` solving
    ``(G Gᵀ) α = 1/α`` (elementwise), then clipped to norm ``max_norm``. At the solution every task
    improves (``g_iᵀ d = 1/α_i > 0``) and ``‖d‖² = αᵀ G Gᵀ α = K``.

    Solved natively, in float64 on the host, to machine precision (relative residual
    ``‖G Gᵀ α − 1/α‖ / ‖1/α‖ ≤ 1e-13``): ``α`` minimises the strictly convex ``½ αᵀ G Gᵀ α − Σ log α_i``,
    found by Newton's method with a positivity-preserving line search (:func:`nash_solution`), K = 2 in
    closed form. The problem is solved for ``M = G Gᵀ / N``, ``N = ‖G Gᵀ‖_F``, whose solution ``α̂``
    does not depend on the gradients' scale, and rescaled: ``(G Gᵀ)(α̂/√N) = √N M α̂ = 1/(α̂/√N)``, so
    ``α = α̂ / √N``, which scales as ``1/‖g‖``: the direction is the same at every scale and its norm is
    ``√K`` before clipping. (The official code and torchjd's ``NashMTL`` solve the same equation,
    normalised the same way, by a sequence of cvxpy programs stopped at a residual of 1e-3 or after
    ``optim_niter`` programs: relative residuals of 1e-9 to 1e-5 on ordinary Gramians, and no solution
    at all, residual 0.1 to 1, for gradient norms of 1e-6 or 1e6, where ours keeps 1e-13.) The
    previous solution ``α̂`` warm-starts the next solve.

    Degenerate Gramians: a zero row (an absent task) is left out by :meth:`GramianBalancer.weights`.
    Linearly dependent gradients (duplicates, K above the rank) still have a solution, found as above,
    unless ``0`` lies in the convex hull of the gradients (e.g. two exactly opposite gradients: a
    Pareto-stationary point, where no direction improves every task): then the objective is unbounded
    below and the equation has no solution. Newton detects it when an entry of ``α̂`` exceeds
    ``1e4`` (:data:`ALPHA_LIMIT`) times its single-task value ``1/√M_kk`` and returns instead the solution for
    ``M + 1e-8 I``
    (:data:`FALLBACK_EPS`): finite weights, large (up to about ``1e4 / √N``) on the tasks whose
    gradients cancel, so that their combination nearly vanishes, and a direction close to the limit
    ``ε → 0`` (which improves the other tasks and leaves those to first order unchanged).

    A single task gets ``α = 1/‖g‖``: its unit gradient, clipped to ``max_norm``. A step with absent
    tasks is solved on the present tasks only, without warm start, and leaves the state unchanged.
    State (extra state): the warm start ``α̂``, the call count that schedules ``update_weights_every``
    (``solver_step``) and the weights reused between solves; a checkpoint written by the former
    cvxpy-based version (no stored weights) re-solves at its first call.

    Args:
        max_norm: clip ``‖d‖`` to this (0 disables).
        update_weights_every: solve every this many steps, reuse ``α`` in between.
        optim_niter: the most Newton iterations per solve (and as many again for the fallback); a solve
            takes 3–9 (K ≤ 40, from scratch), fewer from a warm start. It was the number of cvxpy programs.
    """

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20) -> None:
        super().__init__()
        self.max_norm = check_range("max_norm", max_norm, 0.0)
        self.update_weights_every = _positive_int("update_weights_every", update_weights_every)
        self.optim_niter = _positive_int("optim_niter", optim_niter)
        self.reset()

    def _solve(self, gramian: np.ndarray, start: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``(α, α̂)`` for the Gramian: the weights and the normalised solution."""
        scale = float(np.linalg.norm(gramian))
        normalised = nash_solution(gramian / scale, start, self.optim_niter)
        return normalised / math.sqrt(scale), normalised

    def _clip(self, gramian: np.ndarray, alpha: np.ndarray) -> Tensor:
        """``alpha`` (a copy) scaled so that ``‖Gᵀ alpha‖ ≤ max_norm``."""
        factor = 1.0
        if self.max_norm > 0:
            norm = math.sqrt(max(float(alpha @ gramian @ alpha), 0.0))
            if norm > self.max_norm:
                factor = self.max_norm / norm
        return torch.from_numpy(alpha * factor)

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        matrix = host_float64(gramian)
        k = matrix.shape[0]
        if k != present.numel():  # some tasks absent: solved alone, the state left as it is
            return self._clip(matrix, self._solve(matrix, None)[0])
        if self._solve_due(k):
            start = self._warm_start if self._warm_start is not None and self._warm_start.size == k else None
            self._alpha, self._warm_start = self._solve(matrix, start)
        return self._clip(matrix, self._alpha)

    def _solve_due(self, k: int) -> bool:
        """Whether this call (counted) solves for K tasks: every ``update_weights_every`` calls, or without weights for K."""
        due = self._solver_step % self.update_weights_every == 0
        self._solver_step += 1.0
        return due or self._alpha is None or self._alpha.size != k

    def _pair_weights(self, a: float, b: float, c: float, dtype: torch.dtype) -> tuple[float, float]:
        if self._solve_due(2):  # K = 2 needs no warm start
            scale = math.hypot(a, b, b, c)  # ‖G Gᵀ‖_F, without the squares' overflow or underflow
            first, second = nash_pair(a / scale, b / scale, c / scale)
            root = math.sqrt(scale)
            self._warm_start = np.array([first, second])
            self._alpha = np.array([first / root, second / root])
        first, second = self._alpha.tolist()
        factor = 1.0
        if self.max_norm > 0:
            norm = math.sqrt(max(first * (first * a + second * b) + second * (first * b + second * c), 0.0))
            if norm > self.max_norm:
                factor = self.max_norm / norm
        return first * factor, second * factor

    def reset(self) -> None:
        self._warm_start: Optional[np.ndarray] = None  # α̂ of the last solve (normalised Gramian)
        self._alpha: Optional[np.ndarray] = None  # the weights of the last solve, reused until the next
        self._solver_step = 0.0  # calls so far (when to re-solve)

    def get_extra_state(self) -> dict[str, Any]:
        return {"warm_start": _tensor(self._warm_start), "solver_step": self._solver_step, "weights": _tensor(self._alpha)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._warm_start = _array(state["warm_start"])
        if self._warm_start is not None and not (np.isfinite(self._warm_start).all() and (self._warm_start > 0).all()):
            self._warm_start = None
        self._solver_step = float(state.get("solver_step", 0.0))  # absent from checkpoints written before it
        self._alpha = _array(state.get("weights"))  # absent from the cvxpy version's: solve at the next call


def _tensor(array: Optional[np.ndarray]) -> Optional[Tensor]:
    return None if array is None else torch.from_numpy(array.copy())


def _array(tensor: Optional[Tensor]) -> Optional[np.ndarray]:
    return None if tensor is None else tensor.detach().cpu().numpy().astype(np.float64)
