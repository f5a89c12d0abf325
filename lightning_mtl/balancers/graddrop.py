"""GradDrop: gradient sign dropout (Chen et al., 2020)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd.aggregation import GradDrop as _TorchjdGradDrop

from lightning_mtl.balancers._utils import Seeded, check_range, global_rng
from lightning_mtl.balancers.base import GradientBalancer, check_gradient_matrix


class GradDrop(Seeded, GradientBalancer):
    """Gradient sign dropout, from `Just Pick a Sign: Optimizing Deep Multitask Models with Gradient
    Sign Dropout <https://arxiv.org/abs/2010.06808>`_ (Chen et al., NeurIPS 2020), Algorithm 1.

    For every coordinate, the positive-sign purity ``P = ½ (1 + Σ_k g_k / Σ_k |g_k|)`` is compared to
    a uniform draw ``U``: if ``P > U`` only the positive task components of that coordinate are kept,
    otherwise only the negative ones; the kept components are summed. The mask acts coordinate by
    coordinate on the gradients' signs, so the result is *not* a combination ``Gᵀ w`` of the task
    gradients and cannot be computed from the Gramian: GradDrop needs the gradients
    (``needs = "gradients"``). The paper applies it to the gradients at a shared activation layer;
    it applies here to whatever gradients the module provides.

    Wraps ``torchjd.aggregation.GradDrop``, which draws ``U`` from the global RNG of ``G``'s device:
    the call runs under a seed drawn from the balancer's own generator (CPU and CUDA only).

    Args:
        leak: fraction ``ℓ ∈ [0, 1]`` of every task gradient that passes unmasked (0 in the paper's
            default; 1 gives the plain sum).
        seed: seed of the balancer's generator.
    """

    def __init__(self, leak: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.leak = check_range("leak", leak, 0.0, 1.0)
        self._init_generator(seed)
        self.aggregator = _TorchjdGradDrop()

    def forward(self, G: Tensor) -> Tensor:  # type: ignore[override]
        check_gradient_matrix(G)
        self.aggregator.leak = torch.full((G.shape[0],), self.leak, dtype=G.dtype, device=G.device) if self.leak else None
        with global_rng(self.draw_seed(), G.device):
            return self.aggregator(G)
