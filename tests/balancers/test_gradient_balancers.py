import contextlib
import math

import numpy as np
import pytest
import torch
import torchjd.aggregation as jd
from torch import Tensor
from torchjd.linalg import QuadprogProjector

from lightning_mtl.balancers import (
    DBMTL, MGDA, AlignedMTL, CAGrad, ConFIG, DualProj, GradDrop, GradNorm, GradVac, IMTLG, MoCo, PCGrad, UPGrad,
)  # fmt: skip

from lightning_mtl.balancers.graddrop import BLOCK_WORDS, ROW_BY_ROW_MIN_COLUMNS, BlockStream, scaled_row_sum, sum_scale

from balancer_helpers import GRADIENT_METHODS, HAS_SOLVERS, direction


def _random_gradients(seed: int, k: int = 4, p: int = 10) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(k, p, generator=generator) * (torch.rand(k, 1, generator=generator) * 5 + 0.1)


def _degenerate_cases() -> dict[str, torch.Tensor]:
    G = _random_gradients(0)
    zero_row, duplicate = G.clone(), G.clone()
    zero_row[1] = 0
    duplicate[2] = duplicate[0]
    return {"one task": G[:1], "zero row": zero_row, "duplicate rows": duplicate, "all zero": torch.zeros(3, 10)}


@pytest.mark.parametrize("case", list(_degenerate_cases()))
@pytest.mark.parametrize("cls", GRADIENT_METHODS)
def test_finite_direction_on_degenerate_input(cls, case):
    G = _degenerate_cases()[case]
    d = direction(cls(), G)
    assert d.shape == (G.shape[1],) and torch.isfinite(d).all()
    if case == "all zero":
        assert (d == 0).all()
    if cls.needs == "gramian":
        weights = cls().weights(G @ G.T, torch.ones(G.shape[0]))
        assert torch.isfinite(weights).all()
        if case == "zero row":
            assert weights[1] == 0


# The paper's guarantee holds for the exact solution, which MGDA, UPGrad and DualProj compute (float64 on
# the host; tests/balancers/test_native_qp.py checks 1e-9 in float64); PCGrad (2 tasks) and ConFIG
# (independent gradients) are exact too. The bound is float32 rounding of G @ d.
NON_CONFLICTING = {MGDA: 1e-6, UPGrad: 1e-6, DualProj: 1e-6, ConFIG: 1e-6, PCGrad: 1e-6}


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("cls", list(NON_CONFLICTING))
def test_non_conflicting(cls, seed):
    k = 2 if cls is PCGrad else 2 + seed % 4
    G = _random_gradients(seed, k=k)
    if seed % 3 == 0:
        G[1] = -0.5 * G[0] + 0.1 * G[1]  # a strong conflict
    d = direction(cls(), G)
    assert (G @ d >= -NON_CONFLICTING[cls] * G.norm(dim=1).max() ** 2).all()


def test_mgda_is_non_conflicting_to_solver_precision():
    G = _random_gradients(5)
    G[1] = -G[0] + 0.2 * G[1]
    d = MGDA()(G)
    assert (G @ d >= -1e-6 * G.norm(dim=1).max() ** 2).all()


# PCGrad, GradVac and GradDrop draw a random order or mask, so reordering the tasks changes the draw;
# GradNorm and DBMTL are equivariant only with their state reordered too (tested fresh here).
PERMUTATION_INVARIANT = [MGDA, UPGrad, DualProj, IMTLG, AlignedMTL, ConFIG, GradNorm, DBMTL]


@pytest.mark.parametrize("cls", PERMUTATION_INVARIANT)
def test_permutation_invariance(cls):
    G = _random_gradients(7, k=5)
    permutation = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(direction(cls(), G[permutation]), direction(cls(), G), rtol=1e-4, atol=1e-4)


