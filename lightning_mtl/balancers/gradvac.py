"""GradVac: gradient vaccine (Wang et al., 2021)."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_mtl.balancers._utils import Seeded, check_range, host_float64, loaded_copy
from lightning_mtl.balancers.base import GramianBalancer


def gradvac_weights(
    gramian: np.ndarray, targets: np.ndarray, orders: Optional[np.ndarray], beta: float, eps: float
) -> np.ndarray:
    """GradVac's weights for the K × K ``gramian`` (no zero diagonal); updates the K × K ``targets`` φ̂ in place.

    Task i's modified gradient ``g_i' = g_i + Σ_j w_ij g_j`` is kept as its inner products with every
    ``g_j`` and its squared norm (adding ``w g_j`` adds ``w (G Gᵀ)_j`` to the products and
    ``2w g_i'·g_j + w² ‖g_j‖²`` to the squared norm): the cosine with ``g_j`` and the correction (Eq. 3)
    follow, and the weights are ``1 + Σ_i w_ij``. Task ``i`` visits the others in the order of row ``i`` of ``orders``
    (``None`` for K ≤ 2); each task only touches its own row of coefficients and of ``targets``, so
    step ``s`` is done for every task at once. The Gramian is first divided by its mean diagonal, which
    changes neither cosines nor corrections: ``eps`` is then relative to the mean squared gradient norm.
    """
    k = gramian.shape[0]
    if k == 1:
        return np.ones(1)
    if k == 2:
        (a, b), (_, c) = gramian.tolist()
        return np.array(gradvac_pair(a, b, c, targets, beta, eps))
    gramian = gramian * (k / np.trace(gramian))
    visits = orders.T  # (K − 1) × K: step s visits task visits[s, i] from row i
    flat = np.arange(k) * k + visits  # the visited entries, as indices into a raveled K × K array
    target = targets.ravel()[flat]  # each entry of φ̂ is read and written once per call
    root_target = np.sqrt(np.maximum(1.0 - target * target, 0.0))
    squared_j = gramian.diagonal()[visits]
    norm_j = np.sqrt(squared_j)
    denominator = norm_j * root_target + eps
    raise_, lower = target / denominator, root_target / denominator  # w = ‖g_i'‖ (raise_ √(1 − φ²) − lower φ)
    cosines, added = [], []
    squared = gramian.diagonal().copy()  # ‖g_i'‖², updated as row i is modified
    products = gramian.copy()  # row i: inner products g_i'·g_j with every g_j
    entries = products.ravel()
    no_change = np.zeros(k)
    for index, visited, norm, goal, up, down, square in zip(flat, visits, norm_j, target, raise_, lower, squared_j):
        dot = entries[index]
        norm_i = np.sqrt(squared)
        phi = dot / (norm_i * norm + eps)
        cosines.append(phi)
        low = phi < goal
        if not low.any():
            added.append(no_change)
            continue
        w = np.where(low, norm_i * (up * np.sqrt(np.maximum(1.0 - phi * phi, 0.0)) - down * phi), 0.0)
        added.append(w)
        products += w[:, None] * gramian[visited]
        squared = np.abs(squared + w * (dot + dot + w * square))
    targets.ravel()[flat] = (1.0 - beta) * target + beta * np.array(cosines)
    return 1.0 + np.bincount(visits.ravel(), weights=np.concatenate(added), minlength=k)


def gradvac_pair(a: float, b: float, c: float, targets: np.ndarray, beta: float, eps: float) -> tuple[float, float]:
    """:func:`gradvac_weights` for two tasks, the Gramian ``[[a, b], [b, c]]``, in Python floats (a NumPy call costs
    about as much as this whole function); updates the 2 × 2 ``targets`` in place."""
    scale = 2.0 / (a + c)  # the Gramian divided by its mean diagonal
    a, b, c = a * scale, b * scale, c * scale
    norm = (math.sqrt(a), math.sqrt(c))
    weights = [1.0, 1.0]
    for i, j in ((0, 1), (1, 0)):
        phi = b / (norm[0] * norm[1] + eps)
        target = float(targets[i, j])
        if phi < target:
            root_phi, root_target = math.sqrt(max(1.0 - phi * phi, 0.0)), math.sqrt(max(1.0 - target * target, 0.0))
            weights[j] += norm[i] * (target * root_phi - phi * root_target) / (norm[j] * root_target + eps)
        targets[i, j] = (1.0 - beta) * target + beta * phi
    return weights[0], weights[1]


class GradVac(Seeded, GramianBalancer):
    """Gradient vaccine, from `Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models <https://arxiv.org/abs/2010.05874>`_ (Wang et al., ICLR 2021), Algorithm 1.

    Like :class:`~lightning_mtl.balancers.PCGrad`, but instead of projecting only negative cosines to
    zero it raises the cosine ``φ_ij`` between task i's (modified) gradient and task j's gradient to
    an EMA target ``φ̂_ij`` whenever it falls below it, by adding a multiple of ``g_j`` to ``g_i``
    (Eq. 3), then updates ``φ̂_ij ← (1−β) φ̂_ij + β φ_ij``; the modified gradients are summed. Every
    quantity involved (norms, cosines, the added multiples) is a function of the Gramian, so GradVac
    *is* a Gramian weighting (:func:`gradvac_weights`, native, float64 on the host); its state, ``φ̂``,
    is a K × K matrix (``targets``, extra state, so it is checkpointed; zero at first, as in the paper).
    A step with absent tasks reads and updates only the present tasks' block of ``φ̂``.

    The weights do not depend on the gradients' scale: the Gramian is divided by its mean diagonal
    ``s² = tr(G Gᵀ)/K`` first, so ``eps`` is *relative*: the cosine is ``g_i·g_j / (‖g_i‖‖g_j‖ + eps s²)``
    and the correction's denominator ``‖g_j‖ √(1 − φ̂²) + eps s``. (With an absolute ``eps``, as in
    torchjd's weighting, gradients with norms below about ``√eps`` had their cosines shrunk towards
    0, and the correction stopped once ``‖g‖ ≲ 1e-4``.) ``eps`` keeps the divisions finite where a
    modified gradient vanishes (an exactly opposite pair) or a target reaches 1.

    Each call draws one seed from the balancer's own generator (deferred at K = 2), from which the visiting orders come
    (:meth:`~lightning_mtl.balancers._utils.Seeded.draw_orders`): the same on every DDP rank,
    continued by a resumed run.

    Args:
        beta: EMA rate ``β ∈ [0, 1]`` of the targets.
        eps: guards the divisions, relative to the gradients' scale (see above).
        seed: seed of the balancer's generator.
    """

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, seed: int = 0) -> None:
        super().__init__()
        self.beta = check_range("beta", beta, 0.0, 1.0)
        self.eps = check_range("eps", eps, 0.0)
        self._init_generator(seed)
        self.targets: Optional[Tensor] = None  # φ̂, K x K float64, on CPU

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        k, size = present.numel(), gramian.shape[0]
        if self.targets is None or self.targets.shape[0] != k:
            self.targets = torch.zeros(k, k, dtype=torch.float64)
        orders = self.draw_orders(size)
        targets = self.targets.numpy()  # shares memory: updated in place
        if size == k:
            return torch.from_numpy(gradvac_weights(host_float64(gramian), targets, orders, self.beta, self.eps))
        block = np.ix_(*(2 * [present.nonzero().squeeze(1).numpy()]))
        sub = targets[block]
        weights = gradvac_weights(host_float64(gramian), sub, orders, self.beta, self.eps)
        targets[block] = sub
        return torch.from_numpy(weights)

    def _pair_weights(self, a: float, b: float, c: float, dtype: torch.dtype) -> tuple[float, float]:
        if self.targets is None or self.targets.shape[0] != 2:
            self.targets = torch.zeros(2, 2, dtype=torch.float64)
        self.draw_orders(2)  # None: two tasks have one visiting order; its seed is deferred as on the general path
        return gradvac_pair(a, b, c, self.targets.numpy(), self.beta, self.eps)

    def reset(self) -> None:
        super().reset()
        self.targets = None

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "targets": self.targets}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        targets = loaded_copy(state["targets"])
        self.targets = None if targets is None else targets.to(torch.float64).contiguous()

