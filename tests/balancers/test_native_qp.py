"""The exact QP-family weightings (MGDA, UPGrad, DualProj, CAGrad) against independent oracles.

Oracles: enumeration of the KKT supports (every subset, K ≤ 8) for the simplex QP of MGDA and the
non-negative QPs of UPGrad and DualProj; KKT certificates (the duality gap, the reduced gradients) for
every K; torchjd's weightings (Frank–Wolfe for MGDA, which ours must beat; quadprog without its 1e-4
regularisation for UPGrad and DualProj); cvxpy with tight tolerances for CAGrad (skipped without cvxpy).
Everything in float64, on random, conflicting, rank-deficient, duplicate-row, tiny (1e-6) and huge (1e6)
gradients and on strongly opposed gradients with a small common component, K = 1..16.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchjd.aggregation as jd
from torchjd.linalg import QuadprogProjector

from lightning_mtl.balancers import MGDA, CAGrad, DualProj, UPGrad
from lightning_mtl.balancers._cagrad_dual import cagrad_dual
from lightning_mtl.balancers._qp import host_gramian, min_norm_point, project_dual_cone

HAS_CVXPY = importlib.util.find_spec("cvxpy") is not None

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from weightings import opposed  # noqa: E402  issue 14's hard case, shared with the call-cost benchmark
from balancer_helpers import simplex_oracle  # noqa: E402
KS = list(range(1, 17))
KINDS = ["random", "conflicting", "rank-deficient", "duplicate", "tiny", "huge", "opposed"]
UNIQUE = {"random", "conflicting", "tiny", "huge", "opposed"}  # the weights themselves are unique
METHODS = [MGDA, UPGrad, DualProj, CAGrad]


def gradients(kind: str, k: int, seed: int = 0, p: int | None = None) -> torch.Tensor:
    """K gradients (float64, K × P) of ``kind``."""
    generator = torch.Generator().manual_seed(7919 * k + seed)
    p = p or 2 * k + 3
    G = torch.randn(k, p, generator=generator, dtype=torch.float64)
    G *= torch.rand(k, 1, generator=generator, dtype=torch.float64) * 3 + 0.2
    if kind == "conflicting" and k >= 2:
        G[1] = -0.9 * G[0] + 0.1 * G[1]
    elif kind == "rank-deficient":
        factors = torch.randn(k, 2, generator=generator, dtype=torch.float64)
        G = factors @ torch.randn(2, p, generator=generator, dtype=torch.float64)
    elif kind == "duplicate" and k >= 3:
        G[2] = G[0]
    elif kind == "tiny":
        G[0] *= 1e-6
    elif kind == "huge":
        G[0] *= 1e6
    elif kind == "opposed":
        G = opposed(k, 1e-3, generator)
    return G


def unit(G: torch.Tensor) -> np.ndarray:
    """The Gramian divided by its trace, as the solvers get it."""
    return host_gramian(G @ G.T)[0]


def gram_distance(G: torch.Tensor, w: torch.Tensor | np.ndarray, v: torch.Tensor | np.ndarray) -> float:
    """``‖Gᵀ(w − v)‖`` relative to the largest gradient norm (the directions' distance)."""
    diff = torch.as_tensor(np.asarray(w, dtype=np.float64)) - torch.as_tensor(np.asarray(v, dtype=np.float64))
    return (G.T @ diff).norm().item() / G.norm(dim=1).max().item()


# --- oracles -----------------------------------------------------------------------------------------------


def nnqp_oracle(Q: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``a + argmin_{v ≥ 0} ½ (a + v)ᵀ Q (a + v)`` by enumerating supports until one satisfies the KKT conditions."""
    K = Q.shape[0]
    norms = np.sqrt(Q.diagonal())
    for r in range(K + 1):
        for support in itertools.combinations(range(K), r):
            S = list(support)
            v = np.zeros(K)
            if S:
                v[S] = np.linalg.lstsq(Q[np.ix_(S, S)], -(Q @ a)[S], rcond=None)[0]
            if v.min() < -1e-12:
                continue
            w = a + v
            if (Q @ w >= -1e-10 * norms * (norms @ np.abs(w))).all():
                return w
    raise AssertionError("no support satisfies the KKT conditions")


def cagrad_objective(Q: np.ndarray, w: np.ndarray, phi: float) -> float:
    a = np.full(Q.shape[0], 1.0 / Q.shape[0])
    return float(w @ Q @ a + phi * math.sqrt(max(w @ Q @ w, 0.0)))


def cvxpy_cagrad(Q: np.ndarray, phi: float) -> np.ndarray:
    """CAGrad's dual by cvxpy (CLARABEL, tight tolerances), on a factor of the unit-trace Gramian."""
    import cvxpy as cp

    K = Q.shape[0]
    values, vectors = np.linalg.eigh(Q)
    factor = vectors * np.sqrt(np.clip(values, 0.0, None))
    w = cp.Variable(K)
    cost = (Q @ np.full(K, 1.0 / K)) @ w + phi * cp.norm(factor.T @ w, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cp.Problem(cp.Minimize(cost), [w >= 0, cp.sum(w) == 1]).solve(
            cp.CLARABEL, tol_gap_abs=1e-13, tol_gap_rel=1e-13, tol_feas=1e-13, max_iter=400
        )
    solution = np.clip(w.value, 0.0, None)
    return solution / solution.sum()


def polish(Q: np.ndarray, phi: float, w: np.ndarray) -> np.ndarray | None:
    """Newton's method on the KKT equations ``q_S + φ Q_S w / ‖Gᵀw‖ = λ 1``, ``1ᵀ w = 1`` on the support ``S`` of
    an interior-point solution (whose weights are accurate to about the square root of its tolerance); None
    unless it converges to positive weights."""
    K = Q.shape[0]
    q = Q @ np.full(K, 1.0 / K)
    S = np.flatnonzero(w > 1e-7 * w.max())
    if S.size == 1 or math.sqrt(w @ Q @ w) < 1e-9:
        return w
    x = np.append(w[S] / w[S].sum(), 0.0)
    block = Q[np.ix_(S, S)]
    for _ in range(30):
        y = x[:-1]
        norm = math.sqrt(y @ block @ y)
        Qy = block @ y
        residual = np.append(q[S] + phi * Qy / norm - x[-1], y.sum() - 1.0)
        jacobian = np.zeros((S.size + 1, S.size + 1))
        jacobian[:-1, :-1] = phi * (block / norm - np.outer(Qy, Qy) / norm**3)
        jacobian[:-1, -1], jacobian[-1, :-1] = -1.0, 1.0
        step = np.linalg.lstsq(jacobian, residual, rcond=None)[0]
        x -= step
        if np.abs(step).max() < 1e-15:
            break
    if not (x[:-1] > 0).all() or np.abs(step).max() > 1e-12:
        return None
    out = np.zeros(K)
    out[S] = x[:-1]
    return out


# --- MGDA ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", KS)
def test_mgda_is_the_exact_min_norm_point_and_beats_frank_wolfe(kind, k):
    G = gradients(kind, k)
    Q = unit(G)
    w = MGDA().weights(G @ G.T).numpy()
    assert np.isfinite(w).all() and (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-12)
    value = w @ Q @ w
    # the duality (Frank–Wolfe) gap bounds the distance to the optimum: a certificate for every K
    assert value - (Q @ w).min() <= 1e-12 * Q.diagonal().max()
    frank_wolfe = jd.MGDA()(G)  # torchjd's Algorithm 2, stopped at a step of 1e-3
    assert (G.T @ torch.from_numpy(w)).norm() <= frank_wolfe.norm() * (1 + 1e-12) + 1e-300
    if k <= 8:
        exact = simplex_oracle(Q)
        assert value - exact @ Q @ exact <= 1e-14 * Q.diagonal().max()
        assert gram_distance(G, w, exact) <= 1e-6
        if kind in UNIQUE:
            np.testing.assert_allclose(w, exact, atol=1e-6)


@pytest.mark.parametrize("k", [3, 5, 8, 12])
def test_mgda_is_closer_to_the_optimum_than_torchjd(k):
    """On conflicting gradients Frank–Wolfe's gap is visible; ours is at the optimum to rounding."""
    G = gradients("conflicting", k, seed=3)
    Q = unit(G)
    ours = MGDA().weights(G @ G.T).numpy()
    theirs = jd.MGDAWeighting()(torch.from_numpy(Q)).numpy()
    best = simplex_oracle(Q) if k <= 8 else ours
    gap_ours, gap_theirs = ours @ Q @ ours - best @ Q @ best, theirs @ Q @ theirs - best @ Q @ best
    assert gap_ours <= 1e-15 and gap_ours <= gap_theirs


def test_mgda_two_tasks_in_closed_form():
    G = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # min over λ of ‖λ g1 + (1 − λ) g2‖²: λ = (g2·g2 − g1·g2) / ‖g1 − g2‖² = (2 + 1) / 5
    torch.testing.assert_close(MGDA().weights(G @ G.T), torch.tensor([0.6, 0.4], dtype=torch.float64))
    same = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(MGDA().weights(same @ same.T), torch.tensor([0.5, 0.5], dtype=torch.float64))
    inside = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)  # g1 is the hull's nearest point
    torch.testing.assert_close(MGDA().weights(inside @ inside.T), torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_mgda_old_arguments_still_build():
    """A config from the release with Frank–Wolfe runs: ``epsilon`` warns that it is ignored, ``max_iters`` caps."""
    with pytest.warns(DeprecationWarning, match="epsilon"):
        balancer = MGDA(epsilon=1e-7, max_iters=10_000)
    assert balancer.epsilon == 1e-7 and balancer.max_iters == 10_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MGDA()  # the defaults do not warn
        MGDA(max_iters=7)
    G = gradients("conflicting", 6)
    torch.testing.assert_close(balancer.weights(G @ G.T), MGDA().weights(G @ G.T))


def test_mgda_max_iters_caps_the_solver_and_says_so():
    G = gradients("rank-deficient", 12)  # the primal–dual steps meet singular systems: Lawson–Hanson runs
    w, solved = min_norm_point(unit(G), 200)
    assert solved
    _, capped = min_norm_point(unit(G), 1)
    assert not capped
    with pytest.warns(RuntimeWarning, match="max_iters=1"):
        weights = MGDA(max_iters=1).weights(G @ G.T)
    assert torch.isfinite(weights).all() and (weights >= 0).all()


# --- UPGrad and DualProj -------------------------------------------------------------------------------------


def reference_rows(Q: np.ndarray, cls: type) -> np.ndarray:
    K = Q.shape[0]
    A = np.eye(K) if cls is UPGrad else np.full((1, K), 1.0 / K)
    return np.stack([nnqp_oracle(Q, a) for a in A])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("cls", [UPGrad, DualProj])
def test_projections_are_exact(cls, kind, k):
    G = gradients(kind, k)
    Q = unit(G)
    w = cls().weights(G @ G.T).numpy()
    assert np.isfinite(w).all()
    rows = project_dual_cone(Q, np.eye(k) if cls is UPGrad else np.full((1, k), 1.0 / k))
    np.testing.assert_allclose(rows.mean(axis=0) if cls is UPGrad else rows[0], w, rtol=1e-12, atol=1e-15)
    # KKT certificate of every projection: v ≥ 0, G d ≥ 0, complementarity, to rounding
    norms = np.sqrt(Q.diagonal())
    A = np.eye(k) if cls is UPGrad else np.full((1, k), 1.0 / k)
    assert (rows - A >= 0).all()
    residual = rows @ Q
    scale = norms[None] * (np.abs(rows) @ norms)[:, None]
    assert (residual >= -1e-13 * scale).all()
    assert (np.abs(residual * (rows - A)) <= 1e-12 * scale * np.abs(rows)).all()
    if k <= 8:
        expected = reference_rows(Q, cls)
        for row, reference in zip(rows, expected):
            assert gram_distance(G, row, reference) <= 1e-6
        if kind in UNIQUE:
            np.testing.assert_allclose(rows, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("kind", ["random", "conflicting", "opposed"])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("cls", [UPGrad, DualProj])
def test_projections_equal_torchjd_without_its_regularisation(cls, kind, k):
    """quadprog solves the same QP exactly when the Gramian is positive definite and not regularised."""
    G = gradients(kind, k)
    weighting = getattr(jd, f"{cls.__name__}Weighting")(projector=QuadprogProjector(reg_eps=0.0))
    theirs = weighting(torch.from_numpy(unit(G)))
    ours = cls().weights(G @ G.T)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6 * theirs.abs().max().item())


@pytest.mark.parametrize("k", [2, 3, 5, 8])
@pytest.mark.parametrize("cls", [UPGrad, DualProj])
def test_projections_are_closer_to_the_cone_than_torchjd_default(cls, k):
    """torchjd's default regularises the unit-trace Gramian by 1e-4: with strongly opposed gradients and a small
    common component its direction conflicts with a task (cosines down to −0.3 measured); ours does not."""
    G = gradients("opposed", k)
    ours = G.T @ cls().weights(G @ G.T)
    theirs = G.T @ getattr(jd, f"{cls.__name__}Weighting")()(G @ G.T)

    def worst(d):
        return (-(G @ d) / (G.norm(dim=1) * d.norm())).max().item()

    assert worst(ours) <= 1e-9 and worst(ours) <= worst(theirs)


# --- CAGrad --------------------------------------------------------------------------------------------------


def cagrad_certificate(Q: np.ndarray, w: np.ndarray, phi: float) -> float:
    """How far ``w`` is from satisfying the KKT conditions of ``min_{w ∈ Δ} qᵀw + φ ‖Gᵀw‖`` (where ``Gᵀw ≠ 0``):
    the gradient ``q + φ Q w / ‖Gᵀw‖`` is smallest, and equal, on the support (relative to its size)."""
    a = np.full(Q.shape[0], 1.0 / Q.shape[0])
    linear, radial = Q @ a, phi * (Q @ w) / math.sqrt(w @ Q @ w)
    gradient = linear + radial
    level = gradient[w > 1e-12].mean()
    scale = np.abs(linear).max() + np.abs(radial).max()  # the size of the terms that cancel
    return max(level - gradient.min(), np.abs(gradient[w > 1e-12] - level).max()) / scale


@pytest.mark.parametrize("c", [0.1, 0.4, 1.0, 3.0])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", KS)
def test_cagrad_solves_its_dual(k, kind, c):
    G = gradients(kind, k)
    Q = unit(G)
    a = np.full(k, 1.0 / k)
    phi = c * math.sqrt(a @ Q @ a)
    w, s = cagrad_dual(Q, a, phi)
    assert np.isfinite(w).all() and (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-12)
    weights = CAGrad(c=c).weights(G @ G.T).numpy()
    norm = math.sqrt(max(w @ Q @ w, 0.0))
    if norm < 1e-4:  # ‖G_w‖ < norm_eps ‖G‖_F: the gradients are on the Pareto front
        assert (weights == 0).all()
    else:
        assert norm == pytest.approx(phi * s, rel=1e-9)
        np.testing.assert_allclose(weights, a + w / s, rtol=1e-12)
        assert cagrad_certificate(Q, w, phi) <= 1e-9
    theirs = jd.CAGradWeighting(c=c)(torch.from_numpy(Q)).numpy() if HAS_CVXPY else None
    if theirs is not None and (theirs - a).sum() > 0:  # torchjd's cvxpy solution (its tolerances): ours is no worse
        their_w = np.clip(theirs - a, 0.0, None)  # its weights are a + (φ / ‖G_w‖) w, w feasible to ~1e-10
        their_w /= their_w.sum()
        assert cagrad_objective(Q, w, phi) <= cagrad_objective(Q, their_w, phi) + 1e-12


@pytest.mark.skipif(not HAS_CVXPY, reason="cvxpy (lightning-mtl[solvers]) is not installed")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", KS)
def test_cagrad_equals_cvxpy(k, kind):
    G = gradients(kind, k)
    Q = unit(G)
    a = np.full(k, 1.0 / k)
    phi = 0.4 * math.sqrt(a @ Q @ a)
    w, _ = cagrad_dual(Q, a, phi)
    reference = cvxpy_cagrad(Q, phi)
    assert cagrad_objective(Q, w, phi) <= cagrad_objective(Q, reference, phi) + 1e-12
    ours = CAGrad().weights(G @ G.T)
    reference = polish(Q, phi, reference)
    if kind in UNIQUE and (ours != 0).any() and reference is not None:
        norm = math.sqrt(reference @ Q @ reference)
        expected = a + phi * reference / norm
        np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_cagrad_by_hand():
    """One task: ``g₀ = g`` and the direction is ``(1 + c) g``. ``c = 0``: the mean."""
    g = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(CAGrad(c=0.4).weights(g @ g.T), torch.tensor([1.4], dtype=torch.float64))
    G = gradients("conflicting", 5)
    torch.testing.assert_close(CAGrad(c=0.0).weights(G @ G.T), torch.full((5,), 0.2, dtype=torch.float64))


def test_cagrad_two_tasks_in_closed_form():
    """The two-task closed form satisfies the KKT conditions, and equals cvxpy's solution."""
    for seed in range(20):
        G = gradients("random", 2, seed=seed)
        Q = unit(G)
        a = np.full(2, 0.5)
        phi = 0.4 * math.sqrt(a @ Q @ a)
        w, s = cagrad_dual(Q, a, phi)
        exact = polish(Q, phi, cvxpy_cagrad(Q, phi)) if HAS_CVXPY else None
        assert cagrad_certificate(Q, w, phi) <= 1e-9 or math.sqrt(w @ Q @ w) < 1e-12
        if exact is not None:
            np.testing.assert_allclose(w, exact, atol=1e-6)


def test_cagrad_needs_no_optional_solver(monkeypatch):
    import importlib.util as util

    real = util.find_spec
    missing = ("cvxpy", "clarabel")
    monkeypatch.setattr(util, "find_spec", lambda name, *args: None if name in missing else real(name, *args))
    G = gradients("random", 4)
    assert torch.isfinite(CAGrad().weights(G @ G.T)).all()


# --- properties ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("common", [1e-2, 1e-3, 1e-4])
@pytest.mark.parametrize("k", range(2, 11))
@pytest.mark.parametrize("cls", [MGDA, UPGrad, DualProj])
def test_no_conflict_with_strongly_opposed_gradients(cls, k, common):
    """``g_k · d ≥ −1e-9 ‖g_k‖ ‖d‖`` in float64, with a small common component and nearly antipodal pairs."""
    G = opposed(k, common, torch.Generator().manual_seed(k))
    d = G.T @ cls().weights(G @ G.T)
    assert d.norm() > 0
    assert (G @ d >= -1e-9 * G.norm(dim=1) * d.norm()).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 3, 4, 6, 9, 13, 16])
@pytest.mark.parametrize("cls", [MGDA, UPGrad, DualProj])
def test_no_conflict(cls, kind, k):
    G = gradients(kind, k, seed=1)
    d = G.T @ cls().weights(G @ G.T)
    if d.norm() <= 1e-9 * G.norm(dim=1).max():  # Pareto stationary: the dual cone is {0}
        return
    assert (G @ d >= -1e-9 * G.norm(dim=1) * d.norm()).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls", METHODS)
def test_same_direction_at_every_scale(cls, kind):
    G = gradients(kind, 6)
    expected = cls().weights(G @ G.T)
    for scale in (1e-8, 1e-4, 1e4, 1e8):
        weights = cls().weights((scale * G) @ (scale * G).T)
        if kind in UNIQUE:
            torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12 * expected.abs().max().item())
        else:  # the weights are not unique: the direction is
            assert gram_distance(G, weights, expected) <= 1e-9


