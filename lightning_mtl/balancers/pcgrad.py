"""PCGrad: projecting conflicting gradients (Yu et al., 2020)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from lightning_mtl.balancers._utils import Seeded, host_float64
from lightning_mtl.balancers.base import GramianBalancer


def pcgrad_weights(gramian: np.ndarray, orders: Optional[np.ndarray]) -> np.ndarray:
    """PCGrad's weights for the K × K ``gramian`` (no zero diagonal), task ``i`` visiting the others in the
    order of row ``i`` of ``orders`` (K × (K − 1); ``None`` for K ≤ 2).

    Task i's projected gradient is kept as coefficients ``c_i`` over the original gradients
    (``g_i^PC = Σ_k c_ik g_k``, ``c_i = e_i`` at first): its inner product with ``g_j`` is ``c_i · (G Gᵀ)_j``
    and projecting out ``g_j`` subtracts ``(c_i · (G Gᵀ)_j) / ‖g_j‖²`` from ``c_ij``. The K tasks are
    independent, so step ``s`` is done for every task at once (its ``s``-th visit); the weights are
    ``Σ_i c_i``. For K = 2 it is the closed form ``w_i = 1 − min(g_1·g_2, 0) / ‖g_i‖²``.
    """
    k = gramian.shape[0]
    if k == 1:
        return np.ones(1)
    if k == 2:
        (a, b), (_, c) = gramian.tolist()
        return np.array(pcgrad_pair(a, b, c))
    coefficients = np.eye(k)
    rows = np.arange(k)
    diagonal = gramian.diagonal()
    for step in range(k - 1):
        visited = orders[:, step]
        inner = np.einsum("ij,ij->i", coefficients, gramian[visited])
        coefficients[rows, visited] -= np.minimum(inner, 0.0) / diagonal[visited]
    return coefficients.sum(axis=0)


def pcgrad_pair(a: float, b: float, c: float) -> tuple[float, float]:
    """:func:`pcgrad_weights` for two tasks, the Gramian ``[[a, b], [b, c]]``, in Python floats: each gradient loses
    its component along the other where they conflict (``b < 0``)."""
    conflict = min(b, 0.0)
    return 1.0 - conflict / a, 1.0 - conflict / c


class PCGrad(Seeded, GramianBalancer):
    """Gradient surgery, from `Gradient Surgery for Multi-Task Learning <https://arxiv.org/abs/2001.06782>`_
    (Yu et al., NeurIPS 2020), Algorithm 1.

    For each task, the other tasks are visited in random order and, whenever the task's (already
    projected) gradient conflicts with another task's gradient (negative inner product), the
    conflicting component is projected out; the projected gradients are summed. Every projection is
    a combination of the original gradients, so the method is a Gramian weighting
    (:func:`pcgrad_weights`): K(K − 1) projections on K-vectors of coefficients, computed natively in
    float64 on the host, exact up to rounding. The weights do not depend on the gradients' scale
    (each projection coefficient is a ratio of Gramian entries).

    Each call draws one seed from the balancer's own generator (deferred at K = 2, where it is not needed; see
    :class:`~lightning_mtl.balancers._utils.Seeded`); the K visiting orders come from it
    (:meth:`~lightning_mtl.balancers._utils.Seeded.draw_orders`), so every DDP rank visits in the same
    order, a resumed run continues the same sequence of orders, and the global RNG is not touched.

    Args:
        seed: seed of the balancer's generator (the visiting orders).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self._init_generator(seed)

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        orders = self.draw_orders(gramian.shape[0])
        return torch.from_numpy(pcgrad_weights(host_float64(gramian), orders))

    def _pair_weights(self, a: float, b: float, c: float, dtype: torch.dtype) -> tuple[float, float]:
        self.draw_orders(2)  # None: two tasks have one visiting order; its seed is deferred as on the general path
        return pcgrad_pair(a, b, c)
