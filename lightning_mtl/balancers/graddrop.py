"""GradDrop: gradient sign dropout (Chen et al., 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

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

    Native, in a few passes over ``G``: with ``S = Σ_k g_k`` and ``A = Σ_k |g_k|`` per coordinate, the sum of the
    positive components is ``(S + A) / 2`` and of the negative ones ``(S − A) / 2`` (rounding error ``eps · A``, the
    order of the rounding of ``S`` itself). ``torchjd.aggregation.GradDrop`` loops over the K rows with a dozen
    operations each (2–7× slower on a W-MLP step); it stays the test oracle, and both draw ``U`` the same way
    (``torch.rand`` of one value per coordinate, on ``G``'s device), under a seed drawn from the balancer's own
    generator (CPU and CUDA only): the masks are the same. A coordinate where every gradient is 0 gives 0.

    Args:
        leak: fraction ``ℓ ∈ [0, 1]`` of every task gradient that passes unmasked (0 in the paper's
            default; 1 gives the plain sum).
        seed: seed of the balancer's generator.
    """

    def __init__(self, leak: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.leak = check_range("leak", leak, 0.0, 1.0)
        self._init_generator(seed)

    def forward(self, G: Tensor) -> Tensor:  # type: ignore[override]
        check_gradient_matrix(G)
        seed = self.draw_seed()
        if G.shape[0] == 0 or G.shape[1] == 0:
            return torch.zeros(G.shape[1], dtype=G.dtype, device=G.device)
        ones = G.new_ones(G.shape[0])
        total = ones @ G  # sums over the tasks as products: 10x faster than G.sum(dim=0) on a CPU (one thread)
        magnitude = ones @ G.abs()
        side = torch.div(total, magnitude).add_(1.0).mul_(0.5)  # the purity P; NaN where every g_k is 0
        with global_rng(seed, G.device):
            draw = torch.rand(side.shape, dtype=G.dtype, device=G.device)
        side.sub_(draw).sign_().nan_to_num_(0.0)  # +1: keep the positive parts (P > U); -1: the negative; 0: neither
        if G.dtype in (torch.float16, torch.bfloat16):  # S ± A can overflow where each sign's sum does not (±4e4)
            total, magnitude, side = G.sum(dim=0, dtype=torch.float32), G.abs().sum(dim=0, dtype=torch.float32), side.float()
        kept = torch.mul(magnitude, side).add_(total).mul_(0.5)  # (S + A)/2 or (S - A)/2
        return (kept if not self.leak else self.leak * total + (1.0 - self.leak) * kept).to(G.dtype)
