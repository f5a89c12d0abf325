"""The native Gramian weightings (PCGrad, GradVac, Nash-MTL, ConFIG, IMTL-G, Aligned-MTL) against oracles.

Oracles: torchjd's weightings (PCGrad and GradVac with their visiting order fixed to ours), reference
loops on explicit gradient vectors, torchjd's ConFIG aggregator, and for Nash-MTL the residual of its
equation (with torchjd's cvxpy solution for comparison, where cvxpy is installed). Everything in float64,
on random, conflicting, rank-deficient, duplicate-row, tiny (1e-6) and huge (1e6) gradients, K = 1..16.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
import torchjd.aggregation as jd

from lightning_mtl.balancers import IMTLG, AlignedMTL, ConFIG, GradVac, NashMTL, PCGrad
from lightning_mtl.balancers.nashmtl import ALPHA_LIMIT, relative_residual

HAS_CVXPY = importlib.util.find_spec("cvxpy") is not None
KS = list(range(1, 17))
KINDS = ["random", "conflicting", "rank-deficient", "duplicate", "tiny", "huge"]


def gradients(kind: str, k: int, seed: int = 0, p: int | None = None) -> torch.Tensor:
    """K gradients (float64, K × P) of ``kind``. All but the conflicting ones lie in an open half-space
    (every pairwise combination with nonnegative weights is nonzero), so Nash-MTL has a solution."""
    generator = torch.Generator().manual_seed(1000 * k + seed)
    p = p or 2 * k + 3
    norms = 10 ** (torch.rand(k, 1, generator=generator, dtype=torch.float64) * 2 - 1)
    if kind == "rank-deficient":  # rank min(K, 3), every row with a positive component along the first direction
        rank = min(k, 3)
        basis = torch.linalg.qr(torch.randn(p, rank, generator=generator, dtype=torch.float64))[0].T
        mix = torch.randn(k, rank, generator=generator, dtype=torch.float64)
        mix[:, 0] = mix[:, 0].abs() + 1.0
        return norms * (mix @ basis)
    G = torch.randn(k, p, generator=generator, dtype=torch.float64)
    if kind == "conflicting":
        for i in range(1, k, 2):  # turn every other gradient against the mean of the previous ones
            mean = G[:i].mean(dim=0)
            G[i] = G[i] / G[i].norm() - 1.5 * mean / mean.norm()
    G = norms * G / G.norm(dim=1, keepdim=True)
    if kind == "duplicate" and k >= 2:
        G[k - 1] = G[0]
    if kind == "tiny":
        G = G * 1e-6
    if kind == "huge":
        G = G * 1e6
    return G


def _close(actual: torch.Tensor, expected: torch.Tensor, scale: float, tol: float = 1e-6) -> None:
    """``actual ≈ expected`` to ``tol`` relative to ``scale`` (e.g. the largest gradient norm)."""
    error = (actual - expected).abs().max().item()
    assert error <= tol * scale, f"max error {error:.3g} > {tol:g} x {scale:.3g}"


class _FixedOrder:
    """Stands in for ``torch.randperm`` inside torchjd's PCGrad / GradVac: hands out the orders we drew."""

    def __init__(self, orders: np.ndarray | None, k: int, all_tasks: bool) -> None:
        self.calls = 0
        self.rows = []
        for i in range(k):
            others = [j for j in range(k) if j != i] if orders is None else [int(j) for j in orders[i]]
            if all_tasks:  # PCGrad: a permutation of every task, itself skipped
                self.rows.append(torch.tensor([i] + others))
            else:  # GradVac: positions in the ascending list of the others
                ascending = [j for j in range(k) if j != i]
                self.rows.append(torch.tensor([ascending.index(j) for j in others]))

    def __call__(self, n, *args, **kwargs):
        row = self.rows[self.calls]
        self.calls += 1
        assert row.numel() == n
        return row


def _twin_orders(cls, k: int, calls: int, seed: int = 0) -> list:
    """The visiting orders a fresh ``cls(seed=seed)`` uses on its first ``calls`` calls."""
    twin = cls(seed=seed)
    return [twin.draw_orders(k) for _ in range(calls)]


