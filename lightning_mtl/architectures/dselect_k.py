"""DSelect-k: differentiable top-k selection of experts per task (Hazimeh et al., 2021)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_mtl.architectures.base import (
    MultiTaskBackbone,
    check_positive_int,
    check_widths,
    expert_network,
    flatten_input,
)


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """Cubic smooth-step: 0 below ``-gamma/2``, 1 above ``gamma/2``, ``-2t³/γ³ + 3t/(2γ) + 1/2`` between."""
    cubic = -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


class _DSelectKGate(nn.Module):
    """``k`` single-expert selectors on a smooth-step binary encoding, combined by a softmax."""

    def __init__(self, in_features: int, num_experts: int, k: int, gamma: float, per_example: bool) -> None:
        super().__init__()
        self.k, self.gamma, self.per_example = k, gamma, per_example
        self.num_bits = math.ceil(math.log2(num_experts))
        codes = [[(expert >> bit) & 1 for bit in reversed(range(self.num_bits))] for expert in range(num_experts)]
        self.register_buffer("codes", torch.tensor(codes, dtype=torch.bool), persistent=False)  # (n, m)
        bound = gamma / 100  # near the middle of the smooth step, where gradients flow (as the authors do)
        if per_example:
            self.z = nn.Linear(in_features, k * self.num_bits)
            nn.init.uniform_(self.z.weight, -bound, bound)
            nn.init.uniform_(self.z.bias, -bound, bound)
            self.w = nn.Linear(in_features, k)
        else:
            self.z_logits = nn.Parameter(torch.empty(k, self.num_bits).uniform_(-bound, bound))
            self.w_logits = nn.Parameter(torch.zeros(k))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(expert weights (B, n), selector outputs (B, k, n))``."""
        if self.per_example:
            z = self.z(x).float().view(-1, self.k, self.num_bits)
            w = self.w(x).float()
        else:
            z = self.z_logits.float().expand(x.shape[0], -1, -1)
            w = self.w_logits.float().expand(x.shape[0], -1)
        s = smooth_step(z, self.gamma).unsqueeze(2)  # (B, k, 1, m)
        selectors = torch.where(self.codes, s, 1 - s).prod(dim=-1)  # (B, k, n)
        weights = (torch.softmax(w, dim=-1).unsqueeze(-1) * selectors).sum(dim=1)
        return weights, selectors


