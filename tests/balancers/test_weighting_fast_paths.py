"""The fast paths of the Gramian weightings (issue 14's call budget) against their general forms.

Each special case (two tasks in scalars, an affine step on a fixed support, a Python loop instead of NumPy calls)
must compute what the general code computes, to rounding: checked on random, conflicting, rank-deficient,
zero-row, tiny-norm (1e-6) and huge-norm (1e6) Gramians.
"""

import numpy as np
import pytest

from lightning_mtl.balancers import _qp, fairgrad
from lightning_mtl.balancers.sdmgrad import inner_steps, project_simplex

KINDS = ["random", "conflicting", "rank-deficient", "zero-row", "tiny", "huge"]


def gramian(kind: str, k: int, seed: int) -> np.ndarray:
    """A float64 K × K Gramian ``G Gᵀ`` of the given kind (gradient norms spread over [0.1, 10] before scaling)."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((k, 3 * k + 1)) * 10 ** rng.uniform(-1, 1, (k, 1))
    if kind == "conflicting":
        for i in range(1, k, 2):
            mean = G[:i].mean(axis=0)
            G[i] = np.linalg.norm(G[i]) * (G[i] / np.linalg.norm(G[i]) - 1.5 * mean / np.linalg.norm(mean))
    elif kind == "rank-deficient":
        G[-1] = G[0] if k == 2 else 0.5 * G[0] - 2.0 * G[1]
        if k > 3:
            G[-2] = G[0]
    elif kind == "zero-row":
        G[-1] = 0.0
    elif kind == "tiny":
        G *= 1e-6
    elif kind == "huge":
        G *= 1e6
    return G @ G.T


def _reference_simplex(v: np.ndarray) -> np.ndarray:
    """The sort-based projection onto the simplex in NumPy calls (the form ``project_simplex`` had)."""
    v = v - v.max()
    u = np.sort(v)[::-1]
    excess = np.cumsum(u) - 1.0
    count = int(np.count_nonzero(u * np.arange(1, v.size + 1) > excess))
    return np.maximum(v - excess[count - 1] / count, 0.0)


# ---------------------------------------------------------------------------------------------------- SDMGrad


def test_project_simplex_equals_the_numpy_sort_form_bitwise():
    rng = np.random.default_rng(0)
    cases = [rng.standard_normal(int(rng.integers(1, 30))) * 10 ** rng.uniform(-8, 17) for _ in range(2000)]
    cases += [np.round(rng.standard_normal(8), 1) for _ in range(200)]  # ties
    cases += [np.full(5, 0.3), np.zeros(1), np.array([1.0, np.nan, 2.0]), np.array([np.inf, 1.0]), np.array([-np.inf, 1.0])]
    with np.errstate(invalid="ignore"):
        for v in cases:
            np.testing.assert_array_equal(project_simplex(v), _reference_simplex(v))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 3, 5, 10, 40])
def test_sdmgrad_inner_steps_equal_the_plain_projected_gradient_loop(kind, k):
    """``inner_steps`` (scalars for two tasks, the affine step on a fixed support for more) against the definition
    ``w ← Π_Δ(w − lr (A w + target))`` looped, from uniform, random and vertex starts, for several lr and λ."""
    rng = np.random.default_rng(k)
    for seed in range(6):
        A = gramian(kind, k, seed)
        A = A / A.trace()
        lr, lam = [(1.0, 0.3), (0.3, 0.0), (3.0, 2.0)][seed % 3]
        target = A.sum(axis=1) * (lam / k)
        starts = [np.full(k, 1.0 / k), rng.dirichlet(np.ones(k)), np.eye(k)[int(rng.integers(k))]]
        for w in starts:
            for num_iters in (1, 7, 20, 200):
                expected = w.copy()
                for _ in range(num_iters):
                    expected = project_simplex(expected - lr * (A @ expected + target))
                got = inner_steps(A, target, w.copy(), lr, num_iters)
                np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
                assert got.min() >= 0.0 and abs(got.sum() - 1.0) < 1e-12


# --------------------------------------------------------------------------------------------------- FairGrad


@pytest.mark.parametrize("kind", KINDS)
def test_fairgrad_two_tasks_in_floats_equal_the_array_iterations(kind):
    """``newton_pair`` (Python floats, Cramer's rule, its own start) against ``_newton`` (NumPy) from ``_start``, with
    and without a ridge; a zero row is made a small one (the balancer leaves a zero-gradient task out)."""
    for seed in range(12):
        A = gramian(kind, 2, seed)
        if kind == "zero-row":
            A[1, 1] = 1e-3 * A[0, 0]
        A = A / (A.trace() / 2)
        for alpha in (0.1, 0.5, 1.0, 2.0, 10.0):
            for ridge in (0.0, 1e-9):
                B = A + ridge * np.eye(2)
                with np.errstate(all="ignore"):
                    expected = fairgrad._newton(B, fairgrad._start(B, alpha, -1.0 / alpha), -1.0 / alpha, ridge)
                pair = fairgrad.newton_pair(*B.ravel()[[0, 1, 3]].tolist(), alpha, ridge)
                assert (pair is None) == (expected is None)
                if expected is not None:
                    np.testing.assert_allclose(pair, expected, rtol=1e-12, atol=0)
                    assert fairgrad.solve_fairgrad(A, alpha, ridge) is not None


def test_fairgrad_two_tasks_fall_back_to_arrays_where_floats_overflow():
    """Python floats raise where NumPy gives inf (``w^{-1/α}`` at a small α): ``solve_fairgrad`` then runs the
    array iterations, and its answer is theirs."""
    A = np.array([[3.1949076642829977e-09, 6.477984961893875e-05], [6.477984961893875e-05, 1.9999999968050923]])
    alpha = 0.004210984673528849  # found by a random search: one task's gradient is 2e-5 times the other's
    with pytest.raises(OverflowError), np.errstate(all="ignore"):
        fairgrad.newton_pair(*A.ravel()[[0, 1, 3]].tolist(), alpha, 0.0)
    with np.errstate(all="ignore"):
        expected = fairgrad._newton(A, fairgrad._start(A, alpha, -1.0 / alpha), -1.0 / alpha, 0.0)
    got = fairgrad.solve_fairgrad(A, alpha)
    assert (got is None) == (expected is None)
    if expected is not None:
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [3, 10, 40])
def test_fairgrad_array_iterations_solve_the_equation(kind, k):
    """``_newton`` (Python reductions over NumPy vectors) reaches the equation's residual to the rounding of its
    terms (about 1e-14; a singular Gramian's large weights stop at the rounding level)."""
    for seed in range(4):
        A = gramian(kind, k, seed)
        if kind == "zero-row":
            A = A[:-1, :-1]
        A = A / (A.trace() / A.shape[0])
        for alpha in (0.5, 1.0, 2.0):
            w = fairgrad.solve_fairgrad(A, alpha)
            assert w is not None and (w > 0).all()
            rhs = w ** (-1.0 / alpha)
            assert np.abs(A @ w - rhs).max() <= 1e-13 * (np.abs(A) @ w + rhs).max()  # the terms' rounding


# ------------------------------------------------------------------------------------------ UPGrad / DualProj


def _plain_nnqp_row(M: np.ndarray, b: np.ndarray, size: float, max_iters: int, precision: float) -> np.ndarray:
    """One row of ``_qp._nnqp`` as the batched primal–dual steps had it (a row dropped from the batch when
    verified), and the same fall-backs, on that row alone."""
    K = M.shape[0]
    norms = np.sqrt(M.diagonal())
    tolerance = lambda x: (_qp.ROUNDING * K * _qp.EPS) * norms * (np.abs(x) @ norms + size)  # noqa: E731
    P, x, start = b < -tolerance(np.zeros(K)), np.zeros(K), np.zeros(K)
    if not P.any():
        return x
    for _ in range(min(max_iters, max(_qp.PDAS_STEPS, K // 5))):
        x = _qp._solve(np.where(np.outer(P, P), M, np.eye(K, dtype=bool))[None], np.where(P, -b, 0.0)[None])[0]
        if not np.isfinite(x).all():
            break
        update = np.where(P, x > 0, x @ M + b < -tolerance(x))
        if (update == P).all():
            return x
        P, start = update, x
    first, group = _qp._duplicates(M, precision)
    if first.size < K:
        merged, _ = _qp._nnqp(M[first][:, first], b[None, first], np.array([size]), max_iters, precision)
        return merged[0, group] / np.bincount(group)[group]
    dependent = max(_qp.DEPENDENT, K * precision)
    return _qp._lawson_hanson(M, b, size, norms, max_iters, dependent, start)[0]


def _solver_gramians(k: int):
    """Trace-normalised Gramians of every kind, with duplicate rows and (two tasks up) a zero row kept in."""
    for kind in KINDS + ["duplicate"]:
        if kind in ("conflicting", "rank-deficient") and k < 2:
            continue
        for seed in range(6):
            if kind == "duplicate":
                G = np.random.default_rng(seed).standard_normal((k, 3 * k + 1))
                G[-1] = G[0]
                if k > 3:
                    G[1] = G[0]
                Q = G @ G.T
            else:
                Q = gramian(kind, k, seed)
            if Q.trace() > 0:
                yield kind, Q / Q.trace()


@pytest.mark.parametrize("k", range(1, 17))
def test_project_dual_cone_batch_equals_its_rows_solved_one_by_one(k):
    """UPGrad's K projections and DualProj's one, solved in one batch by ``project_dual_cone`` (a verified row kept
    in the batch, a singular one emptied), against each row solved alone by the plain primal–dual steps and their
    fall-backs; float64 and float32 precision. Where ``Q`` is singular the weights need not be unique (the fall-backs
    run on other batches), and ``Q w`` (the ``g_k · d``) is compared instead."""
    rows = 0
    for kind, Q in _solver_gramians(k):
        for precision in (_qp.EPS, float(np.finfo(np.float32).eps)):
            for A in (np.eye(k), np.full((1, k), 1.0 / k)):
                got = _qp.project_dual_cone(Q, A, precision)
                B, size = A @ Q, np.abs(A) @ np.sqrt(Q.diagonal())
                for i in range(A.shape[0]):
                    if k == 2:
                        continue  # two tasks: a closed form, no QP
                    expected = A[i] + _plain_nnqp_row(Q, B[i], size[i], 1000, precision)
                    if kind in ("rank-deficient", "duplicate", "zero-row"):  # w is not unique: Gᵀw is, so is Q w
                        got_i, expected = Q @ got[i], Q @ expected
                    else:
                        got_i = got[i]
                    np.testing.assert_allclose(got_i, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max(), err_msg=kind)
                    rows += 1
    assert k <= 2 or rows > 0