# ---------------------------------------------------------------------------------------------- PCGrad


def _pcgrad_loop(G: torch.Tensor, orders: np.ndarray | None) -> torch.Tensor:
    """Yu et al. (2020), Algorithm 1, on the gradient vectors themselves."""
    k = G.shape[0]
    total = torch.zeros_like(G[0])
    for i in range(k):
        g = G[i].clone()
        for j in [j for j in range(k) if j != i] if orders is None else orders[i]:
            inner = g @ G[j]
            if inner < 0:
                g = g - inner / (G[j] @ G[j]) * G[j]
        total += g
    return total


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", KS)
def test_pcgrad_equals_the_reference_loop_and_torchjd_under_the_same_order(k, kind, monkeypatch):
    G = gradients(kind, k)
    scale = G.norm(dim=1).max().item()
    orders = _twin_orders(PCGrad, k, 1)[0]
    weights = PCGrad().weights(G @ G.T)
    assert weights.dtype == torch.float64
    _close(G.T @ weights, _pcgrad_loop(G, orders), scale)
    monkeypatch.setattr(torch, "randperm", _FixedOrder(orders, k, all_tasks=True))
    _close(weights, jd.PCGradWeighting()(G @ G.T), 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_pcgrad_two_tasks_is_the_closed_form(kind):
    G = gradients(kind, 2)
    gramian = G @ G.T
    conflict = min(gramian[0, 1].item(), 0.0)
    expected = torch.tensor([1 - conflict / gramian[0, 0].item(), 1 - conflict / gramian[1, 1].item()], dtype=torch.float64)
    _close(PCGrad().weights(gramian), expected, 1.0, 1e-12)
    _close(PCGrad().weights(gramian), jd.PCGradWeighting()(gramian), 1.0)  # any order at K = 2


# --------------------------------------------------------------------------------------------- GradVac


def _gradvac_loop(G: torch.Tensor, targets: np.ndarray, orders: np.ndarray | None, beta: float, eps: float) -> torch.Tensor:
    """Wang et al. (2021), Algorithm 1, on the gradient vectors; ``eps`` relative to the mean squared norm."""
    k = G.shape[0]
    mean_square = (G * G).sum().item() / k
    total = torch.zeros_like(G[0])
    for i in range(k):
        g = G[i].clone()
        for j in [j for j in range(k) if j != i] if orders is None else orders[i]:
            phi = (g @ G[j]).item() / (g.norm().item() * G[j].norm().item() + eps * mean_square)
            target = targets[i, j]
            if phi < target:
                root_phi, root_target = math.sqrt(max(1 - phi**2, 0)), math.sqrt(max(1 - target**2, 0))
                denominator = G[j].norm().item() * root_target + eps * math.sqrt(mean_square)
                g = g + g.norm().item() * (target * root_phi - phi * root_target) / denominator * G[j]
            targets[i, j] = (1 - beta) * target + beta * phi
        total += g
    return total


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", KS)
def test_gradvac_equals_the_reference_loop_over_steps(k, kind):
    balancer, targets = GradVac(beta=0.3), np.zeros((k, k))
    for step, orders in enumerate(_twin_orders(GradVac, k, 3)):
        G = gradients(kind, k, seed=step)
        weights = balancer.weights(G @ G.T)
        _close(G.T @ weights, _gradvac_loop(G, targets, orders, 0.3, 1e-8), G.norm(dim=1).max().item())
        _close(balancer.targets, torch.from_numpy(targets), 1.0, 1e-9)


@pytest.mark.parametrize("kind", ["random", "conflicting", "rank-deficient", "duplicate"])
@pytest.mark.parametrize("k", [2, 3, 5, 9, 16])
def test_gradvac_equals_torchjd_under_the_same_order_at_unit_mean_square(k, kind, monkeypatch):
    """torchjd's eps is absolute; on gradients whose mean squared norm is 1 it means what ours means."""
    ours, theirs = GradVac(beta=0.5), jd.GradVacWeighting(beta=0.5)
    for step, orders in enumerate(_twin_orders(GradVac, k, 3)):
        G = gradients(kind, k, seed=step)
        G = G / ((G * G).sum() / k).sqrt()
        monkeypatch.setattr(torch, "randperm", _FixedOrder(orders, k, all_tasks=False))
        _close(ours.weights(G @ G.T), theirs(G @ G.T), 1.0)


def test_gradvac_keeps_correcting_small_gradients():
    """The former absolute eps (1e-8) shrank the cosines of gradients with norms near 1e-4 and stopped the
    correction; the relative one gives every scale the weights of unit gradients."""
    G = gradients("conflicting", 4)
    reference = GradVac().weights(G @ G.T)
    for scale in (1e-4, 1e-6, 1e-8):
        small = G * scale
        _close(GradVac().weights(small @ small.T), reference, 1.0, 1e-9)


def test_gradvac_eps_guards_a_vanishing_gradient():
    """An exactly opposite pair: the correction zeroes g_1' (its cosine with g_0 is −1, the target above it),
    whose later cosines are then 0/eps: finite."""
    G = gradients("random", 3)
    G[1] = -G[0]
    balancer = GradVac(beta=1.0)
    for _ in range(4):
        assert torch.isfinite(balancer.weights(G @ G.T)).all()
    assert torch.isfinite(balancer.targets).all()


# --------------------------------------------------------------------------------------------- Nash-MTL


def _solvable(kind: str) -> bool:
    return kind != "conflicting"  # the conflicting gradients are generic too, but checked below all the same


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", KS)
def test_nashmtl_solves_its_equation_to_machine_precision(k, kind):
    G = gradients(kind, k)
    gramian = G @ G.T
    weights = NashMTL(max_norm=0.0).weights(gramian)
    assert (weights > 0).all()
    assert weights.max().item() < ALPHA_LIMIT / math.sqrt(torch.linalg.matrix_norm(gramian).item())
    assert relative_residual(gramian.numpy(), weights.numpy()) <= 1e-9
    d = G.T @ weights
    torch.testing.assert_close(d.norm(), torch.tensor(math.sqrt(k), dtype=torch.float64), rtol=1e-9, atol=0)  # ‖d‖² = K
    assert (G @ d > 0).all()  # every task improves


@pytest.mark.skipif(not HAS_CVXPY, reason="torchjd's Nash-MTL needs cvxpy (lightning-mtl[solvers])")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_nashmtl_residual_is_below_torchjds_cvxpy_solution(k, kind):
    """torchjd solves the same equation (normalised by ‖G Gᵀ‖_F inside its programs) by a sequence of cvxpy
    programs, stopped at a residual of 1e-3; it fails outright on the tiny and huge gradients."""
    import warnings

    G = gradients(kind, k)
    gramian = G @ G.T
    ours = NashMTL(max_norm=0.0).weights(gramian).numpy()
    weighting = jd.NashMTL(n_tasks=k, max_norm=0.0).weighting
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weighting(G)
    theirs = np.asarray(weighting.prvs_alpha, dtype=np.float64)
    ours_residual, their_residual = relative_residual(gramian.numpy(), ours), relative_residual(gramian.numpy(), theirs)
    assert ours_residual <= 1e-9 and ours_residual < their_residual, (ours_residual, their_residual)
    if their_residual < 1e-5:  # where cvxpy converged: the same solution, to its precision
        torch.testing.assert_close(torch.from_numpy(ours), torch.from_numpy(theirs), rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 3, 7, 16])
