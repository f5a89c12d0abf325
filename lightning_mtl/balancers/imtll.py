"""IMTL-L: the loss-balancing half of Impartial Multi-Task Learning (Liu et al., 2021)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torchjd.scalarization import IMTLL as _TorchjdIMTLL

from lightning_mtl.balancers.base import MaskedScalarizer


class IMTLL(MaskedScalarizer):
    """IMTL-L, from `Towards Impartial Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_
    (Liu et al., ICLR 2021).

    Each task has a learned scale ``s_k`` and the loss is ``Σ_k e^{s_k} L_k − s_k``: at the optimum
    over ``s_k`` every scaled loss ``e^{s_k} L_k`` equals 1, so all tasks keep the same scale. Wraps
    ``torchjd.scalarization.IMTLL``: one ``IMTLL(K)`` over the K losses, with an absent task masked
    out so that its term (``−s_k``) is left out (see
    :class:`~lightning_mtl.balancers.base.MaskedScalarizer`). The ``s_k`` are one K-vector
    ``nn.Parameter`` (:attr:`log_scales`), initialised to 0, trained by the module's optimizer. The
    gradient-balancing half is :class:`~lightning_mtl.balancers.IMTLG`.
    """

    supports_one_task_per_step: ClassVar[bool] = True  # its own learned s_k: each task's term stands alone
    scalarizer_class = _TorchjdIMTLL

    def _weights(self, parameters: dict[str, Tensor]) -> Tensor:
        return torch.exp(parameters["log_scale"])  # ∂/∂L_k of e^{s_k} L_k − s_k

    @property
    def log_scales(self) -> Tensor:
        """The learned ``s_k``, one per task."""
        return self.scalarizer.log_scale