# MGDA is left out: torchjd's Frank–Wolfe stops at a step of 1e-3, short of the optimum that ours computes
# (test_native_qp.py checks it against an exact oracle and that it is closer than torchjd's). UPGrad and
# DualProj are exact here; torchjd's are compared without the 1e-4 regularisation of its QP projector.
TORCHJD = {
    IMTLG: jd.IMTLG,
    AlignedMTL: jd.AlignedMTL,
    UPGrad: lambda: jd.UPGrad(projector=QuadprogProjector(reg_eps=0.0)),
    DualProj: lambda: jd.DualProj(projector=QuadprogProjector(reg_eps=0.0)),
    ConFIG: jd.ConFIG,
}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cls", list(TORCHJD))
def test_equals_torchjd(cls, seed):
    G = _random_gradients(seed, k=2 + seed)
    torch.testing.assert_close(cls()(G), TORCHJD[cls]()(G), rtol=1e-4, atol=1e-5)


def _seeds(seed: int, count: int) -> list[int]:
    """The seeds a balancer built with ``seed`` feeds to the global RNG on its first ``count`` calls."""
    generator = torch.Generator().manual_seed(seed)
    return [int(torch.randint(0, 2**62, (1,), generator=generator)) for _ in range(count)]


class _GradDropDraws:
    """The uniforms ``U = (1 − V) / 2`` that ``GradDrop(seed=seed)`` draws on the CPU, call after call, from an
    independent reading of NumPy's SFC64 raw stream, seeded with the first seed the balancer's generator gives:
    each 64-bit word holds four 16-bit draws q (lowest quarter first), V = (q + ½) · 2**-15; a call of width
    ``count`` reads the next ⌈count / 4⌉ words of the current block of max(BLOCK_WORDS, that) words, or of a new
    block when fewer are left."""

    def __init__(self, seed: int) -> None:
        self.stream = np.random.SFC64(_seeds(seed, 1)[0])
        self.block, self.read = np.empty(0, dtype=np.uint64), 0

    def next(self, count: int, dtype: torch.dtype) -> Tensor:
        size = (count + 3) // 4
        if self.read + size > self.block.size:
            self.block, self.read = self.stream.random_raw(max(BLOCK_WORDS, size)), 0
        words = self.block[self.read : self.read + size]
        self.read += size
        shifts = np.arange(4, dtype=np.uint64) * np.uint64(16)
        quarters = ((words[:, None] >> shifts) & np.uint64(0xFFFF)).reshape(-1)[:count].astype(np.int64)
        signed = np.where(quarters >= 2**15, quarters - 2**16, quarters)  # the 16-bit words as two's complement
        v = (signed + 0.5) / 2.0**15  # in (−1, 1), never 0
        return torch.from_numpy((1.0 - v) / 2.0).to(dtype)


@contextlib.contextmanager
def _torch_rand_returns(values: Tensor):
    """Within the block, ``torch.rand`` (which torchjd's GradDrop draws its uniforms with) returns ``values``."""
    original = torch.rand

    def rand(*shape, dtype=None, device=None, **kwargs):
        size = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        assert size == tuple(values.shape), (size, values.shape)
        return values.to(dtype=dtype, device=device)

    torch.rand = rand
    try:
        yield
    finally:
        torch.rand = original


def _torchjd_graddrop(theirs, G: Tensor, draws: _GradDropDraws) -> Tensor:
    """torchjd's GradDrop on ``G`` under the next uniforms of ``draws`` (those ours draws at the same call)."""
    with _torch_rand_returns(draws.next(G.shape[1], G.dtype)):
        return theirs(G)


# PCGrad and GradVac are native and draw their visiting orders from their own generator: they are
# checked against reference loops under the same orders in test_native_weightings.py.
def test_graddrop_equals_torchjd_under_the_same_draws():
    ours, theirs = GradDrop(seed=5), jd.GradDrop()
    draws = _GradDropDraws(5)
    for step in range(4):
        G = _random_gradients(step, k=4)
        torch.testing.assert_close(ours(G), _torchjd_graddrop(theirs, G, draws))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("leak", [0.0, 0.3])
