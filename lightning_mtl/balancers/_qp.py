"""Exact solvers for the small quadratic programs of MGDA, UPGrad, DualProj and CAGrad.

These methods are weightings of the K × K Gramian ``Q = G Gᵀ`` of the task gradients (the rows ``g_k`` of
``G``): the direction is ``d = Gᵀ w``, so ``g_k · d = (Q w)_k`` and ``‖d‖² = wᵀ Q w``, and nothing else of
``G`` is needed. The solvers take ``Q`` as a float64 NumPy array divided by its trace (:func:`host_gramian`;
the weights of these methods do not depend on the gradients' scale) and return float64 weights.

MGDA, UPGrad and DualProj reduce to the non-negative quadratic program (NNQP)
``minimise ½ vᵀ M v + bᵀ v over v ≥ 0``, characterised by its KKT conditions ``v ≥ 0``,
``r = M v + b ≥ 0``, ``v_k r_k = 0``. :func:`_nnqp` solves it exactly: an active-set method finds the
support ``P = {k : v_k > 0}``, ``v_P`` solves the linear system ``M_PP v_P = −b_P``, and a solution is
accepted only when ``r_k ≥ 0`` holds on every other index up to the rounding of computing ``r_k``
(:func:`_tolerance`). It first runs the primal–dual active-set method (Hintermüller, Ito & Kunisch, SIAM J.
Optim. 13(3), 2002: a semismooth Newton method; here typically 2–5 linear solves for all the rows of a batch
at once); a row it leaves unverified (the method may cycle, or meet a singular system on a degenerate
Gramian) is solved again with duplicate tasks merged into one variable (their weight then shared equally),
and, if still unverified, by Lawson & Hanson's NNLS algorithm (*Solving Least Squares Problems*, 1974,
ch. 23) in its normal-equation form (Bro & de Jong, J. Chemometrics 11, 1997), started from the primal–dual
iterate; it terminates, and keeps ``M_PP`` non-singular by leaving out a task whose gradient is numerically
in the span of the support's (:data:`DEPENDENT`). CAGrad's problem is not a QP: its solver is in
:mod:`~lightning_mtl.balancers._cagrad_dual`.
"""

from __future__ import annotations


import numpy as np
import torch
from torch import Tensor

__all__ = ["host_gramian", "min_norm_pair", "min_norm_point", "project_dual_cone", "project_pair", "trace_normalised"]

#: The rounding unit of the float64 arithmetic the solvers run in.
EPS = float(np.finfo(np.float64).eps)
#: Multiples of ``K · EPS`` that a computed ``(M v + b)_k`` may be off by, relative to its terms (see ``_tolerance``).
ROUNDING = 4.0
#: Lawson–Hanson leaves out a task whose gradient's squared distance to the span of the support's is below this
#: fraction of its squared norm, or ``K`` times the precision of the Gramian's entries if more (a system with it
#: would be singular to that precision; with a float32 Gramian, indefinite).
DEPENDENT = 1e-8
#: Primal–dual active-set steps before the rows left over go to Lawson–Hanson (at least; K / 5 for large K).
PDAS_STEPS = 8


def host_gramian(gramian: Tensor) -> tuple[np.ndarray, float]:
    """The Gramian (on the CPU, with a positive trace) as float64 NumPy divided by its trace, and the relative
    precision of its entries (its dtype's ``eps``: a float32 Gramian is known to about 1e-7, and may be
    indefinite at that level)."""
    array = gramian.detach().numpy().astype(np.float64)
    return array / array.trace(), float(torch.finfo(gramian.dtype).eps)


def trace_normalised(a: float, b: float, c: float) -> tuple[float, float, float]:
    """:func:`host_gramian`'s division for two tasks: the Gramian ``[[a, b], [b, c]]`` divided by its trace."""
    trace = a + c
    return a / trace, b / trace, c / trace


def _tolerance(norms: np.ndarray, V: np.ndarray, size: np.ndarray) -> np.ndarray:
    """How far below 0 a computed ``r = V M + B`` may be from rounding alone, per row and index.

    ``(M v)_k = Σ_j M_kj v_j`` with ``|M_kj| ≤ n_k n_j`` (``n = √diag M``) is computed with an error of at most
    about ``K EPS n_k (n · |v|)``; ``size`` bounds the same for ``b`` (``n · |a|`` for ``b = M a``).
    """
    return (ROUNDING * V.shape[1] * EPS) * norms * (np.abs(V) @ norms + size)[:, None]


