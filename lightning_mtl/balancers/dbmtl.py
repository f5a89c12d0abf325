"""DB-MTL: dual-balancing multi-task learning (Lin et al., 2023)."""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from lightning_mtl.balancers._utils import check_range, loaded_copy
from lightning_mtl.balancers.base import GradientBalancer, check_gradient_matrix, nonzero_rows


class DBMTL(GradientBalancer):
    """Dual-balancing multi-task learning, from `Dual-Balancing for Multi-Task Learning
    <https://arxiv.org/abs/2308.12029>`_ (Lin et al., 2023).

    Balances twice. Loss scale: every task loss is replaced by ``log(L_k + ε)``, so ``log_losses`` is
    true and the module passes the gradients of the log-losses. Gradient magnitude: each task keeps
    an EMA of its log-loss gradient, ``ĝ_k ← β ĝ_k + (1 − β) g_k`` (starting at 0), and the direction
    is ``Σ_k (max_j ‖ĝ_j‖ / ‖ĝ_k‖) ĝ_k``: every EMA gradient rescaled to the largest norm, summed.

    The direction is built from the EMA state, not from the step's gradients alone, so it is not a
    Gramian weighting (``needs = "gradients"``). Absent tasks (zero rows) keep their EMA unchanged
    and are left out of the step. The EMA (K × P) is extra state, created at the first call. Native
    (torchjd has no DB-MTL).

    Args:
        beta: EMA rate ``β ∈ [0, 1)``; the paper's default 0.9.
    """

    log_losses: ClassVar[bool] = True
    supports_representation: ClassVar[bool] = False

    fresh_direction: ClassVar[bool] = True  # forward returns a new tensor in every branch

    def __init__(self, beta: float = 0.9) -> None:
        super().__init__()
        self.beta = check_range("beta", beta, 0.0, 1.0, open_high=True)
        self.ema: Optional[Tensor] = None

    def forward(self, G: Tensor) -> Tensor:  # type: ignore[override]
        check_gradient_matrix(G)
        G = G.detach()
        present = nonzero_rows(G).unsqueeze(1)
        if self.ema is None or self.ema.shape != G.shape:
            self.ema = torch.zeros_like(G)
        self.ema.lerp_(G, present.to(G.dtype) * (1 - self.beta))  # in place; absent rows unchanged
        norms = self.ema.norm(dim=1) * present.squeeze(1)
        scales = torch.where(norms > 0, norms.max() / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
        return scales @ self.ema

    def reset(self) -> None:
        self.ema = None

    def get_extra_state(self) -> dict[str, Any]:
        return {"ema": self.ema}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.ema = loaded_copy(state["ema"])
