"""RLW: random loss weighting (Lin et al., 2022)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lightning_mtl.balancers._utils import Seeded, masked_softmax
from lightning_mtl.balancers.base import Balancer


class RLW(Seeded, Balancer):
    """Random loss weighting, from `Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning <https://arxiv.org/abs/2111.10603>`_ (Lin et al., TMLR 2022), Algorithm 2.

    Every step draws ``ε ~ N(0, I_K)`` and weighs the losses by ``softmax(ε)`` over the present
    tasks (weights sum to 1; absent tasks get 0). The draws come from the balancer's own generator
    (``seed``), saved in its extra state: the same on every DDP rank, continued on resume. Native
    rather than ``torchjd.scalarization.Random``, which draws from the global RNG and returns only
    the weighted sum, not the weights.

    Args:
        seed: seed of the balancer's generator.
    """

    forward_changes_state: ClassVar[bool] = True

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self._init_generator(seed)

    def forward(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        draws = torch.randn(losses.shape[0], generator=self.generator).to(losses)
        # The softmax runs over the tasks present on any process (``present`` itself in one process), so that
        # every process uses the same weights: a process without a task's labels would otherwise hand its
        # weight to the others.
        _, seen = self._reduced_losses(losses, present)
        weights = torch.where(present, masked_softmax(draws, seen), 0.0)
        return (weights * losses).sum(), weights