@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_native_graddrop_equals_torchjds_under_the_same_draws(k, leak, dtype):
    """Ours (two passes: S and A) against torchjd's row loop, with leak, zero columns and mixed-sign columns; the
    masks are the same draws, the sums equal to the rounding of S (eps · Σ|g|)."""
    generator = torch.Generator().manual_seed(k)
    G = (torch.randn(k, 3000, generator=generator) * 10 ** torch.randint(-3, 3, (k, 1), generator=generator)).to(dtype)
    G[:, :7] = 0.0  # coordinates without gradient
    G[:, 7:20] = G[:, 7:20].abs()  # one sign only: kept whole or dropped whole
    ours = GradDrop(leak=leak, seed=3)
    theirs = jd.GradDrop(leak=torch.full((k,), leak, dtype=dtype) if leak else None)
    draws = _GradDropDraws(3)
    for _ in range(3):
        got = ours(G)
        expected = _torchjd_graddrop(theirs, G, draws)
        tolerance = 10 * k * torch.finfo(dtype).eps * G.abs().sum(dim=0)
        assert ((got - expected).abs() <= tolerance).all()
        assert (got[:7] == 0).all()


@pytest.mark.parametrize("k", [3, 6])
def test_native_graddrop_equals_torchjds_on_a_matrix_summed_row_by_row(k):
    """From ROW_BY_ROW_MIN_COLUMNS columns on, S / 2 and A / 2 are summed row by row (lerp, then add_): the same
    answer as torchjd's loop under the same draws, to the rounding of S."""
    generator = torch.Generator().manual_seed(k)
    G = torch.randn(k, ROW_BY_ROW_MIN_COLUMNS + 7, generator=generator) * 10 ** torch.randint(-3, 3, (k, 1), generator=generator)
    G[:, :50] = G[:, :50].abs()
    got = GradDrop(seed=4)(G)
    expected = _torchjd_graddrop(jd.GradDrop(), G, _GradDropDraws(4))
    assert ((got - expected).abs() <= 10 * k * torch.finfo(G.dtype).eps * G.abs().sum(dim=0)).all()
    torch.testing.assert_close(got[:50], G[:, :50].sum(dim=0), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_graddrop_stays_finite_where_opposite_components_sum_past_the_range(dtype):
    """Review 2026-12-02: ``lerp`` formed ``b − a`` = ±4e38 for ±2e38 and gave inf where ½ Σ g = 0 (torchjd: ±2e38)."""
    big = torch.finfo(dtype).max / 1.5
    G = torch.tensor([[big, 1.0], [-big, 1.0]], dtype=dtype)
    assert scaled_row_sum(G, 0.5).tolist() == [0.0, 1.0]
    out = GradDrop(seed=0)(G)
    assert torch.isfinite(out).all() and abs(out[0].item()) == big and out[1].item() == 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_graddrop_over_two_rows_near_the_range_gives_the_finite_sign_not_nan(dtype):
    """Review 2026-12-02: three components whose magnitudes sum past twice the dtype's maximum (the positive part
    overflows, the negative one, −2.9e38, does not). ``½ Σ |g_k|`` overflowed and the decision became ``inf − inf``:
    NaN where the negative part was drawn. Summed times ⅛ (``sum_scale(3)``), the result is the drawn part: +inf or
    the negative part exactly."""
    big = torch.finfo(dtype).max / 3.4e38
    G = torch.tensor([[2.7e38], [-2.9e38], [2.4e38]], dtype=torch.float64).mul(big).to(dtype)
    outputs = [GradDrop(seed=seed)(G).item() for seed in range(16)]
    assert all(value == math.inf or value == G[1].item() for value in outputs), outputs
    assert G[1].item() in outputs and math.inf in outputs
    assert [sum_scale(k) for k in (1, 2, 3, 4, 5, 16, 17)] == [0.5, 0.5, 0.125, 0.125, 0.0625, 0.03125, 0.015625]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_graddrop_leak_near_the_range_gives_no_nan(dtype):
    """Review 2026-12-02: ``leak = 1`` computed ``0 · inf`` where the kept part overflowed, and ``0 < leak < 1`` could
    meet ``ℓ S`` and the kept part as ``inf − inf``. Now ``leak = 1`` is the plain sum (exact where it is finite:
    ``m + m − m = m``, where torchjd's row loop overflows), and a leak is mixed in on the sums' scale: with
    ``[m, m, −m, −m, −m, −m]`` and ``ℓ = ¾`` the result is ``¾ S + ¼ P = −m`` or ``¾ S + ¼ N = −2.5 m`` (−inf)."""
    m = torch.finfo(dtype).max * 0.9
    assert GradDrop(leak=1.0, seed=0)(torch.tensor([[m], [m], [-m]], dtype=dtype)).item() == pytest.approx(m, rel=1e-6)
    assert GradDrop(leak=1.0, seed=0)(torch.tensor([[m], [m / 2]], dtype=dtype)).item() == math.inf
    G = torch.tensor([[m], [m], [-m], [-m], [-m], [-m]], dtype=dtype)
    outputs = [GradDrop(leak=0.75, seed=seed)(G).item() for seed in range(12)]
    assert all(value == -math.inf or value == pytest.approx(-m, rel=1e-6) for value in outputs), outputs
    assert -math.inf in outputs and any(math.isfinite(value) for value in outputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 3, 7])