class DSelectK(MultiTaskBackbone):
    """Shared experts with one DSelect-k gate per task: a differentiable, sparse top-k mixture.

    Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong & Chi (2021), "DSelect-k:
    Differentiable Selection in the Mixture of Experts with Applications to Multi-Task Learning",
    NeurIPS. Each task's gate holds ``k`` *single-expert selectors*; selector ``i`` has ``m =
    ceil(log2 num_experts)`` logits ``zᵢ`` whose smooth-steps ``S(zᵢ)`` (cubic, zero/one outside
    ``[-γ/2, γ/2]``) act as relaxed bits of a binary code: expert ``l`` gets weight
    ``rᵢ,ₗ = Πⱼ (S(zᵢⱼ) if bit j of l is 1 else 1 - S(zᵢⱼ))``. The task's mixture weights are
    ``Σᵢ softmax(α)ᵢ rᵢ``: non-negative, summing to 1, with at most ``k`` non-zeros once the
    smooth-steps reach 0/1. With ``per_example=True`` (the paper's per-example gating) ``z`` and
    ``α`` are linear in the input; otherwise they are free parameters (task-only gating).

    Regularisers, returned by :meth:`regularization_losses` (``MultiTaskModule`` adds them to the
    training loss and logs them as ``train/{name}``):

    - ``dselect_k_entropy``: ``entropy_regularization`` × the mean over the batch of the selectors'
      entropies, summed over tasks and selectors (the paper's optional regulariser, which speeds up
      convergence to a binary selection); left out when 0.
    - ``dselect_k_reachability``: only when ``num_experts`` is not a power of two, the mean over the
      batch of ``Σᵢ 1 / Σₗ rᵢ,ₗ`` over the reachable experts, summed over tasks, so that no selector
      settles on a code of no expert (as the authors' implementation does). The weights then sum to 1
      only once each selector puts all its mass on real experts.

    Args:
        in_features: size of the (flattened) input.
        expert_features: output size of every expert (MLP with ReLU).
        num_experts: number of shared experts, at least 2.
        tasks: task names, the same as the ``MultiTaskModule``'s.
        k: number of selectors per task, the most experts a task ends up using (``1 <= k <= num_experts``).
        expert_hidden: hidden widths inside each expert.
        gamma: width of the smooth-step's cubic region.
        entropy_regularization: weight of the entropy regulariser (0: off).
        per_example: per-example gates (True) or task-only gates (False).

    Attributes:
        last_gate_weights: ``{"{task}/gate": (batch, num_experts)}`` of the last forward, detached.
    """

    def __init__(
        self,
        in_features: int,
        expert_features: int,
        num_experts: int,
        tasks: Sequence[str],
        k: int = 2,
        expert_hidden: Sequence[int] = (),
        gamma: float = 1.0,
        entropy_regularization: float = 0.0,
        per_example: bool = True,
    ) -> None:
        super().__init__(tasks)
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("expert_features", expert_features)
        check_positive_int("num_experts", num_experts)
        if num_experts < 2:
            raise ValueError(f"`num_experts` must be at least 2 for a selection, got {num_experts}.")
        check_positive_int("k", k)
        if k > num_experts:
            raise ValueError(f"`k` must be at most `num_experts` ({num_experts}), got {k}.")
        if not gamma > 0:
            raise ValueError(f"`gamma` must be positive, got {gamma!r}.")
        if not entropy_regularization >= 0:
            raise ValueError(f"`entropy_regularization` must be >= 0, got {entropy_regularization!r}.")
        hidden = check_widths("expert_hidden", expert_hidden)
        self.num_experts, self.k = num_experts, k
        self.entropy_regularization = float(entropy_regularization)
        self.power_of_two = num_experts & (num_experts - 1) == 0
        self.experts = nn.ModuleList(expert_network(in_features, hidden, expert_features) for _ in range(num_experts))
        self.gates = nn.ModuleDict(
            {task: _DSelectKGate(in_features, num_experts, k, float(gamma), per_example) for task in self.tasks}
        )
        self.last_gate_weights: dict[str, Tensor] = {}
        self.gate_expert_names = {f"{task}/gate": [f"expert_{i}" for i in range(num_experts)] for task in self.tasks}
        self._regularization: dict[str, Tensor] = {}

    def task_modules(self) -> Mapping[str, nn.Module]:
        return dict(self.gates.items())

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = flatten_input(x)
        experts = torch.stack([expert(x) for expert in self.experts], dim=1)  # (B, E, F)
        out: dict[str, Tensor] = {}
        weights: dict[str, Tensor] = {}
        entropy, reachability = x.new_zeros((), dtype=torch.float32), x.new_zeros((), dtype=torch.float32)
        for task, gate in self.gates.items():
            g, selectors = gate(x)
            out[task] = torch.einsum("be,bef->bf", g.to(experts.dtype), experts)
            weights[f"{task}/gate"] = g.detach()
            if self.entropy_regularization > 0:
                entropy = entropy - (selectors * torch.log(selectors + 1e-6)).sum(dim=(1, 2)).mean()
            if not self.power_of_two:
                reachability = reachability + (1.0 / selectors.sum(dim=-1).clamp_min(1e-6)).sum(dim=1).mean()
        self.last_gate_weights = weights
        regularization: dict[str, Tensor] = {}
        if self.training and torch.is_grad_enabled():
            if self.entropy_regularization > 0:
                regularization["dselect_k_entropy"] = self.entropy_regularization * entropy
            if not self.power_of_two:
                regularization["dselect_k_reachability"] = reachability
        self._regularization = regularization
        return out

    def regularization_losses(self) -> dict[str, Tensor]:
        """The regularisers of the last training forward (see the class docstring); may be empty."""
        return dict(self._regularization)