@pytest.mark.parametrize("kind", ["random", "conflicting", "tiny", "huge", "opposed"])
@pytest.mark.parametrize("cls", METHODS)
def test_permutation_invariance(cls, kind):
    G = gradients(kind, 7, seed=2)
    permutation = torch.tensor([3, 0, 6, 4, 1, 5, 2])
    weights = cls().weights(G @ G.T)
    permuted = cls().weights(G[permutation] @ G[permutation].T)
    torch.testing.assert_close(permuted, weights[permutation], rtol=1e-7, atol=1e-9 * weights.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls", METHODS)
def test_float32_gramian(cls, kind):
    """The usual input: a float32 Gramian, weighted in float64, returned in float32, finite."""
    G = gradients(kind, 8)
    G32 = G.float()
    weights = cls().weights(G32 @ G32.T)
    assert weights.dtype == torch.float32 and torch.isfinite(weights).all()
    if kind in ("random", "conflicting"):
        torch.testing.assert_close(weights.double(), cls().weights(G @ G.T), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("cls", METHODS)
def test_state_and_arguments_unchanged(cls):
    """Same arguments as the torchjd wrappers, kept as attributes (run configs), and no state to checkpoint."""
    assert cls().state_dict() == {}
    if cls is MGDA:
        assert (MGDA(max_iters=7).epsilon, MGDA(max_iters=7).max_iters) == (0.001, 7)
    if cls is CAGrad:
        assert (CAGrad(c=0.25).c, CAGrad(c=0.25).norm_eps) == (0.25, 0.0001)