@pytest.mark.parametrize("width", [1000, ROW_BY_ROW_MIN_COLUMNS])
def test_scaled_row_sum_halves_the_sum_and_is_exact_on_one_signed_columns(k, width, dtype):
    """½ Σ_k g_k to about eps · Σ_k |g_k| on both paths (one product, or row by row), and on one-signed columns the
    half sum of the gradients is exactly ± the half sum of their magnitudes (so S = ±A exactly there)."""
    G = torch.randn(k, width, generator=torch.Generator().manual_seed(k), dtype=dtype)
    exact = G.double().sum(dim=0) / 2
    bound = 4 * k * torch.finfo(dtype).eps * G.double().abs().sum(dim=0)
    assert ((scaled_row_sum(G, 0.5).double() - exact).abs() <= bound).all()
    for sign in (1.0, -1.0):
        one_signed = sign * G.abs()
        assert torch.equal(scaled_row_sum(one_signed, 0.5), sign * scaled_row_sum(one_signed.abs(), 0.5))


@pytest.mark.parametrize("cls", [cls for cls in GRADIENT_METHODS if cls.needs == "gramian"])
def test_weights_of_the_gramian_give_the_direction(cls):
    G = _random_gradients(11, k=3)
    losses = torch.tensor([1.0, 2.0, 0.5])
    first, second = cls(), cls()  # identical state and seed
    w = first.weights(G @ G.T, losses)
    torch.testing.assert_close(G.T @ w, second(G, losses))


def test_absent_task_is_left_out_of_a_gramian_weighting():
    G = _random_gradients(3, k=3)
    with_absent = G.clone()
    with_absent[1] = 0
    for cls in (MGDA, UPGrad, IMTLG, ConFIG):
        weights = cls().weights(with_absent @ with_absent.T)
        torch.testing.assert_close(weights[[0, 2]], cls().weights(G[[0, 2]] @ G[[0, 2]].T))
        assert weights[1] == 0


@pytest.mark.parametrize("cls", [cls for cls in GRADIENT_METHODS if cls.needs == "gramian"])
def test_nonzero_read_by_the_caller_gives_the_same_weights(cls):
    """The module passes ``nonzero`` (the diagonal it already read on the host): same weights as without."""
    G = _random_gradients(5, k=3)
    G[1] = 0
    losses = torch.tensor([1.0, 2.0, 0.5])
    expected = cls().weights(G @ G.T, losses)
    got = cls().weights(G @ G.T, losses, nonzero=[True, False, True])
    torch.testing.assert_close(got, expected)
    assert got[1] == 0


SCALE_INVARIANT = [UPGrad, DualProj] + ([CAGrad] if HAS_SOLVERS else [])


@pytest.mark.parametrize("scale", [4e-3, 1e-6])
@pytest.mark.parametrize("cls", SCALE_INVARIANT)
def test_scale_invariant_weightings_keep_their_weights_for_small_gradients(cls, scale):
    """torchjd zeroes a Gramian whose trace is below 1e-4 (every ‖g_k‖ below about 0.007): UPGrad and
    DualProj fell back to the conflicting mean and CAGrad to zero weights. These weightings do not
    depend on the Gramian's scale, so small gradients must give the weights of the unit-scale ones."""
    G = torch.tensor([[1.0, 0.0], [-2.0, 0.3]])  # the mean (-0.5, 0.15) conflicts with task a
    small = G * scale
    expected = cls().weights(G @ G.T)
    weights = cls().weights(small @ small.T)
    torch.testing.assert_close(weights, expected, rtol=1e-4, atol=1e-5)
    assert (weights > 0).all()
    if cls is not CAGrad:  # CAGrad may conflict by design (c > 0); the other two may not
        d = weights @ small
        assert (small @ d >= -NON_CONFLICTING[cls] * small.norm(dim=1).max() ** 2).all()