def test_nashmtl_direction_does_not_depend_on_the_scale(k, dtype):
    G = gradients("conflicting", k).to(dtype)
    directions = []
    for scale in (1e-8, 1e-4, 1.0, 1e4, 1e8):
        scaled = G * scale
        weights = NashMTL(max_norm=0.0).weights(scaled @ scaled.T)
        directions.append((scaled.double().T @ weights.double()))
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    for d in directions:  # α ∝ 1/‖g‖: ‖d‖ = √K at every scale
        _close(d, directions[2], math.sqrt(k), tol)


@pytest.mark.parametrize("k", [2, 3, 6, 16])
def test_nashmtl_without_a_solution_is_finite_and_leaves_the_opposed_tasks_alone(k):
    """0 in the convex hull of the gradients (an exactly opposite pair): no solution; the weights are those of
    G Gᵀ + 1e-8 ‖G Gᵀ‖_F I, finite, and the direction improves the others, not the opposed pair."""
    G = gradients("random", k)
    G[1] = -2.0 * G[0]
    weights = NashMTL(max_norm=0.0).weights(G @ G.T)
    assert torch.isfinite(weights).all() and (weights > 0).all()
    d = G.T @ weights
    scale = G.norm(dim=1).max().item()
    assert d.norm().item() <= math.sqrt(k) * 1.01
    assert (G[:2] @ d).abs().max().item() <= 1e-3 * scale * math.sqrt(k)  # the others get ~ scale
    if k > 2:
        assert (G[2:] @ d > 0).all()


