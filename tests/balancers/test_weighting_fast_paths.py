"""The fast paths of the Gramian weightings (issue 14's call budget) against their general forms.

Each special case (two tasks in scalars, an affine step on a fixed support, a Python loop instead of NumPy calls)
must compute what the general code computes, to rounding: checked on random, conflicting, rank-deficient,
zero-row, tiny-norm (1e-6) and huge-norm (1e6) Gramians.
"""

import numpy as np
import pytest

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
