"""Two-task closed forms in Python floats (``GramianBalancer._pair_weights``) against the general path (``_weights``).

``weights()`` takes the closed form when both of two tasks have a nonzero gradient; it must give what the general
(NumPy) path gives on the same Gramian, with the same state afterwards, on every kind of two-task Gramian: random,
conflicting, exactly and almost opposite, orthogonal, parallel and duplicate, norms 1e-5 apart, tiny (1e-6) and huge (1e6)
gradients, in float64 and float32. Where the general path's own two-task branch calls the same float function (MGDA,
PCGrad, UPGrad, DualProj, CAGrad, GradVac, SDMGrad's inner steps, FairGrad's Newton iterations, Nash-MTL,
IMTL-G, Aligned-MTL, ConFIG), these tests check what is around it (the trace
normalisation, the state, the dtype, the routing); the math itself is checked through ``weights()`` against torchjd
and exact solvers in ``test_native_qp.py``, ``test_native_weightings.py`` and ``test_new_methods.py`` (each of
those functions, altered, fails them).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_mtl.balancers import (
    BALANCERS,
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    FairGrad,
    GradVac,
    NashMTL,
    PCGrad,
    SDMGrad,
    UPGrad,
)
from lightning_mtl.balancers.base import GramianBalancer

#: The methods with a two-task closed form, with settings that take each of their branches.
PAIRED = {
    "mgda": MGDA,
    "pcgrad": PCGrad,
    "upgrad": UPGrad,
    "dualproj": DualProj,
    "cagrad": CAGrad,
    "cagrad-c0": lambda: CAGrad(c=0.0),
    "cagrad-c0.9": lambda: CAGrad(c=0.9),
    "cagrad-c5-eps0": lambda: CAGrad(c=5.0, norm_eps=0.0),
    "gradvac": GradVac,
    "gradvac-beta0.01": lambda: GradVac(beta=0.01),
    "sdmgrad": SDMGrad,
    "sdmgrad-lam0": lambda: SDMGrad(lam=0.0, num_iters=3),
    "sdmgrad-os2": lambda: SDMGrad(num_sampled=2),
    "fairgrad": FairGrad,
    "fairgrad-alpha0.3": lambda: FairGrad(alpha=0.3),
    "fairgrad-alpha4": lambda: FairGrad(alpha=4.0),
    "nashmtl": NashMTL,
    "nashmtl-every3-unclipped": lambda: NashMTL(update_weights_every=3, max_norm=0.0),
    "imtlg": IMTLG,
    "alignedmtl": AlignedMTL,
    "alignedmtl-min": lambda: AlignedMTL(scale_mode="min"),
    "config": ConFIG,
}


def _pair(kind: str, seed: int) -> torch.Tensor:
    """Two gradients (float64, 2 × 6) of ``kind``."""
    generator = torch.Generator().manual_seed(seed)
    g1, g2 = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    if kind == "conflicting":
        g2 = g2 / g2.norm() - 1.5 * g1 / g1.norm()
    elif kind == "opposite":
        g2 = -2.0 * g1
    elif kind == "orthogonal":
        g2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    elif kind == "parallel":
        g2 = 3.0 * g1
    elif kind == "duplicate":
        g2 = g1.clone()
    elif kind == "far-apart":
        g2 = 1e-5 * g2
    elif kind == "almost-opposite":  # 1 + cos ≈ 1e-7: singular for a float32 Gramian's tolerance, not for float64's
        across = g2 - (g2 @ g1) / (g1 @ g1) * g1
        g2 = -g1 + 4.5e-4 * g1.norm() * across / across.norm()
    elif kind == "opposed-common":  # nearly opposite, with a small shared component
        common = g2 / g2.norm()
        g2 = -g1 + 0.01 * g1.norm() * common
        g1 = g1 + 0.01 * g1.norm() * common
    G = torch.stack([g1, g2])
    return G * {"tiny": 1e-6, "huge": 1e6}.get(kind, 1.0)


KINDS = [
    "random", "conflicting", "opposite", "almost-opposite", "orthogonal", "parallel", "duplicate", "far-apart",
    "opposed-common", "tiny", "huge",
]


def test_the_paired_methods_are_those_that_override_the_closed_form():
    overriding = {
        cls for cls in BALANCERS.values()
        if isinstance(cls, type) and issubclass(cls, GramianBalancer) and cls._pair_weights is not GramianBalancer._pair_weights
    }
    assert overriding == {MGDA, PCGrad, UPGrad, DualProj, CAGrad, GradVac, SDMGrad, FairGrad, NashMTL, IMTLG, AlignedMTL, ConFIG}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(PAIRED))
def test_closed_form_equals_the_general_path_call_after_call(name, dtype):
    """One balancer through ``weights`` (the closed form) and a twin through ``_weights`` (the general path), over
    every kind of Gramian twice in a row (stateful methods carry their state across): equal weights to 1e-12 of their
    size, and equal state at the end."""
    paired, general = PAIRED[name](), PAIRED[name]()
    mask = torch.tensor([True, True])
    for round_ in range(2):
        for index, kind in enumerate(KINDS):
            G = _pair(kind, 10 * round_ + index)
            gramian = (G @ G.T).to(dtype)
            got = paired.weights(gramian)
            expected = general._weights(gramian, mask).to(got.dtype)
            assert got.dtype == dtype and got.shape == (2,)
            scale = max(expected.abs().max().item(), 1.0)
            assert (got - expected).abs().max().item() <= 1e-12 * scale * (1 if dtype == torch.float64 else 1e5), (kind, got, expected)
    _same_state(paired.state_dict(), general.state_dict())
    if isinstance(paired, (PCGrad, GradVac)):  # one seed per call on either path, as before 2026-12-02 (deferred)
        old = torch.Generator().manual_seed(0)
        for _ in range(2 * len(KINDS)):
            torch.randint(0, 2**62, (1,), generator=old)
        assert torch.equal(paired.state_dict()["_extra_state"]["generator"], old.get_state())


def _same_state(got, expected) -> None:
    """Equal states: tensors and arrays to 1e-12, everything else exactly."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            _same_state(got[key], expected[key])
    elif isinstance(expected, (torch.Tensor, np.ndarray)):
        torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(expected), rtol=1e-12, atol=0)
    else:
        assert got == expected


