"""IMTL-G: the gradient-balancing half of Impartial Multi-Task Learning (Liu et al., 2021)."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from lightning_mtl.balancers._utils import host_float64, rank_tolerance, symmetric_eigh
from lightning_mtl.balancers.base import GramianBalancer


def imtlg_weights(gramian: np.ndarray, rtol: float) -> np.ndarray:
    """IMTL-G's weights ``w ∝ (G Gᵀ)⁺ ‖g‖``, summing to 1, for the K × K ``gramian`` (no zero diagonal).

    Computed on ``G Gᵀ / tr(G Gᵀ)`` (the weights do not depend on the scale); eigenvalues below
    ``rtol λ_max`` count as zero in the pseudo-inverse. Zero weights where ``‖g‖`` has (almost) no
    component in the range of the Gramian, i.e. no combination has positive equal projections.
    """
    if gramian.shape[0] == 2:
        (a, b), (_, c) = gramian.tolist()
        pair = imtlg_pair(a, b, c, rtol)
        if pair is not None:
            return np.array(pair)
    normalised = gramian / np.trace(gramian)
    norms = np.sqrt(normalised.diagonal())
    values, vectors = symmetric_eigh(normalised)
    keep = values > rtol * values[-1]
    kept = vectors[:, keep]
    v = kept @ ((kept.T @ norms) / values[keep])
    total = float(v.sum())
    if not total > 1e-9 * float(norms @ norms) / values[-1]:
        return np.zeros_like(v)
    return v / total


def imtlg_pair(a: float, b: float, c: float, rtol: float) -> Optional[tuple[float, float]]:
    """:func:`imtlg_weights` for two tasks of full rank, the Gramian ``[[a, b], [b, c]]``, in Python floats, or None where
    it is rank-deficient (λ_min ≥ det / tr > rtol tr ≥ rtol λ_max is the test): ``M⁻¹`` in closed form."""
    if not a * c - b * b > rtol * (a + c) ** 2:
        return None
    root_a, root_c = math.sqrt(a), math.sqrt(c)
    total = (root_a + root_c) * (root_a * root_c - b)
    return (c * root_a - b * root_c) / total, (a * root_c - b * root_a) / total


class IMTLG(GramianBalancer):
    """IMTL-G, from `Towards Impartial Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_
    (Liu et al., ICLR 2021).

    Chooses the combination ``d = Gᵀ w`` (weights summing to 1) whose projections on every task's
    unit gradient are equal, so that no task dominates the step: ``w ∝ (G Gᵀ)⁺ ‖g‖`` (then
    ``G d ∝ ‖g‖``), the pseudo-inverse form of `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_ (as torchjd's ``IMTLGWeighting``), which also covers linearly
    dependent gradients. Native (:func:`imtlg_weights`): float64 on the host, on the trace-normalised
    Gramian, so the weights do not depend on the gradients' scale; eigenvalues below
    ``10 K eps λ_max`` (``eps`` of the Gramian's dtype) count as zero. The loss-balancing half is
    :class:`~lightning_mtl.balancers.IMTLL`.
    """

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        rtol = rank_tolerance(gramian.dtype, gramian.shape[0])
        return torch.from_numpy(imtlg_weights(host_float64(gramian), rtol))

    def _pair_weights(self, a: float, b: float, c: float, dtype: torch.dtype) -> Optional[tuple[float, float]]:
        return imtlg_pair(a, b, c, rank_tolerance(dtype, 2))
