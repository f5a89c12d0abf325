"""ConFIG: conflict-free inverse gradients (Liu et al., 2025)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lightning_mtl.balancers._utils import host_float64, rank_tolerance, symmetric_eigh
from lightning_mtl.balancers.base import GramianBalancer


def config_weights(gramian: np.ndarray, rtol: float) -> np.ndarray:
    """ConFIG's weights for the K × K ``gramian`` (no zero diagonal); eigenvalues of the unit Gramian below
    ``rtol λ_max`` count as zero in its pseudo-inverse.

    Zero weights where ``U⁺ 1`` vanishes (``1`` has almost no component, at most ``√rtol ‖1‖``, in the
    range of the unit Gramian, e.g. two opposite gradients): no direction has the same positive cosine
    with every gradient, and ``U⁺ 1 / ‖U⁺ 1‖`` would be the direction of rounding errors.
    """
    k = gramian.shape[0]
    if k == 2:
        (a, b), (_, c) = gramian.tolist()
        return np.array(config_pair(a, b, c, rtol))
    inverse_norms = 1.0 / np.sqrt(gramian.diagonal())
    values, vectors = symmetric_eigh(gramian * inverse_norms[:, None] * inverse_norms[None, :])
    keep = values > rtol * values[-1]
    vectors = vectors[:, keep]
    coordinates = vectors.sum(axis=0)  # of 1 on the eigenvectors kept
    if not float(coordinates @ coordinates) > rtol * k:
        return np.zeros(k)
    b = inverse_norms * (vectors @ (coordinates / values[keep]))
    gb = gramian @ b
    squared_norm = float(b @ gb)
    if not squared_norm > 0:
        return np.zeros_like(b)
    return b * (gb.sum() / squared_norm)


def config_pair(a: float, b: float, c: float, rtol: float) -> tuple[float, float]:
    """K = 2 in closed form, the Gramian ``[[a, b], [b, c]]``, in Python floats: ``1`` is an eigenvector of the unit
    Gramian ``[[1, c], [c, 1]]`` (eigenvalue ``1 + c``), so ``b ∝ D⁻¹ 1`` unless ``1 + c`` is dropped (opposite
    gradients: zero weights)."""
    root_a, root_c = math.sqrt(a), math.sqrt(c)
    cosine = b / (root_a * root_c)
    if not 1.0 + cosine > rtol * (1.0 + abs(cosine)):
        return 0.0, 0.0
    # w = v (1ᵀ G Gᵀ v) / (vᵀ G Gᵀ v) with v = (1/‖g_1‖, 1/‖g_2‖): vᵀ G Gᵀ v = 2 (1 + c)
    total = root_a + root_c + b * (1.0 / root_a + 1.0 / root_c)
    factor = total / (2.0 * (1.0 + cosine))
    return factor / root_a, factor / root_c


class ConFIG(GramianBalancer):
    """ConFIG, from `ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks
    <https://arxiv.org/abs/2408.11104>`_ (Liu, Chu & Thuerey, ICLR 2025), Eq. 2.

    The direction has the same cosine with every task gradient: with ``U`` the unit task gradients,
    its unit vector is ``û = U⁺ 1 / ‖U⁺ 1‖``, and its length is ``Σ_k g_kᵀ û``. It conflicts with no
    task when the gradients are linearly independent.

    ConFIG is a Gramian weighting, though torchjd offers it only as an aggregator of the full matrix
    (``torchjd.aggregation.ConFIG``): ``U⁺ 1 = Uᵀ (U Uᵀ)⁺ 1 = Gᵀ b`` with ``D = diag(‖g_k‖)`` and
    ``b = D⁻¹ (D⁻¹ G Gᵀ D⁻¹)⁺ 1``, so ``d = Gᵀ w`` with ``w = b (1ᵀ G Gᵀ b) / (bᵀ G Gᵀ b)``. This class
    implements that weighting (:func:`config_weights`; the module can then use the representation
    Gramian and reduce only a K × K matrix over DDP ranks) natively, in float64 on the host: the same
    steps in float32 lost up to 2e-3 (relative) on ill-conditioned rows. The tests check it against
    torchjd's aggregator in float64. The weights do not depend on the gradients' scale (the direction
    scales with them).

    The pseudo-inverse of the unit Gramian drops eigenvalues below ``10 K eps λ_max``, ``eps`` being
    the rounding of the Gramian's dtype (:func:`~lightning_mtl.balancers._utils.rank_tolerance`):
    below that an eigenvalue is the Gramian's own rounding. The Gramian holds squared quantities, so
    from a float32 Gramian two gradients within about ``√(10 K eps)`` radians (0.1° at K = 2) of each
    other count as parallel, where the pseudo-inverse of ``U`` itself would still tell them apart;
    duplicate or linearly dependent gradients are handled as in ``U⁺`` (the dependent directions get
    no weight of their own). Where ``U⁺ 1 = 0`` (e.g. two exactly opposite gradients, or parallel ones
    of balanced signs) no direction has the same positive cosine with every gradient and the weights
    are zero (the unit vector of ``U⁺ 1`` would be that of rounding errors).
    """

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        rtol = rank_tolerance(gramian.dtype, gramian.shape[0])
        return torch.from_numpy(config_weights(host_float64(gramian), rtol))

    def _pair_weights(self, a: float, b: float, c: float, dtype: torch.dtype) -> tuple[float, float]:
        return config_pair(a, b, c, rank_tolerance(dtype, 2))
