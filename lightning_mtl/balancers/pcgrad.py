"""PCGrad: projecting conflicting gradients (Yu et al., 2020)."""

from __future__ import annotations

from torch import Tensor
from torchjd.aggregation import PCGradWeighting

from lightning_mtl.balancers._utils import Seeded, global_rng
from lightning_mtl.balancers.base import GramianBalancer


class PCGrad(Seeded, GramianBalancer):
    """Gradient surgery, from `Gradient Surgery for Multi-Task Learning <https://arxiv.org/abs/2001.06782>`_
    (Yu et al., NeurIPS 2020), Algorithm 1.

    For each task, the other tasks are visited in random order and, whenever the task's (already
    projected) gradient conflicts with another task's gradient (negative inner product), the
    conflicting component is projected out; the projected gradients are summed. Every projection is
    a combination of the original gradients, so the method is a Gramian weighting. Wraps
    ``torchjd.aggregation.PCGradWeighting``, which shuffles with the global RNG: the call runs under
    a seed drawn from the balancer's own generator (see :class:`~lightning_mtl.balancers._utils.Seeded`).

    Args:
        seed: seed of the balancer's generator (the visiting orders).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self._init_generator(seed)
        self.weighting = PCGradWeighting()

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        with global_rng(self.draw_seed(), gramian.device):
            return self.weighting(gramian)
