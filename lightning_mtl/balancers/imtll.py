"""IMTL-L: the loss-balancing half of Impartial Multi-Task Learning (Liu et al., 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn
from torchjd.scalarization import IMTLL as _TorchjdIMTLL

from lightning_mtl.balancers._utils import scalarize
from lightning_mtl.balancers.base import Balancer


class IMTLL(Balancer):
    """IMTL-L, from `Towards Impartial Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_
    (Liu et al., ICLR 2021).

    Each task has a learned scale ``s_k`` and the loss is ``Σ_k e^{s_k} L_k − s_k``: at the optimum
    over ``s_k`` every scaled loss ``e^{s_k} L_k`` equals 1, so all tasks keep the same scale. Wraps
    ``torchjd.scalarization.IMTLL``, one ``IMTLL(1)`` per task so that an absent task's term
    (``−s_k``) is left out. The ``s_k`` are ``nn.Parameter`` s, initialised to 0, trained by the
    module's optimizer. The gradient-balancing half is :class:`~lightning_mtl.balancers.IMTLG`.
    """

    def setup(self, task_names: Sequence[str], task_weights: Optional[Sequence[float]] = None) -> None:
        super().setup(task_names, task_weights)
        self.terms = nn.ModuleList(_TorchjdIMTLL(1) for _ in self.task_names)

    def forward(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        self._require_setup(losses)

        def objective(values: Tensor) -> Tensor:
            terms = torch.stack([term(values[k : k + 1]) for k, term in enumerate(self.terms)])
            return (terms * present.to(terms.dtype)).sum()

        return scalarize(objective, losses)

    @property
    def log_scales(self) -> Tensor:
        """The learned ``s_k``, one per task."""
        return torch.cat([term.log_scale for term in self.terms])

    def reset(self) -> None:
        for term in self.terms:
            term.reset()
