"""ConFIG: conflict-free inverse gradients (Liu et al., 2025)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.balancers.base import GramianBalancer


class ConFIG(GramianBalancer):
    """ConFIG, from `ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks
    <https://arxiv.org/abs/2408.11104>`_ (Liu, Chu & Thuerey, ICLR 2025), Eq. 2.

    The direction has the same cosine with every task gradient: with ``U`` the unit task gradients,
    its unit vector is ``û = U⁺ 1 / ‖U⁺ 1‖``, and its length is ``Σ_k g_kᵀ û``. It conflicts with no
    task when the gradients are linearly independent.

    ConFIG is a Gramian weighting, though torchjd offers it only as an aggregator of the full matrix
    (``torchjd.aggregation.ConFIG``): ``U⁺ 1 = Uᵀ (U Uᵀ)⁺ 1 = Gᵀ b`` with ``D = diag(‖g_k‖)`` and
    ``b = D⁻¹ (D⁻¹ G Gᵀ D⁻¹)⁺ 1``, so ``d = Gᵀ w`` with ``w = b (1ᵀ G Gᵀ b) / (bᵀ G Gᵀ b)``. This class
    implements that weighting (so the module can use the representation Gramian and reduce only a
    K × K matrix over DDP ranks); the tests check it against torchjd's aggregator. The pseudo-inverse
    works in the Gramian's precision, so two gradients within about 2° of each other (in float32)
    count as parallel, where the pseudo-inverse of ``U`` itself would still tell them apart.
    """

    def _weights(self, gramian: Tensor, present: Tensor) -> Tensor:
        inverse_norms = gramian.diagonal().rsqrt()
        unit_gramian = gramian * inverse_norms.unsqueeze(0) * inverse_norms.unsqueeze(1)
        b = inverse_norms * (torch.linalg.pinv(unit_gramian, hermitian=True) @ torch.ones_like(inverse_norms))
        gb = gramian @ b
        squared_norm = b @ gb
        return torch.where(squared_norm > 0, b * gb.sum() / squared_norm.clamp_min(torch.finfo(b.dtype).tiny), 0.0)
