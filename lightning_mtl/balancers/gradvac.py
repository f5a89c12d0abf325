"""GradVac: gradient vaccine (Wang et al., 2021)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torchjd.aggregation import GradVacWeighting

from lightning_mtl.balancers._utils import Seeded, check_range, global_rng, loaded_copy
from lightning_mtl.balancers.base import GramianBalancer


class GradVac(Seeded, GramianBalancer):
    """Gradient vaccine, from `Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models <https://arxiv.org/abs/2010.05874>`_ (Wang et al., ICLR 2021).

    Like :class:`~lightning_mtl.balancers.PCGrad`, but instead of projecting only negative cosines to
    zero it raises the cosine ``φ_ij`` between task i's (modified) gradient and task j's gradient to
    an EMA target ``φ̂_ij ← (1−β) φ̂_ij + β φ_ij`` whenever it falls below it, by adding a multiple of
    ``g_j`` to ``g_i``; the modified gradients are summed. Every quantity involved (norms, cosines,
    the added multiples) is a function of the Gramian, so GradVac *is* a Gramian weighting (its
    state, ``φ̂``, is a K × K matrix, not a gradient).

    Wraps ``torchjd.aggregation.GradVacWeighting``. ``φ̂`` is kept by this class (extra state, so it
    is checkpointed) and handed to torchjd's weighting for each call (through its private
    ``_phi_t``), restricted to the present tasks, so an absent task neither erases nor updates its
    targets. The random visiting order comes from a seed drawn from the balancer's own generator.

    Args:
        beta: EMA rate ``β ∈ [0, 1]`` of the targets.
        eps: guards the divisions by norms.
        seed: seed of the balancer's generator.
    """

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, seed: int = 0) -> None:
        super().__init__()
        check_range("beta", beta, 0.0, 1.0)
        check_range("eps", eps, 0.0)
        self._init_generator(seed)
        self.weighting = GradVacWeighting(beta=beta, eps=eps)
        self.targets: Optional[Tensor] = None  # φ̂, K x K, on CPU

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        k = present.numel()
        if self.targets is None or self.targets.shape[0] != k:
            self.targets = torch.zeros(k, k, dtype=torch.float64)
        index = present.nonzero().squeeze(1).cpu()
        block = (index.unsqueeze(1), index)
        self.weighting._phi_t = self.targets[block].to(gramian.dtype)
        self.weighting._state_key = (index.numel(), gramian.dtype)
        try:
            with global_rng(self.draw_seed(), torch.device("cpu")):
                weights = self.weighting(gramian)
            self.targets[block] = self.weighting._phi_t.to(self.targets.dtype)
        finally:
            self.weighting.reset()
        return weights

    def reset(self) -> None:
        super().reset()
        self.targets = None

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "targets": self.targets}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.targets = loaded_copy(state["targets"])