def test_nashmtl_gradients_spanning_less_than_the_tasks_and_surrounding_zero():
    G = torch.randn(16, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weights = NashMTL(max_norm=0.0).weights(G @ G.T)
    assert torch.isfinite(weights).all() and (weights > 0).all()
    assert torch.isfinite(G.T @ weights).all()


def test_nashmtl_warm_start_schedule_and_state_round_trip():
    balancer = NashMTL(max_norm=0.0, update_weights_every=2)
    first = balancer.weights(gradients("random", 4, seed=0) @ gradients("random", 4, seed=0).T)
    G = gradients("random", 4, seed=1)
    reused = balancer.weights(G @ G.T)  # not due: the first weights again
    torch.testing.assert_close(reused, first, rtol=0, atol=0)
    state = balancer.state_dict()
    assert set(state["_extra_state"]) == {"warm_start", "solver_step", "weights"}
    resumed = NashMTL(max_norm=0.0, update_weights_every=2)
    resumed.load_state_dict(state)
    for seed in range(2, 6):
        G = gradients("conflicting", 4, seed=seed)
        torch.testing.assert_close(resumed.weights(G @ G.T), balancer.weights(G @ G.T), rtol=0, atol=0)


def test_nashmtl_loads_a_checkpoint_of_the_cvxpy_version():
    """Its extra state had a float32 warm start and a float step count, no weights: the next call solves."""
    balancer = NashMTL(update_weights_every=3)
    balancer.load_state_dict({"_extra_state": {"warm_start": torch.ones(3), "solver_step": 4.0}})
    G = gradients("conflicting", 3)
    weights = balancer.weights(G @ G.T)  # step 4 is not due, but there are no weights to reuse
    torch.testing.assert_close(weights, NashMTL(update_weights_every=3).weights(G @ G.T), rtol=1e-12, atol=0)


def test_nashmtl_absent_task_is_solved_alone_and_leaves_the_state():
    balancer = NashMTL(max_norm=0.0)
    G = gradients("random", 3)
    balancer.weights(G @ G.T)
    before = {key: value.clone() if torch.is_tensor(value) else value for key, value in balancer.get_extra_state().items()}
    absent = G.clone()
    absent[1] = 0
    weights = balancer.weights(absent @ absent.T)
    assert weights[1] == 0
    kept = G[[0, 2]]
    torch.testing.assert_close(weights[[0, 2]], NashMTL(max_norm=0.0).weights(kept @ kept.T), rtol=1e-10, atol=0)
    after = balancer.get_extra_state()
    for key, value in before.items():
        assert torch.equal(after[key], value) if torch.is_tensor(value) else after[key] == value


def test_nashmtl_clips_to_max_norm_and_needs_no_solver(monkeypatch):
    import sys

    for name in ("cvxpy", "ecos"):
        monkeypatch.setitem(sys.modules, name, None)  # no cvxpy, no ecos: an import of either fails
    G = gradients("conflicting", 5)
    d = NashMTL(max_norm=0.5)(G)
    torch.testing.assert_close(d.norm(), torch.tensor(0.5, dtype=torch.float64), rtol=1e-12, atol=0)


def test_nashmtl_optim_niter_bounds_the_newton_iterations():
    G = gradients("conflicting", 10)
    few = NashMTL(max_norm=0.0, optim_niter=1).weights(G @ G.T)
    assert torch.isfinite(few).all() and (few > 0).all()
    assert relative_residual((G @ G.T).numpy(), few.numpy()) > 1e-6  # one iteration is not enough here
    assert relative_residual((G @ G.T).numpy(), NashMTL(max_norm=0.0).weights(G @ G.T).numpy()) <= 1e-12


# -------------------------------------------------------------------------------- ConFIG, IMTL-G, Aligned-MTL


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", KS)
def test_config_equals_torchjds_aggregator_in_float64(k, kind):
    G = gradients(kind, k)
    _close(ConFIG()(G), jd.ConFIG()(G), G.norm(dim=1).max().item())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", KS)
def test_imtlg_and_alignedmtl_equal_torchjd_in_float64(k, kind):
    G = gradients(kind, k)
    gramian = G @ G.T
    for ours, theirs in (
        (IMTLG(), jd.IMTLGWeighting()),
        (AlignedMTL(), jd.AlignedMTLWeighting()),
        (AlignedMTL("median"), jd.AlignedMTLWeighting(scale_mode="median")),
        (AlignedMTL("rmse"), jd.AlignedMTLWeighting(scale_mode="rmse")),
    ):
        expected = theirs(gramian)
        _close(ours.weights(gramian), expected, expected.abs().max().item())


def test_config_in_float32_keeps_float64_accuracy_on_ill_conditioned_rows():
    """Rows of very different norms (1e-3 .. 1e3) at 20–60° from each other: a float32 Gramian, weighted in
    float64, agrees with torchjd's float64 aggregator to the Gramian's own rounding."""
    generator = torch.Generator().manual_seed(0)
    G = torch.randn(4, 12, generator=generator, dtype=torch.float64) + 2.0 * torch.randn(1, 12, generator=generator, dtype=torch.float64)
    G = G * torch.tensor([[1e-3], [1.0], [1e3], [3.0]], dtype=torch.float64)
    weights = ConFIG().weights((G.float() @ G.float().T))
    expected = jd.ConFIG()(G)
    _close(G.T @ weights.double(), expected, expected.norm().item(), 1e-4)


# ------------------------------------------------------------------------------------ every native method

NATIVE = [PCGrad, GradVac, ConFIG, IMTLG, AlignedMTL, NashMTL]


def _build(cls):
    return cls(max_norm=0.0) if cls is NashMTL else cls()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls", NATIVE)
def test_same_direction_at_every_scale(cls, dtype):
    """Each of these methods claims scale invariance: at gradient scales 1e-8 .. 1e8 the direction is the
    same up to its length (GradVac over three steps, its targets evolving)."""
    k = 5
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    reference = None
    for scale in (1e-8, 1e-4, 1.0, 1e4, 1e8):
        balancer = _build(cls)
        directions = []
        for step in range(3 if cls is GradVac else 1):
            G = (gradients("conflicting", k, seed=step) * scale).to(dtype)
            d = G.double().T @ balancer.weights(G @ G.T).double()
            directions.append(d / d.norm())
        if reference is None:
            reference = directions
        for d, expected in zip(directions, reference):
            _close(d, expected, 1.0, tol)


DEGENERATE = {
    "opposite pair": lambda k: torch.cat([gradients("random", k)[:1], -gradients("random", k)[:1], gradients("random", k)[2:]]),
    "all parallel": lambda k: torch.randn(k, 1, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    * gradients("random", k)[:1],
    "more tasks than dimensions": lambda k: torch.randn(k, 2, generator=torch.Generator().manual_seed(k), dtype=torch.float64),
    "zero row": lambda k: torch.cat([gradients("random", k)[:-1], torch.zeros(1, 2 * k + 3, dtype=torch.float64)]),
    "tiny and huge": lambda k: gradients("random", k) * torch.tensor([1e-8] + [1e8] * (k - 1), dtype=torch.float64)[:, None],
}


@pytest.mark.parametrize("case", list(DEGENERATE))
@pytest.mark.parametrize("k", [2, 3, 8])
@pytest.mark.parametrize("cls", NATIVE)
def test_finite_on_degenerate_input(cls, k, case):
    G = DEGENERATE[case](k)
    for dtype in (torch.float32, torch.float64):
        weights = _build(cls).weights((G @ G.T).to(dtype))
        assert torch.isfinite(weights).all(), (case, dtype)
        assert torch.isfinite(G.T @ weights.double()).all()
        if case == "zero row":
            assert weights[-1] == 0


@pytest.mark.parametrize("cls", [PCGrad, GradVac])
def test_seeded_orders_identical_for_the_same_seed_and_resumable(cls):
    k = 6
    G = gradients("conflicting", k)
    first, second, other = cls(seed=3), cls(seed=3), cls(seed=4)
    outputs = [first.weights(G @ G.T) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(outputs, [second.weights(G @ G.T) for _ in range(3)]))
    assert any(not torch.equal(a, b) for a, b in zip(outputs, [other.weights(G @ G.T) for _ in range(3)]))
    resumed = cls(seed=0)
    resumed.load_state_dict(first.state_dict())
    for _ in range(3):
        assert torch.equal(resumed.weights(G @ G.T), first.weights(G @ G.T))


def test_visiting_orders_are_permutations_of_the_others_and_cover_them():
    balancer = PCGrad(seed=0)
    k = 4
    seen = set()
    for _ in range(400):
        orders = balancer.draw_orders(k)
        for i, row in enumerate(orders):
            assert sorted(row.tolist()) == [j for j in range(k) if j != i]
        seen.add(tuple(orders[0].tolist()))
    assert len(seen) == math.factorial(k - 1)  # every order of task 0's three others appears
    assert balancer.draw_orders(2) is None and balancer.draw_orders(1) is None


def test_native_methods_leave_the_global_rng_alone():
    G = gradients("conflicting", 5)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for cls in NATIVE:
        _build(cls)(G)
    torch.testing.assert_close(torch.rand(3), expected)


# ------------------------------------------------------------------------------------------------ GradNorm


def test_gradnorm_host_adam_steps_like_torch_adam_and_resumes_from_its_state():
    """GradNorm's private optimizer: the updates of ``torch.optim.Adam`` on a float32 vector, and a state
    dictionary in its format (loadable by ``torch.optim.Adam`` itself), continued after a round trip."""
    from lightning_mtl.balancers.gradnorm import HostAdam

    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, generator=generator, dtype=torch.float64) for _ in range(20)]
    reference = torch.ones(4)
    adam = torch.optim.Adam([reference], lr=0.025, foreach=False)
    ours, host = np.ones(4, dtype=np.float32), HostAdam(lr=0.025)
    for i, grad in enumerate(grads):
        reference.grad = grad.float()
        adam.step()
        host.step(ours, grad.numpy())
        if i == 9:
            state = host.state_dict()
            twin = torch.optim.Adam([torch.ones(4)], lr=0.025, foreach=False)
            twin.load_state_dict(state)  # torch's own format
            host = HostAdam(lr=1.0)  # the loaded hyper-parameters win, as in torch
            host.load_state_dict(state)
        torch.testing.assert_close(torch.from_numpy(ours), reference, rtol=1e-6, atol=1e-7, msg=f"step {i}")
    assert ours.dtype == np.float32


def test_gradnorm_step_without_any_gradient_leaves_its_state_finite():
    from lightning_mtl.balancers import GradNorm

    balancer = GradNorm()
    balancer.setup(["a", "b"])
    balancer.weights(torch.eye(2), torch.ones(2))
    weights = balancer.weights(torch.zeros(2, 2), torch.zeros(2))
    assert weights.tolist() == [0.0, 0.0]
    state = balancer.get_extra_state()
    assert all(torch.isfinite(value).all() for value in state["optimizer"]["state"][0].values())
    assert torch.isfinite(state["weights"]).all()
