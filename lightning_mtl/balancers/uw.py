"""Uncertainty weighting (Kendall et al., 2018)."""

from __future__ import annotations

from torch import Tensor
from torchjd.scalarization import UW as _TorchjdUW

from lightning_mtl.balancers.base import PerTaskScalarizer


class UW(PerTaskScalarizer):
    """Uncertainty weighting, from `Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics <https://arxiv.org/abs/1705.07115>`_ (Kendall, Gal & Cipolla, CVPR 2018).

    Each task has a learned log-variance ``s_k`` and the loss is ``Σ_k ½ e^{-s_k} L_k + ½ s_k``
    (the paper's Gaussian-likelihood form, Eq. 7, with ``s = log σ²``; the convention of
    ``torchjd.scalarization.UW``, which this wraps: one ``UW(1)`` per task, so that an absent task's
    term, ``½ s_k``, is left out instead of pulling ``s_k`` towards -∞). Some libraries drop the
    ½ (``e^{-s}L + s``): same optimum, weights twice as large. The ``s_k`` are ``nn.Parameter`` s,
    initialised to 0, trained by the module's optimizer with the model.
    """

    scalarizer_class = _TorchjdUW

    @property
    def log_vars(self) -> Tensor:
        """The learned ``s_k = log σ_k²``, one per task."""
        return self.scalarizer.log_var
