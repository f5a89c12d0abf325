"""Uncertainty weighting (Kendall et al., 2018)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torchjd.scalarization import UW as _TorchjdUW

from lightning_mtl.balancers.base import MaskedScalarizer


class UW(MaskedScalarizer):
    """Uncertainty weighting, from `Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics <https://arxiv.org/abs/1705.07115>`_ (Kendall, Gal & Cipolla, CVPR 2018).

    Each task has a learned log-variance ``s_k`` and the loss is ``Σ_k ½ e^{-s_k} L_k + ½ s_k``
    (the paper's Gaussian-likelihood form, Eq. 7, with ``s = log σ²``; the convention of
    ``torchjd.scalarization.UW``, which this wraps: one ``UW(K)`` over the K losses, with an absent
    task masked out, so that its term, ``½ s_k``, is left out instead of pulling ``s_k`` towards -∞;
    see :class:`~lightning_mtl.balancers.base.MaskedScalarizer`). Some libraries drop the ½
    (``e^{-s}L + s``): same optimum, weights twice as large. The ``s_k`` are one K-vector
    ``nn.Parameter`` (:attr:`log_vars`), initialised to 0, trained by the module's optimizer with the
    model.
    """

    supports_one_task_per_step: ClassVar[bool] = True  # its own learned s_k: each task's term stands alone
    scalarizer_class = _TorchjdUW

    def _weights(self, parameters: dict[str, Tensor]) -> Tensor:
        return 0.5 * torch.exp(-parameters["log_var"])  # ∂/∂L_k of ½ e^{-s_k} L_k + ½ s_k

    @property
    def log_vars(self) -> Tensor:
        """The learned ``s_k = log σ_k²``, one per task."""
        return self.scalarizer.log_var