@pytest.mark.parametrize("name", ["mgda", "upgrad", "cagrad", "gradvac", "sdmgrad"])
def test_half_precision_gramians_give_float32_weights_from_the_closed_form(name):
    G = _pair("conflicting", 3)
    gramian = (G @ G.T).to(torch.bfloat16)
    got, expected = PAIRED[name]().weights(gramian), PAIRED[name]()._weights(gramian.float(), torch.tensor([True, True]))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-7)


def test_entries_given_by_the_caller_are_used_without_reading_the_gramian():
    """The module passes the entries it has read; the closed form takes them (here different from the tensor's, to
    show which are used), and a zero diagonal entry or ``nonzero`` with a False goes to the general path."""
    G = _pair("conflicting", 4)
    gramian = G @ G.T
    other = _pair("random", 5)
    entries = (other @ other.T).reshape(-1).tolist()
    symmetric = 0.5 * (entries[1] + entries[2])
    expected = MGDA()._pair_weights(entries[0], symmetric, entries[3], torch.float64)
    assert MGDA().weights(gramian, entries=entries).tolist() == list(expected)
    one_task = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    assert MGDA().weights(one_task).tolist() == [1.0, 0.0]
    assert MGDA().weights(gramian, nonzero=[True, False]).tolist() == [1.0, 0.0]


def test_a_subclass_that_overrides_weights_alone_keeps_its_weights_at_two_tasks():
    """Review 2026-12-02: a user's MGDA with a floor in ``_weights`` lost it at K = 2 (the inherited closed form ran)."""

    class FlooredMGDA(MGDA):
        def _weights(self, gramian, present):
            return super()._weights(gramian, present).clamp(min=0.4)

    gramian = torch.diag(torch.tensor([1.0, 100.0], dtype=torch.float64))
    assert FlooredMGDA().weights(gramian).tolist() == [0.9900990099009901, 0.4]


@pytest.mark.parametrize("name", list(PAIRED))
def test_a_nonzero_of_the_wrong_length_is_refused_at_two_tasks(name):
    gramian = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    for nonzero in ([True], [True, True, True], []):
        with pytest.raises(ValueError, match=f"nonzero has {len(nonzero)} entries for a 2 x 2 gramian"):
            PAIRED[name]().weights(gramian, nonzero=nonzero)


def test_off_diagonal_entries_that_differ_by_rounding_are_given_their_mean():
    """A float32 product may round ``g_1·g_2`` and ``g_2·g_1`` apart: the closed form takes their mean (not one of
    them), and an exactly symmetric pair as it is, even near float64's maximum (where the mean of the sum overflowed)."""
    entries = [2.0, -0.5000001, -0.4999999, 1.0]
    expected = MGDA()._pair_weights(2.0, -0.5, 1.0, torch.float64)
    torch.testing.assert_close(MGDA().weights(torch.eye(2, dtype=torch.float64), entries=entries), torch.tensor(expected, dtype=torch.float64))
    huge = 1.7e308
    assert PCGrad().weights(torch.tensor([[huge, -huge], [-huge, huge]], dtype=torch.float64)).tolist() == [2.0, 2.0]


def test_nashmtl_closed_form_scales_without_under_or_overflow():
    """Review 2026-12-02: ``√(a² + 2b² + c²)`` underflowed to 0 for entries around 1e-170 (division by zero)."""
    for scale in (1e-170, 1e150):
        gramian = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64) * scale
        weights = NashMTL(max_norm=0.0).weights(gramian)
        direction = weights @ gramian @ weights  # ‖Gᵀα‖² = K at the solution
        assert math.isclose(float(direction), 2.0, rel_tol=1e-12)