def test_nonzero_of_the_wrong_length_is_rejected():
    G = _random_gradients(6, k=3)
    with pytest.raises(ValueError, match="nonzero has 2 entries for a 3 x 3 gramian"):
        MGDA().weights(G @ G.T, nonzero=[True, True])


def test_gradvac_keeps_the_targets_of_an_absent_task():
    balancer = GradVac(beta=0.5)
    G = _random_gradients(2, k=3)
    balancer(G)
    before = balancer.targets.clone()
    absent = G.clone()
    absent[2] = 0
    balancer(absent)
    torch.testing.assert_close(balancer.targets[2], before[2])
    torch.testing.assert_close(balancer.targets[:, 2], before[:, 2])
    assert not torch.equal(balancer.targets[:2, :2], before[:2, :2])


def test_random_methods_leave_the_global_rng_alone():
    G = _random_gradients(1)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for cls in (PCGrad, GradVac, GradDrop):
        cls()(G)
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_native_graddrop_in_float16_is_finite_where_torchjds_is(leak):
    """Opposite components whose magnitudes sum past the dtype's range (4e4 − 4e4 in float16): each sign's sum is
    finite, and so is torchjd's result; (S ± A) / 2 computed in the dtype itself gave ±inf."""
    dtype = torch.float16
    G = torch.tensor([[4e4, 1.0, 3.0], [-4e4, -1.0, 2.0]], dtype=dtype)
    ours = GradDrop(leak=leak, seed=3)
    theirs = jd.GradDrop(leak=torch.full((2,), leak, dtype=dtype) if leak else None)
    draws = _GradDropDraws(3)
    for _ in range(5):
        got = ours(G)
        expected = _torchjd_graddrop(theirs, G, draws)
        assert got.dtype == dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("cls", [MoCo, DBMTL])
def test_zero_parameter_gradients_give_an_empty_direction(cls):
    """A K × 0 matrix (no shared parameter): every task absent, as ``(G != 0).any(dim=1)`` said; ``amax`` raised."""
    assert cls()(torch.zeros(3, 0)).shape == (0,)


@pytest.mark.parametrize("purity", [0.02, 0.3, 0.6, 0.97])
def test_graddrop_keeps_the_positive_parts_with_probability_p(purity):
    """Over 400k coordinates of purity P (positive part P, negative part P − 1), the positive part is kept in a
    fraction P of them, within 5 standard deviations; every coordinate gets one sign's part, never both or neither."""
    count = 400_000
    G = torch.stack([torch.full((count,), purity), torch.full((count,), purity - 1.0)]).double()
    out = GradDrop(seed=11)(G)
    positive = out == G[0]
    assert (positive | (out == G[1])).all()
    assert abs(positive.double().mean().item() - purity) <= 5 * (purity * (1 - purity) / count) ** 0.5


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_graddrop_keeps_one_signed_coordinates_whole(sign):
    """P is exactly 1 or 0 there: no draw may tie with it (the uniforms lie strictly inside (0, 1)), so the sum
    passes whole in all of 2M coordinates and 5 calls."""
    G = sign * (torch.rand(3, 2_000_000, generator=torch.Generator().manual_seed(0)) + 0.5)
    balancer = GradDrop(seed=2)
    for _ in range(5):
        torch.testing.assert_close(balancer(G), G.sum(dim=0), rtol=1e-6, atol=0.0)


def test_graddrop_keeps_neither_part_at_a_tie_as_torchjd():
    """A coordinate whose purity P equals its draw U exactly (constructed from the draw): the paper's and torchjd's
    masks keep neither sign there, so the coordinate gives 0 (it gave S/2)."""
    v = (BlockStream(_seeds(0, 1)[0]).integers(1).double() + 0.5) * 2.0**-15
    G = torch.stack([1 - v, -(1 + v)])  # S / A = −V: P = U
    ours = GradDrop(seed=0)(G)
    assert ours.item() == 0.0
    torch.testing.assert_close(ours, _torchjd_graddrop(jd.GradDrop(), G, _GradDropDraws(0)))


