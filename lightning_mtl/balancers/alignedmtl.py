"""Aligned-MTL: independent component alignment (Senushkin et al., 2023)."""

from __future__ import annotations

import math
from typing import Literal, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_mtl.balancers._utils import host_float64, symmetric_eigh
from lightning_mtl.balancers.base import GramianBalancer


def alignedmtl_weights(gramian: np.ndarray, scale_mode: str, rtol: float) -> np.ndarray:
    """Aligned-MTL's weights ``B 1/K`` for the K × K ``gramian``; eigenvalues below ``rtol λ_max`` are dropped."""
    k = gramian.shape[0]
    if k == 2:
        (a, b), (_, c) = gramian.tolist()
        pair = alignedmtl_pair(a, b, c, scale_mode, rtol)
        if pair is not None:
            return np.array(pair)
    values, vectors = symmetric_eigh(gramian)
    keep = values > rtol * values[-1]
    if not keep.any():
        return np.full(k, 1.0 / k)
    values, vectors = values[keep], vectors[:, keep]  # ascending
    if scale_mode == "min":
        scale = values[0]
    elif scale_mode == "median":
        scale = values[(values.size - 1) // 2]  # the lower median, as torch.median
    else:
        scale = values.mean()
    return vectors @ (np.sqrt(scale / values) * vectors.sum(axis=0)) / k


def alignedmtl_pair(a: float, b: float, c: float, scale_mode: str, rtol: float) -> Optional[tuple[float, float]]:
    """:func:`alignedmtl_weights` for two tasks of full rank, the Gramian ``[[a, b], [b, c]]``, in Python floats, or None
    where it is rank-deficient: ``B = √λ M^{-1/2}`` in closed form."""
    determinant, trace = a * c - b * b, a + c
    if not determinant > rtol * trace**2:
        return None
    root = math.sqrt(determinant)  # M^{-1/2} = [[c + root, −b], [−b, a + root]] / (root √(tr + 2 root))
    scale = trace / 2 if scale_mode == "rmse" else determinant / (0.5 * (trace + math.sqrt(trace**2 - 4 * determinant)))
    factor = math.sqrt(scale) / (2.0 * root * math.sqrt(trace + 2.0 * root))
    return factor * (c + root - b), factor * (a + root - b)


class AlignedMTL(GramianBalancer):
    """Aligned-MTL, from `Independent Component Alignment for Multi-Task Learning
    <https://arxiv.org/abs/2305.19000>`_ (Senushkin et al., CVPR 2023), Algorithm 1.

    Rescales the task gradients so that their matrix has condition number 1 (equal singular values,
    the smallest one by default) before averaging them: ``w = B 1/K`` with ``B = √λ V Λ^{-1/2} Vᵀ``
    from the eigendecomposition ``V Λ Vᵀ`` of the Gramian, restricted to its rank (eigenvalues above
    ``K eps λ_max``, ``eps`` of the Gramian's dtype, as in torchjd's ``AlignedMTLWeighting``; a zero
    Gramian gives the mean). Native (:func:`alignedmtl_weights`): float64 on the host. The weights do
    not depend on the gradients' scale.

    Args:
        scale_mode: the common singular value: ``"min"`` (the paper), ``"median"`` (the lower median of
            the eigenvalues) or ``"rmse"`` (their mean).
    """

    def __init__(self, scale_mode: Literal["min", "median", "rmse"] = "min") -> None:
        super().__init__()
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
        self.scale_mode = scale_mode

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        rtol = gramian.shape[0] * torch.finfo(gramian.dtype).eps
        return torch.from_numpy(alignedmtl_weights(host_float64(gramian), self.scale_mode, rtol))

    def _pair_weights(self, a: float, b: float, c: float, dtype: torch.dtype) -> Optional[tuple[float, float]]:
        return alignedmtl_pair(a, b, c, self.scale_mode, 2 * torch.finfo(dtype).eps)
