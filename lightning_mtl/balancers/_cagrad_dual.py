"""CAGrad's dual (Liu et al., 2021), solved exactly: the solution path of a parametric QP on the K × K Gramian.

Like the solvers of :mod:`~lightning_mtl.balancers._qp`, it takes ``Q`` as a float64 NumPy array divided by its trace.
CAGrad's problem is not a QP; :func:`cagrad_dual` follows the solution path of a parametric QP, piecewise affine in
its parameter, to the point that solves it; two tasks in closed form (:func:`cagrad_pair`, in Python floats).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from lightning_mtl.balancers._qp import EPS, ROUNDING

__all__ = ["cagrad_dual", "cagrad_pair"]


def cagrad_dual(Q: np.ndarray, a: np.ndarray, phi: float, max_iters: int = 1000) -> tuple[np.ndarray, float]:
    """CAGrad's dual (Liu et al. 2021, Algorithm 1): ``w = argmin_{w ∈ Δ} wᵀ Q a + φ √(wᵀ Q w)``
    for ``g_0 = Gᵀa`` and ``φ = c ‖g_0‖ ≥ 0``; returns ``w`` and ``s = ‖Gᵀ w‖ / φ`` (0 when ``Gᵀ w = 0``).

    Where ``Gᵀ w ≠ 0`` the KKT conditions are those of the simplex QP
    ``W(s) = argmin_{w ∈ Δ} s qᵀ w + ½ wᵀ Q w`` (``q = Q a``) at an ``s > 0`` with ``φ s = ‖Gᵀ W(s)‖``, and any such
    ``s`` gives the solution. ``W(s)`` is piecewise affine in ``s`` (a parametric QP): on a support ``S``,
    ``W(s)_S = α + s β`` (:func:`_piece`). The method follows it down from ``s = ∞``, where it is the vertex
    ``argmin_k q_k`` (the linear program's solution), through the breakpoints where a weight reaches 0 or a task's
    reduced gradient does (one task leaves or enters), and on each piece solves ``φ² s² = ‖Gᵀ(α + s β)‖²``
    exactly. Reaching ``s = 0`` (MGDA's point) without a solution means ``Gᵀ w = 0`` is it (0 is in the convex
    hull and ``f ≥ f(0)`` there). Going down takes few pieces: CAGrad's support is small. Two tasks: the same
    problem on the segment ``[g_2, g_1]``, in closed form.
    """
    K = Q.shape[0]
    q = Q @ a
    if phi == 0.0:  # a linear program: a vertex
        w = np.zeros(K)
        w[int(np.argmin(q))] = 1.0
        return w, math.inf
    if K == 2:
        return _cagrad_pair(Q, q, phi)
    norms = np.sqrt(Q.diagonal())
    norms_a = float(norms @ a)
    support, dependent = np.zeros(K, dtype=bool), np.zeros(K, dtype=bool)
    support[int(np.argmin(q))] = True
    high, entered = math.inf, -1
    for _ in range(max_iters):  # few NumPy calls per piece (Python sums, no np.mean): a call costs more than its work
        index = support.nonzero()[0]
        piece = _piece(Q, q, index)
        if piece is None:
            if entered < 0:
                break
            support[entered], dependent[entered], entered = False, True, -1  # it lies in the support's affine hull
            continue
        alpha, beta, Qa, Qb = piece
        # the piece ends, going down, where a weight α_i + s β_i (β_i > 0) or the reduced gradient
        # ν_j(s) = ν0_j + s ν1_j (ν1_j > 0) of a task outside the support reaches 0; μ0 + s μ1 is the common
        # value of (Q w + s q)_S
        Qa_S, Qb_S, slope = Qa[index], Qb[index], Qb + q
        nu0 = Qa - sum(Qa_S.tolist()) / index.size
        nu1 = slope - sum(slope[index].tolist()) / index.size
        low, leave, entered = 0.0, -1, -1
        rising = (beta > 0).nonzero()[0]
        if rising.size:
            at = -alpha[rising] / beta[rising]
            last = int(at.argmax())
            leave, low = int(rising[last]), max(float(at[last]), 0.0)
        noise = (ROUNDING * K * EPS) * norms * (norms[index] @ np.abs(beta) + norms_a)
        candidates = (~(support | dependent) & (nu1 > noise)).nonzero()[0]
        if candidates.size:
            at = np.minimum(-nu0[candidates] / nu1[candidates], high)
            last = int(at.argmax())
            if at[last] > low:
                low, entered = float(at[last]), int(candidates[last])
        # h(s) = φ² s² − ‖Gᵀ(α + s β)‖², positive above the solution
        quad, lin, const = phi * phi - beta @ Qb_S, -2.0 * (alpha @ Qb_S), -(alpha @ Qa_S)
        scale = norms[index] @ (np.abs(alpha) + np.abs(beta) * (high if math.isfinite(high) else max(low, 1.0)))
        root = _last_root(quad, lin, const, low, high, (ROUNDING * K * EPS) * scale * scale)
        if root is not None:
            w = np.zeros(K)
            w[index] = np.maximum(alpha + root * beta, 0.0)
            return w / w.sum(), root
        if low <= 0.0:  # MGDA's point is 0 and f ≥ f(0) = 0 on the hull
            w = np.zeros(K)
            w[index] = np.maximum(alpha, 0.0)
            return w / w.sum(), 0.0
        high = low
        if entered >= 0:
            support[entered] = True
        else:
            support[index[leave]] = False
    warnings.warn("CAGrad: the solution path did not close; the weights are those of its last point", RuntimeWarning)
    w = np.zeros(K)
    w[int(np.argmin(q))] = 1.0
    return w, math.sqrt(max(Q.diagonal().min(), 0.0)) / phi


def _piece(Q: np.ndarray, q: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, ...] | None:
    """``α, β`` with ``W(s)_S = α + s β`` on the support ``S = index``, and ``Q_{:S} α``, ``Q_{:S} β`` (None if the
    support is not affinely independent). ``Q_SS + κ 11ᵀ`` is positive definite on an affinely independent
    support, and on the simplex ``κ`` changes nothing but the multiplier."""
    block = Q[index][:, index]
    rhs = np.ones((index.size, 2))
    rhs[:, 1] = q[index]
    try:
        solved = np.linalg.solve(block + sum(block.diagonal().tolist()) / index.size, rhs)
    except np.linalg.LinAlgError:
        return None
    if not np.isfinite(solved).all():
        return None
    u, z = solved[:, 0], solved[:, 1]
    alpha = u / sum(u.tolist())
    beta = alpha * sum(z.tolist()) - z
    columns = Q[:, index]
    return alpha, beta, columns @ alpha, columns @ beta


def _cagrad_pair(Q: np.ndarray, q: np.ndarray, phi: float) -> tuple[np.ndarray, float]:
    """:func:`cagrad_dual` for two tasks (:func:`cagrad_pair` on the NumPy arrays)."""
    (a, b), (_, c) = Q.tolist()
    first, s = cagrad_pair(a, b, c, *q.tolist(), phi)
    return np.array([first, 1.0 - first]), s


def cagrad_pair(a: float, b: float, c: float, q_first: float, q_second: float, phi: float) -> tuple[float, float]:
    """:func:`cagrad_dual` for two tasks, the Gramian ``[[a, b], [b, c]]`` and ``q = Q a``, ``φ > 0``, in Python floats:
    ``(λ, s)`` with ``w = (λ, 1 − λ)``. ``min_λ f(λ) = λ δ + φ ‖g_2 + λ (g_1 − g_2)‖`` on ``[0, 1]`` (convex).

    With ``u = A λ + B`` (``A = ‖g_1 − g_2‖²``, ``B = (g_1 − g_2)·g_2``) the norm is ``√(u²/A + D)``, ``D`` the
    squared distance from 0 to the line; ``f′ = 0`` gives ``u = −δ √(D A / (φ² A − δ²))`` when ``φ² A > δ²``;
    otherwise ``f`` is monotone and the minimum is an end point.
    """
    delta, gap, cross = q_first - q_second, a + c - 2.0 * b, b - c
    if gap <= 0.0:  # the same gradient twice
        lam = 0.5
    elif phi * phi * gap > delta * delta:
        distance = max(c - cross * cross / gap, 0.0)
        lam = min(max((-delta * math.sqrt(distance * gap / (phi * phi * gap - delta * delta)) - cross) / gap, 0.0), 1.0)
    else:
        lam = 0.0 if delta > 0 else 1.0
    rest = 1.0 - lam
    return lam, math.sqrt(max(lam * (lam * a + rest * b) + rest * (lam * b + rest * c), 0.0)) / phi


def _last_root(quad: float, lin: float, const: float, low: float, high: float, rounding: float) -> float | None:
    """The largest zero in ``[low, high]`` (``high`` may be infinite) of ``h(s) = quad s² + lin s + const``, which is
    positive above it, or None; ``rounding`` bounds the error of computing ``h``. A zero at ``s = 0`` does not count
    (``‖Gᵀw‖`` is not differentiable there: no KKT point)."""
    if math.isfinite(high) and high > 0.0 and abs((quad * high + lin) * high + const) <= rounding:
        return high
    if quad == 0.0:
        roots = [-const / lin] if lin != 0.0 else []
    else:
        disc = lin * lin - 4.0 * quad * const
        if disc < 0.0:
            return None
        half = -0.5 * (lin + math.copysign(math.sqrt(disc), lin))
        roots = [half / quad, const / half] if half != 0.0 else [0.0]
    inside = [r for r in roots if low <= r <= high and r > 0.0]
    return max(inside) if inside else None
