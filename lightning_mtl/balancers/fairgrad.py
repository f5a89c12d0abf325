"""FairGrad: fair resource allocation in multi-task learning (Ban & Ji, 2024)."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from lightning_mtl.balancers._utils import check_range, rank_tolerance
from lightning_mtl.balancers.base import GramianBalancer

#: A weight above this multiple of its task's single-task weight ``A_kk^{−α/(1+α)}`` means the equation has no solution
#: (see FairGrad's docstring). Relative to the task's own scale: a task whose gradient is 1e-4 of the others' has a
#: single-task weight of 1e8^{α/(1+α)} already (normalised), which an absolute cap took for "no solution".
_CAP = 1e6
#: The smallest ridge (relative to the unit mean diagonal): a smaller one is lost in the rounding of ``A + ridge·I``.
_MIN_RIDGE = 1e-12
_MAX_ITERS = 100
#: Converged once the residual stops halving after a step whose squared Newton decrement ``λ² = ∇fᵀ H⁻¹ ∇f`` was
#: below this (Newton's convergence is quadratic there: the residual is at its rounding level). On an
#: ill-conditioned Gramian (weights ~1e3 normalised) that level is ~1e-9 relative, above the plain residual
#: test's 1e-10; without this rule the solve ran its 100 iterations and restarted on the ridge (another answer).
_DECREMENT = 1e-16


def solve_fairgrad(gramian: np.ndarray, alpha: float, ridge: float = 0.0) -> Optional[np.ndarray]:
    """The positive ``w`` with ``(A + ridge·I) w = w^{-1/α}`` for a K × K Gramian ``A`` whose diagonal
    mean is 1, by Newton's method on the strictly convex ``f(w) = ½ wᵀ(A + ridge·I)w − Σ_k φ(w_k)``,
    ``φ' = w^{-1/α}``, with a fraction-to-the-boundary step that keeps ``w`` positive and an Armijo
    backtracking line search. Without a ridge, returns None when the iterates grow past ``_CAP`` times their
    single-task weights or do not converge in ``_MAX_ITERS`` iterations (no solution). Two tasks: the same iterations in Python floats
    (:func:`newton_pair`), unless a float operation there would overflow or divide by zero."""
    k = gramian.shape[0]
    A = gramian + ridge * np.eye(k) if ridge else gramian
    power = -1.0 / alpha
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # a rejected trial point may overflow
        if k == 2:
            (a, b), (_, c) = A.tolist()
            try:
                pair = newton_pair(a, b, c, alpha, ridge)
                return None if pair is None else np.array(pair)
            except (OverflowError, ValueError, ZeroDivisionError):  # Python floats raise where NumPy gives inf
                pass
        return _newton(A, _start(A, alpha, power), power, ridge)


def _start(A: np.ndarray, alpha: float, power: float) -> np.ndarray:
    """The first iterate: of the minimisers of ``f`` on the rays through ``1`` and through ``diag(A)^(−½)``, the one
    with the lower ``f``. On the ray ``s·v``, ``f' = 0`` at ``s = (Σ_k v_k^{1+power} / vᵀAv)^{α/(1+α)}``.

    The ray through 1 is the plain sum's; where the task gradients nearly cancel (``1ᵀA1`` ≈ 0) its minimiser is far
    out, as the solution is, and Newton needs a few steps from there instead of one doubling per step from 1.
    """
    best, best_value = np.diag(A) ** (-alpha / (alpha + 1.0)), math.inf
    for ray in (np.ones_like(best), best):
        curvature = float(ray @ A @ ray)
        if not curvature > 0.0:
            continue
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            candidate = ray * (_barrier_slope(ray, power) / curvature) ** (alpha / (alpha + 1.0))
            value = 0.5 * float(candidate @ A @ candidate) - _barrier(candidate, power)
        if math.isfinite(value) and value < best_value and bool(np.all(candidate > 0.0)):
            best, best_value = candidate, value
    return best


def _barrier_slope(v: np.ndarray, power: float) -> float:
    """``Σ_k v_k^{1+power}``: ``d/ds Σ_k φ(s v_k)`` at ``s = 1``."""
    return float(np.sum(v ** (1.0 + power)))


def _weight_floor(power: float) -> float:
    """The smallest weight a geometric step (α > 1, see :func:`_newton`) may reach: the Hessian's ``w^(power−1)``
    stays below 1e250 above it."""
    return 10.0 ** (-250.0 / (1.0 - power))


def _barrier(w: np.ndarray, power: float) -> float:
    """``Σ_k φ(w_k)``: ``Σ log w_k`` for ``power = −1`` (α = 1), else ``Σ w_k^{1+power} / (1 + power)``."""
    if power == -1.0:
        return sum(np.log(w).tolist())  # a Python sum: cheaper than ndarray.sum at these sizes
    return sum((w ** (1.0 + power)).tolist()) / (1.0 + power)


def _newton(A: np.ndarray, w: np.ndarray, power: float, ridge: float) -> Optional[np.ndarray]:
    """:func:`solve_fairgrad`'s iterations from ``w``, with few NumPy calls (the vectors are short: a call's
    overhead, not its arithmetic, is the cost)."""
    curvature = -power * np.eye(w.size)  # the barrier's Hessian is diag(−power · w^power / w)
    sizes = np.diag(A) ** (1.0 / (1.0 - power))  # 1 / each task's single-task weight (see _CAP)
    # For α > 1 the barrier φ(w) = w^{1−1/α} / (1 − 1/α) is finite at w = 0 and a solution can have weights of
    # 1e-200 (nearly opposed tasks at α ~ 100). A linear step kept positive by the fraction-to-the-boundary rule
    # shrinks a weight at most 100-fold per iteration: Newton ran out of iterations, and the ridge's unconverged
    # iterate came back (directions up to 96 % off). There a weight the full linear step would take below 0 moves
    # along w · exp(t · step / w) instead: the same first-order step, always positive, any shrink at once, down to
    # _weight_floor. For α ≤ 1, f → ∞ at the boundary and the fraction-to-the-boundary rule is kept.
    geometric, floor = power > -1.0, _weight_floor(power)
    Aw = A @ w
    value = 0.5 * float(w @ Aw) - _barrier(w, power)
    previous = decrement = math.inf
    for _ in range(_MAX_ITERS):
        rhs = w**power
        residual = Aw - rhs
        largest = max(rhs.tolist())
        error = max(map(abs, residual.tolist())) / largest if largest > 0.0 else math.inf
        if error <= 1e-14 or (error > 0.5 * previous and (error <= 1e-10 or decrement < _DECREMENT)):  # at rounding
            return w
        previous = error
        try:
            step = np.linalg.solve(A + curvature * (rhs / w), -residual)
        except np.linalg.LinAlgError:  # singular to rounding: weights so large that their barrier term vanishes
            return _unconverged(w, power) if ridge else None
        if geometric:
            rate = step / w
            shrinking = rate < -1.0
            t = 1.0
        else:
            bounds = [-x / d for x, d in zip(w.tolist(), step.tolist()) if d < 0.0]
            t = min(1.0, 0.99 * min(bounds)) if bounds else 1.0
        slope = float(residual @ step)  # minus the squared Newton decrement
        decrement = -slope
        while True:
            if geometric:
                candidate = np.where(shrinking, np.maximum(w * np.exp(t * rate), floor), w + t * step)
            else:
                candidate = w + t * step
            A_candidate = A @ candidate
            new_value = 0.5 * float(candidate @ A_candidate) - _barrier(candidate, power)
            # near the solution f's decrease is below its rounding: the (quadratically convergent) step is taken
            # f stays finite at w_k = 0 when α > 1 (φ(0) = 0): a weight that underflowed to 0 is refused
            accept = new_value <= value + 1e-4 * t * slope or -slope < 1e-12 * (1.0 + abs(value)) or t < 1e-10
            if accept and candidate.min() > 0.0:
                break
            if t < 1e-30:  # no positive point along the step (a NaN in it): stop here
                return _unconverged(w, power) if ridge else None
            t *= 0.5
        w, Aw, value = candidate, A_candidate, new_value
        if not ridge and not (w * sizes).max() <= _CAP:  # NaN too: w^{-1/α} overflowed (small α)
            return None
    return _unconverged(w, power) if ridge else None


def newton_pair(a: float, b: float, c: float, alpha: float, ridge: float) -> Optional[tuple[float, float]]:
    """:func:`_newton` for two tasks in Python floats (a 2 × 2 Newton system by Cramer's rule) on ``A = [[a, b], [b, c]]``
    (the ridge, if any, already added), from :func:`_start`'s point. Raises ``OverflowError``, ``ValueError`` or
    ``ZeroDivisionError`` where a float operation leaves the finite range."""
    power = -1.0 / alpha
    log = power == -1.0

    def objective(w1: float, w2: float) -> float:
        barrier = math.log(w1) + math.log(w2) if log else (w1 ** (1.0 + power) + w2 ** (1.0 + power)) / (1.0 + power)
        return 0.5 * (w1 * (a * w1 + b * w2) + w2 * (b * w1 + c * w2)) - barrier

    exponent = alpha / (alpha + 1.0)
    w1, w2 = a**-exponent, c**-exponent
    size1, size2 = a**exponent, c**exponent  # 1 / each task's single-task weight (see _CAP)
    value = objective(w1, w2)
    for v1, v2 in ((1.0, 1.0), (w1, w2)):  # the rays of _start
        curvature = v1 * (a * v1 + b * v2) + v2 * (b * v1 + c * v2)
        if curvature > 0.0:
            scale = ((v1 ** (1.0 + power) + v2 ** (1.0 + power)) / curvature) ** exponent
            candidate = objective(scale * v1, scale * v2)
            if candidate < value:
                w1, w2, value = scale * v1, scale * v2, candidate
    geometric, floor = power > -1.0, _weight_floor(power)  # as in _newton
    previous = decrement = math.inf
    for _ in range(_MAX_ITERS):
        rhs1, rhs2 = w1**power, w2**power
        r1, r2 = a * w1 + b * w2 - rhs1, b * w1 + c * w2 - rhs2
        if r1 != r1 or r2 != r2:  # NaN (inf − inf): Python's max would drop it
            raise ValueError("NaN residual")
        largest = max(rhs1, rhs2)
        error = max(abs(r1), abs(r2)) / largest if largest > 0.0 else math.inf
        if error <= 1e-14 or (error > 0.5 * previous and (error <= 1e-10 or decrement < _DECREMENT)):
            return w1, w2
        previous = error
        h1, h2 = a - power * rhs1 / w1, c - power * rhs2 / w2
        det = h1 * h2 - b * b
        if det == 0.0:
            return (w1, w2) if ridge else None
        s1, s2 = (b * r2 - h2 * r1) / det, (b * r1 - h1 * r2) / det
        if geometric:
            t = 1.0
        else:
            bounds = [-x / d for x, d in ((w1, s1), (w2, s2)) if d < 0.0]
            t = min(1.0, 0.99 * min(bounds)) if bounds else 1.0
        slope = r1 * s1 + r2 * s2
        decrement = -slope
        while True:
            c1 = max(w1 * math.exp(t * s1 / w1), floor) if geometric and s1 < -w1 else w1 + t * s1
            c2 = max(w2 * math.exp(t * s2 / w2), floor) if geometric and s2 < -w2 else w2 + t * s2
            new_value = objective(c1, c2)
            accept = new_value <= value + 1e-4 * t * slope or -slope < 1e-12 * (1.0 + abs(value)) or t < 1e-10
            if accept and c1 > 0.0 and c2 > 0.0:
                break
            if t < 1e-30:
                raise ValueError("no positive point along the Newton step")  # solve_fairgrad runs the arrays instead
            t *= 0.5
        w1, w2, value = c1, c2, new_value
        if not ridge and not (w1 * size1 <= _CAP and w2 * size2 <= _CAP):  # NaN too; as in _newton
            return None
    if not ridge:
        return None
    w1, w2 = _unconverged(np.array([w1, w2]), power)  # warns that they are approximate
    return w1, w2


def _unconverged(w: np.ndarray, power: float) -> np.ndarray:
    """The last iterate of a ridged solve that stopped short of convergence, with a warning: it is approximate."""
    warnings.warn(
        f"FairGrad(alpha={-1.0 / power:g}): Newton's method did not converge on this step's Gramian (weights "
        "many orders of magnitude apart: tasks that cancel, or nearly opposed tasks at a large alpha); its weights "
        "are approximate.",
        RuntimeWarning,
        stacklevel=6,  # the caller of FairGrad.weights
    )
    return w


class FairGrad(GramianBalancer):
    """FairGrad, from `Fair Resource Allocation in Multi-Task Learning <https://arxiv.org/abs/2402.15638>`_
    (Ban & Ji, ICML 2024), Algorithm 1.

    The step is chosen as a fair allocation of progress among the tasks: the direction ``d`` maximises
    ``Σ_k u_α(g_kᵀ d)`` (within a ball), ``u_α(x) = x^{1−α} / (1−α)`` (``log x`` at ``α = 1``) being the
    α-fair utility of task k's rate of loss decrease. Its optimality conditions give ``d = Gᵀw`` with
    ``w > 0`` solving ``(G Gᵀ) w = w^{−1/α}`` element-wise (the paper's Eq. 4), solved at every step.
    ``α = 1`` is proportional fairness, the equation of Nash-MTL (Navon et al. 2022); ``α → 0``
    gives ``w → 1`` (linear scalarisation: the sum of the gradients); ``α → ∞`` gives ``(G Gᵀ) w = 1``,
    every task's loss decreasing at the same rate (max-min fairness). The weights are not normalised:
    their scale is part of the method (like Nash-MTL's).

    Solved natively in float64, without a general-purpose solver: the equation is the stationarity
    condition of the strictly convex ``f(w) = ½ wᵀ(G Gᵀ)w − Σ_k φ(w_k)`` on ``w > 0``, ``φ' = w^{−1/α}``
    (its Hessian ``G Gᵀ + diag(w^{−1/α−1}/α)`` is positive definite), minimised by Newton's method with
    a fraction-to-the-boundary step (``w`` stays positive) and an Armijo backtracking line search, from the
    minimiser of ``f`` on the better of the rays through 1 and through ``diag(G Gᵀ)^{−α/(1+α)}``: a handful of
    iterations to a relative residual of about 1e-14, or to its rounding level (about 1e-9 where the weights are
    large), recognised by a Newton decrement below 1e-16. The Gramian is first divided by its mean
    diagonal ``s`` and the weights multiplied back by ``s^{−α/(1+α)}`` (the equation's scaling law), so
    the solve does not depend on the gradients' scale.

    Degenerate Gramians: a singular Gramian (duplicate or linearly dependent task gradients) keeps a
    unique solution and needs nothing special. If a convex combination of the task gradients is 0 (a
    Pareto-stationary step: some tasks cancel each other exactly), the equation has no solution:
    ``f`` is unbounded below along that combination and its weights grow without bound. When the
    Newton iterates pass 10⁶ times their task's single-task weight ``A_kk^{−α/(1+α)}``, or do not converge,
    the solve restarts on ``G Gᵀ + ρ I`` with
    ``ρ = (10⁻⁶)^{1+1/α}`` (relative to ``s``), but at least 10⁻¹² and the rounding level of the Gramian's
    dtype (a smaller ρ underflows or is lost in rounding at small α), whose solution exists and whose weights
    stay near or below 10⁶: the cancelling combination contributes (almost) nothing to ``d``, the other tasks keep
    their part. The weights are computed in float64; near such a point their float32 copy, applied to
    the gradients, leaves a rounding residue of up to about 10⁻¹ of a gradient along the cancelling tasks.

    Args:
        alpha: the fairness ``α > 0``; 1 (proportional fairness) by default. The paper tunes it per
            benchmark (larger ``α``: more weight to the tasks that progress least).
    """

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = check_range("alpha", alpha, 0.0, open_low=True)

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        A = gramian.detach().double().numpy()
        A = 0.5 * (A + A.T)  # a float32 G Gᵀ is symmetric only to ~1e-7: Newton's line search on f needs it exact
        scale = float(A.trace()) / A.shape[0]
        A = A / scale
        w = solve_fairgrad(A, self.alpha)
        if w is None:
            # at least the rounding of A + ridge·I and of the Gramian's own entries (whose eigenvalues may be
            # below 0 by that much): a smaller ridge leaves f unbounded below, and the weights overflow (small α)
            floor = max(_MIN_RIDGE, A.shape[0] * rank_tolerance(gramian.dtype, A.shape[0]))
            w = solve_fairgrad(A, self.alpha, ridge=max((1.0 / _CAP) ** (1.0 + 1.0 / self.alpha), floor))
        return torch.from_numpy(w * scale ** (-self.alpha / (1.0 + self.alpha)))

    def _pair_weights(self, a: float, b: float, c: float, dtype: torch.dtype) -> Optional[tuple[float, float]]:
        scale = 0.5 * (a + c)
        try:  # without a ridge; where there is no solution, or a float leaves the range, the general path's fallback
            pair = newton_pair(a / scale, b / scale, c / scale, self.alpha, 0.0)
        except (OverflowError, ValueError, ZeroDivisionError):
            return None
        if pair is None:
            return None
        factor = scale ** (-self.alpha / (1.0 + self.alpha))
        return pair[0] * factor, pair[1] * factor