@pytest.mark.parametrize("scale", [1e-32, 1e-29, 1.0, 1e29])
def test_graddrop_keeps_one_signed_coordinates_whole_at_extreme_scales(scale):
    """Down to the documented bound (A · V a normal float32 number, A ≳ 1.5e-33) and up to 1e29."""
    G = torch.rand(4, 200_000, generator=torch.Generator().manual_seed(1)) * scale
    torch.testing.assert_close(GradDrop(seed=0)(G), G.sum(dim=0), rtol=1e-6, atol=0.0)


def test_graddrop_bfloat16_sums_past_float32_range_stay_finite():
    """Opposite bfloat16 components near float32's maximum: S ± A overflows float32, not float64."""
    G = torch.tensor([[3e38, 1.0], [-3e38, 2.0]], dtype=torch.bfloat16)
    ours = GradDrop(seed=0)(G)
    assert ours.dtype == torch.bfloat16 and torch.isfinite(ours).all()
    assert ours[0].abs().item() == pytest.approx(3e38, rel=1e-2) and ours[1].item() == 3.0


def test_graddrop_draws_read_blocks_of_the_stream_and_cover_every_integer():
    """A call of width ``count`` reads the next ⌈count / 4⌉ words of the current block (its unused quarters are
    skipped), or a new block when fewer are left (the rest is skipped), so draws depend on the widths of the earlier
    calls, which are the same on every DDP rank; a saved state continues exactly; the integers take all 2**16 values
    of [−2**15, 2**15), each about equally often, with mean −½ (V's mean 0)."""
    stream, reference = BlockStream(7), np.random.SFC64(7).random_raw(2 * BLOCK_WORDS).view(np.int16)
    narrow, wide = stream.integers(3), stream.integers(300_001)  # 1 + 75_001 words of the first block
    assert narrow.dtype == torch.int16 and narrow.tolist() == reference[:3].tolist()
    assert wide.tolist() == reference[4 : 4 + 300_001].tolist()
    saved = stream.state()
    again = stream.integers(300_001)  # does not fit: the second block
    assert again.tolist() == reference[4 * BLOCK_WORDS : 4 * BLOCK_WORDS + 300_001].tolist()
    assert BlockStream.at(saved).integers(300_001).tolist() == again.tolist()
    assert BlockStream.at(stream.state()).integers(5).tolist() == stream.integers(5).tolist()
    wider = BlockStream(7)
    assert wider.integers(4 * BLOCK_WORDS + 5).tolist() == np.random.SFC64(7).random_raw(BLOCK_WORDS + 2).view(np.int16)[: 4 * BLOCK_WORDS + 5].tolist()
    many = BlockStream(9).integers(2**16 * 40).long() + 2**15
    counts = torch.bincount(many, minlength=2**16)
    assert counts.numel() == 2**16 and counts.min() > 0 and counts.max() < 40 + 8 * 40**0.5
    assert abs(wide.double().mean().item() + 0.5) < 5 * 2**15 / (3 * 300_001) ** 0.5


def test_graddrop_continues_its_stream_across_calls_and_a_checkpoint():
    """Call n draws the stream's next words; a loaded state continues at the saved position, and a state saved
    before the first call (or by a release without a stream) seeds it from the restored generator."""
    G = _random_gradients(0, k=3)
    ours, draws = GradDrop(seed=6), _GradDropDraws(6)
    unseeded = GradDrop(seed=6).state_dict()
    del unseeded["_extra_state"]["stream"]  # what a release before 2026-12-02 saved
    for width in (3000, 300_000, 300_000, 7):  # the third call starts a new block
        G = _random_gradients(width, k=3, p=width)
        torch.testing.assert_close(ours(G), _torchjd_graddrop(jd.GradDrop(), G, draws))
    resumed, restarted = GradDrop(seed=99), GradDrop(seed=99)
    resumed.load_state_dict(ours.state_dict())
    restarted.load_state_dict(unseeded)
    assert torch.equal(resumed(G), ours(G))
    assert torch.equal(restarted(G), GradDrop(seed=6)(G))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graddrop_on_cuda_is_reproducible_and_leaves_the_global_rng_alone():
    G = torch.randn(3, 10_000, device="cuda")
    torch.cuda.manual_seed(0)
    expected = torch.rand(3, device="cuda")
    torch.cuda.manual_seed(0)
    first, second = GradDrop(seed=4)(G), GradDrop(seed=4)(G)
    assert torch.equal(first, second)
    torch.testing.assert_close(torch.rand(3, device="cuda"), expected)
    assert ((first - G.clamp(min=0).sum(0)).abs() < 1e-5).logical_or((first - G.clamp(max=0).sum(0)).abs() < 1e-5).all()


