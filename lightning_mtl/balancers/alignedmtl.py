"""Aligned-MTL: independent component alignment (Senushkin et al., 2023)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor
from torchjd.aggregation import AlignedMTLWeighting

from lightning_mtl.balancers.base import GramianBalancer


class AlignedMTL(GramianBalancer):
    """Aligned-MTL, from `Independent Component Alignment for Multi-Task Learning
    <https://arxiv.org/abs/2305.19000>`_ (Senushkin et al., CVPR 2023), Algorithm 1.

    Rescales the task gradients so that their matrix has condition number 1 (equal singular values,
    the smallest one by default) before averaging them: ``w = B 1/K`` with ``B = √λ_min V Σ^{-1} Vᵀ``
    from the eigendecomposition of the Gramian. Wraps ``torchjd.aggregation.AlignedMTLWeighting``.

    Args:
        scale_mode: the common singular value: ``"min"`` (the paper), ``"median"`` or ``"rmse"``.
    """

    def __init__(self, scale_mode: Literal["min", "median", "rmse"] = "min") -> None:
        super().__init__()
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
        self.weighting = AlignedMTLWeighting(scale_mode=scale_mode)

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        return self.weighting(gramian)