def _nnqp(
    M: np.ndarray, B: np.ndarray, size: np.ndarray, max_iters: int, precision: float = EPS
) -> tuple[np.ndarray, bool]:
    """The rows ``v_i = argmin_{v ≥ 0} ½ vᵀ M v + b_iᵀ v`` for the rows ``b_i`` of ``B`` (``M`` PSD, positive
    diagonal), and whether every row was solved within ``max_iters`` linear solves per phase (else that row's
    last iterate, feasible). ``size[i]`` bounds the rounding of ``b_i`` (see :func:`_tolerance`); ``precision``
    is that of ``M``'s entries (see :data:`DEPENDENT`)."""
    norms = np.sqrt(M.diagonal())
    steps = min(max_iters, max(PDAS_STEPS, M.shape[0] // 5))
    if B.shape[0] == 1:
        v = _pdas_row(M, B[0], float(size[0]), norms, steps)
        if v is not None:
            return v[None], True
    V, starts, failed, rows = _pdas_rows(M, B, size, norms, steps)
    left = np.array([*failed, *rows], dtype=int)
    if left.size == 0:
        return V, True
    first, group = _duplicates(M, precision)
    if first.size < M.shape[0]:  # duplicate tasks: one variable each, shared equally (the same constraint twice)
        merged, converged = _nnqp(M[first][:, first], B[left][:, first], size[left], max_iters, precision)
        V[left] = merged[:, group] / np.bincount(group)[group]
        return V, converged
    converged = True
    for i in left:  # Lawson–Hanson for the rows left (cycling, or a singular system)
        V[i], solved = _lawson_hanson(
            M, B[i], size[i], norms, max_iters, max(DEPENDENT, M.shape[0] * precision), starts[i]
        )
        converged &= solved
    return V, converged


def _pdas_rows(
    M: np.ndarray, B: np.ndarray, size: np.ndarray, norms: np.ndarray, steps: int
) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """The primal–dual active-set steps of :func:`_nnqp` for all the rows of ``B`` at once: the solutions ``V`` of
    the rows they verify, their last finite iterates (Lawson–Hanson's starts), the rows whose system was singular,
    and those still unverified after ``steps`` solves.

    The batch is re-indexed only in a step where some row is verified (not in every step); a singular row is
    emptied (the identity system, ``v = 0``, verified at once) and so leaves the batch with the next verified rows.
    """
    scaled = (ROUNDING * M.shape[0] * EPS) * norms  # the factor of ``_tolerance`` (the same products)
    P = B < -scaled * size[:, None]
    V = np.zeros_like(B)
    rows = np.flatnonzero(P.any(axis=1))  # the other rows are solved by v = 0
    if rows.size < B.shape[0]:
        P, B, size = P[rows], B[rows], size[rows]
    negative, identity = -B, np.eye(M.shape[0], dtype=bool)
    X, starts, failed = np.zeros_like(B), np.zeros_like(V), []
    for _ in range(steps if rows.size else 0):
        previous = X
        X = _solve(np.where(P[:, :, None] & P[:, None, :], M, identity), np.where(P, negative, 0.0))
        update = np.where(P, X > 0, X @ M + B < -(scaled * (np.abs(X) @ norms + size)[:, None]))
        if not np.isfinite(X).all():  # a singular system: duplicate or dependent tasks both in P
            B = B.copy()  # may be the caller's
            for i in np.flatnonzero(~np.isfinite(X).all(axis=1)).tolist():
                failed.append(int(rows[i]))
                starts[rows[i]] = previous[i]
                X[i], B[i], negative[i], update[i] = 0.0, 0.0, 0.0, False  # v = 0 from now on
        done = (update == P).all(axis=1)
        if done.all():
            V[rows] = X
            return V, starts, failed, []
        if done.any():
            V[rows[done]] = X[done]
            going = ~done
            rows, P, B, negative, size, X = rows[going], update[going], B[going], negative[going], size[going], X[going]
        else:
            P = update
    starts[rows] = X
    return V, starts, failed, [i for i in rows.tolist() if i not in failed]


def _duplicates(M: np.ndarray, precision: float) -> tuple[np.ndarray, np.ndarray]:
    """The first task of each group of equal ones (equal rows of ``M`` up to ``precision``), and each task's group."""
    K = M.shape[0]
    norms = np.sqrt(M.diagonal())
    bound = (8.0 * K * precision) * (norms[:, None, None] + norms[None, :, None]) * norms[None, None, :]
    same = (np.abs(M[:, None, :] - M[None, :, :]) <= bound).all(axis=2)
    leader = np.argmax(same, axis=1)  # the first task each one equals (itself at the latest)
    leader = leader[leader[leader]]  # closeness need not be transitive: follow to a task that leads itself
    first, group = np.unique(leader, return_inverse=True)
    return first, group


def _pdas_row(M: np.ndarray, b: np.ndarray, size: float, norms: np.ndarray, steps: int) -> np.ndarray | None:
    """The primal–dual active-set steps of :func:`_nnqp` for one problem, on index sets (fewer NumPy calls than
    the batched form); None if they do not settle on a verified solution within ``steps`` solves."""
    slack = (ROUNDING * b.shape[0] * EPS) * norms
    passive = b < -slack * size
    if not passive.any():
        return np.zeros_like(b)
    for _ in range(steps):
        index = np.flatnonzero(passive)
        try:
            solved = np.linalg.solve(M[index][:, index], -b[index]) if index.size else np.zeros(0)
        except np.linalg.LinAlgError:
            return None
        v = np.zeros_like(b)
        v[index] = solved
        update = np.where(passive, v > 0, M[:, index] @ solved + b < -slack * (norms[index] @ np.abs(solved) + size))
        if (update == passive).all():
            return v if np.isfinite(solved).all() else None
        passive = update
    return None


def _solve(systems: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``systems[i]⁻¹ rhs[i]`` for each row; NaN for a row whose system is exactly singular."""
    try:
        return np.linalg.solve(systems, rhs[:, :, None])[:, :, 0]
    except np.linalg.LinAlgError:
        out = np.full_like(rhs, np.nan)
        for i in range(rhs.shape[0]):
            try:
                out[i] = np.linalg.solve(systems[i], rhs[i])
            except np.linalg.LinAlgError:
                pass
        return out


def _lawson_hanson(
    M: np.ndarray,
    b: np.ndarray,
    size: float,
    norms: np.ndarray,
    max_iters: int,
    dependent_below: float,
    start: np.ndarray | None = None,
) -> tuple[np.ndarray, bool]:
    """``argmin_{v ≥ 0} ½ vᵀ M v + bᵀ v`` by Lawson & Hanson's NNLS algorithm (1974, Algorithm 23.10) on the
    normal equations, and whether it finished within ``max_iters`` linear solves. ``start`` (clipped to ``v ≥ 0``)
    is a feasible first point, whose support is the first passive set (as Bro & de Jong allow)."""
    K = b.shape[0]
    v = np.zeros(K) if start is None else np.maximum(start, 0.0)
    passive, dependent = v > 0, np.zeros(K, dtype=bool)
    iters, j = 0, -1
    while iters < max_iters:
        while passive.any() and iters < max_iters:  # to the least-squares point of the passive set, staying feasible
            iters += 1
            index = np.flatnonzero(passive)
            try:
                s = np.linalg.solve(M[index][:, index], -b[index])
            except np.linalg.LinAlgError:
                s = np.full(index.size, np.nan)
            if (s > 0).all():
                v[:] = 0.0
                v[index] = s
                break
            if not np.isfinite(s).all() and j < 0:  # the start's support is singular: start from 0
                return _lawson_hanson(M, b, size, norms, max_iters - iters, dependent_below)
            if j >= 0 and v[j] == 0.0 and not s[index == j][0] > 0.0:  # j does not enter: its violation is rounding
                passive[j] = False
                return v, True
            current = v[index]
            blocked = np.flatnonzero(s <= 0)
            steps = current[blocked] / (current[blocked] - s[blocked])
            step = int(np.argmin(steps))
            current += steps[step] * (s - current)
            current[blocked[step]] = 0.0
            current[current < 0] = 0.0
            v[index] = current
            passive[index] = current > 0
        r = M @ v + b
        violated = ~passive & ~dependent & (r < -_tolerance(norms, v[None], np.array([size]))[0])
        index = np.flatnonzero(passive)
        if index.size and violated.any():  # the candidates' squared distances to the span of the passive columns
            iters += 1
            candidates = np.flatnonzero(violated)
            columns = M[index][:, candidates]
            try:
                pivots = M.diagonal()[candidates] - (columns * np.linalg.solve(M[index][:, index], columns)).sum(axis=0)
            except np.linalg.LinAlgError:  # only a start's support can be singular (the solves cap stopped it early)
                return v, False
            # numerically in the span: a system with it would be singular
            dependent[candidates[~(pivots > dependent_below * M.diagonal()[candidates])]] = True
            violated &= ~dependent
        if not violated.any():
            return v, True
        j = int(np.argmin(np.where(violated, r / norms, 0.0)))  # the most conflicting, relative to its norm
        passive[j] = True
    return v, False


def min_norm_point(Q: np.ndarray, max_iters: int, precision: float = EPS) -> tuple[np.ndarray, bool]:
    """``w = argmin_{w ∈ Δ} wᵀ Q w``: the minimum-norm point ``Gᵀ w`` of the convex hull of the task gradients
    (MGDA: Désidéri 2012; Sener & Koltun 2018), and whether it was found within ``max_iters`` solves.

    Two tasks: the closed form of Sener & Koltun's Algorithm 1. More: the simplex QP is the NNQP
    ``u = argmin_{u ≥ 0} ½ uᵀ (Q + κ 11ᵀ) u − 1ᵀ u`` and ``w = u / 1ᵀu`` for any ``κ > 0`` (its KKT conditions
    ``(Q w)_k ≥ wᵀ Q w``, with equality where ``w_k > 0``, are those of the simplex QP, with
    ``1ᵀu = 1 / (wᵀQw + κ)``; the ``11ᵀ`` term is the device of Wolfe's *Finding the nearest point in a
    polytope*, Math. Prog. 11, 1976). ``κ`` is the smallest ``Q_kk``, so that adding it loses none of the
    precision of the small entries.
    """
    K = Q.shape[0]
    if K == 1:
        return np.ones(1), True
    if K == 2:
        (a, b), (_, c) = Q.tolist()
        return np.array(min_norm_pair(a, b, c)), True
    M = Q + Q.diagonal().min()
    u, converged = _nnqp(M, -np.ones((1, K)), np.zeros(1), max_iters, precision)
    return u[0] / u[0].sum(), converged


def min_norm_pair(a: float, b: float, c: float) -> tuple[float, float]:
    """:func:`min_norm_point` for two tasks, the Gramian ``[[a, b], [b, c]]``, in Python floats: the closed form of
    Sener & Koltun's Algorithm 1 (the point of the segment ``[g_2, g_1]`` nearest 0)."""
    gap = a + c - 2.0 * b  # ‖g_1 − g_2‖²
    first = 0.5 if gap <= 0.0 else min(max((c - b) / gap, 0.0), 1.0)
    return first, 1.0 - first


def project_pair(a: float, b: float, c: float, first: float, second: float) -> tuple[float, float]:
    """:func:`project_dual_cone` for two tasks and one row ``(first, second) ≥ 0``, the Gramian ``[[a, b], [b, c]]``
    (``a, c > 0``), in Python floats: at most one constraint is active, and the row gains ``−(g_k · Gᵀw) / ‖g_k‖²``
    on the task ``k`` whose inner product with ``Gᵀw`` is negative (the lower one if both are)."""
    inner_first, inner_second = first * a + second * b, first * b + second * c  # (w Q)_k
    if inner_first < 0.0 and inner_first < inner_second:
        return first - inner_first / a, second
    if inner_second < 0.0:
        return first, second - inner_second / c
    return first, second


def project_dual_cone(Q: np.ndarray, A: np.ndarray, precision: float = EPS, max_iters: int = 1000) -> np.ndarray:
    """The rows ``w_i = a_i + v_i``, ``v_i = argmin_{v ≥ 0} ½ (a_i + v)ᵀ Q (a_i + v)``, for rows ``a_i ≥ 0``:
    ``Gᵀ w_i`` is the projection of ``Gᵀ a_i`` onto the dual cone ``{d : G d ≥ 0}`` of the task gradients.

    The projection ``min_d ½ ‖d − Gᵀa‖²`` s.t. ``G d ≥ 0`` has the Lagrangian dual
    ``min_{v ≥ 0} ½ (a + v)ᵀ Q (a + v)`` with ``d = Gᵀ(a + v)`` (as in Quinton & Rey 2024); the dual's KKT
    conditions are ``G d ≥ 0`` (no conflict), ``v ≥ 0`` and complementarity. An NNQP with ``M = Q``, ``b = Q a``.
    Two tasks: at most one constraint is active when ``a ≥ 0`` (were both violated, ``‖Gᵀa‖² =
    a_1 g_1·Gᵀa + a_2 g_2·Gᵀa`` would be negative), and projecting onto it satisfies the other (Cauchy–Schwarz).
    """
    K = Q.shape[0]
    if K == 2:
        (a, b), (_, c) = Q.tolist()
        return np.array([project_pair(a, b, c, first, second) for first, second in A.tolist()])
    B = A @ Q
    norms = np.sqrt(Q.diagonal())
    V, _ = _nnqp(Q, B, np.abs(A) @ norms, max_iters, precision)
    return A + V