def test_graddrop_with_full_leak_is_the_sum():
    G = _random_gradients(6)
    torch.testing.assert_close(GradDrop(leak=1.0)(G), G.sum(dim=0))


def test_random_methods_refuse_devices_whose_generator_they_cannot_control():
    with pytest.raises(NotImplementedError, match="CPU and CUDA"):
        GradDrop()(torch.zeros(2, 3, device="meta"))


def test_solver_methods_equal_torchjd_when_the_solvers_are_installed():
    """Skipped without ``lightning-mtl[solvers]``. CAGrad is not tested for non-conflict: its direction
    maximises the worst task's improvement within a ball around the mean, which can still be negative."""
    pytest.importorskip("cvxpy")
    from lightning_mtl.balancers import CAGrad, NashMTL

    G = _random_gradients(9, k=3)
    torch.testing.assert_close(CAGrad(c=0.4)(G), jd.CAGrad(c=0.4)(G), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(NashMTL()(G), jd.NashMTL(n_tasks=3)(G), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", GRADIENT_METHODS)
def test_half_precision_gradients(cls, dtype):
    """Mixed precision hands half-precision gradients: Gramian weightings run in float32."""
    G = _random_gradients(12, k=3)
    d = direction(cls(), G.to(dtype))
    assert d.dtype == dtype and torch.isfinite(d).all()
    if cls.needs == "gramian":
        assert cls().weights((G @ G.T).to(dtype), torch.ones(3)).dtype == torch.float32


def test_nashmtl_single_task_is_the_clipped_unit_gradient():
    """One task: ‖g‖² α = 1/α gives α = 1/‖g‖, the unit gradient, then clipped to max_norm."""
    from lightning_mtl.balancers import NashMTL

    g = torch.tensor([[3.0, 4.0]])  # norm 5
    torch.testing.assert_close(NashMTL(max_norm=0.5)(g), torch.tensor([0.3, 0.4]))
    torch.testing.assert_close(NashMTL(max_norm=10.0)(g), torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(NashMTL(max_norm=0.0)(g), torch.tensor([0.6, 0.8]))


def test_nonzero_rows_equals_any_nonzero_entry():
    """The fast present-task test of MoCo and DB-MTL: as ``(G != 0).any(dim=1)``, NaN, -0.0 and subnormals included."""
    from lightning_mtl.balancers.base import nonzero_rows

    G = torch.zeros(6, 5)
    G[1, 3] = 1e-45  # the smallest float32 subnormal
    G[2, 0] = float("nan")
    G[3] = -0.0
    G[4, 4] = -2.0
    G[5] = torch.randn(5)
    expected = [False, True, True, False, True, True]
    assert nonzero_rows(G).tolist() == (G != 0).any(dim=1).tolist() == expected
    strided = G.T.contiguous().T  # the other branch: a non-contiguous G
    assert not strided.is_contiguous() and nonzero_rows(strided).tolist() == expected
    G[0, 2], G[3, 1] = float("inf"), float("-inf")  # an infinite entry makes its row present
    assert nonzero_rows(G).tolist() == (G != 0).any(dim=1).tolist() == [True, True, True, True, True, True]
    integers = torch.tensor([[0, -128], [0, 0], [3, 0]], dtype=torch.int8)  # abs(-128) overflows in int8
    for other in (integers, integers.long(), integers != 0):
        for layout in (other, other.T.contiguous().T):
            assert nonzero_rows(layout).tolist() == [True, False, True], (other.dtype, layout.is_contiguous())
