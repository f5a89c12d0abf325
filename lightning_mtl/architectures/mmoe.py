"""MMoE and its one-gate baseline OMoE (Ma et al., 2018)."""

from __future__ import annotations

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


class _MixtureOfExperts(MultiTaskBackbone):
    """Shared experts mixed by softmax gates; :class:`MMoE` has a gate per task, :class:`OMoE` one."""

    _one_gate: bool

    def __init__(
        self,
        in_features: int,
        expert_features: int,
        num_experts: int,
        tasks: Sequence[str],
        expert_hidden: Sequence[int] = (),
    ) -> None:
        super().__init__(tasks)
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("expert_features", expert_features)
        self.num_experts = check_positive_int("num_experts", num_experts)
        hidden = check_widths("expert_hidden", expert_hidden)
        self.experts = nn.ModuleList(
            expert_network(in_features, hidden, expert_features) for _ in range(num_experts)
        )
        # Eq. 8 of the paper: g(x) = softmax(W x), a linear map without bias.
        gate_names = ["shared"] if self._one_gate else list(self.tasks)
        self.gates = nn.ModuleDict({name: nn.Linear(in_features, num_experts, bias=False) for name in gate_names})
        #: ``{"{task}/gate": (batch, num_experts)}`` gate weights of the last forward, detached.
        self.last_gate_weights: dict[str, Tensor] = {}
        self.gate_expert_names = {f"{task}/gate": [f"expert_{i}" for i in range(num_experts)] for task in self.tasks}

    def task_modules(self) -> Mapping[str, nn.Module]:
        return {} if self._one_gate else {task: self.gates[task] for task in self.tasks}

    def task_parameters(self, task: str):  # type: ignore[override]
        self._check_task(task)
        if not self._one_gate:
            yield from self.gates[task].parameters()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``{task: Σᵢ gᵢ(x) fᵢ(x)}``, each ``(batch, expert_features)``."""
        x = flatten_input(x)
        experts = torch.stack([expert(x) for expert in self.experts], dim=1)  # (B, E, F)
        out: dict[str, Tensor] = {}
        weights: dict[str, Tensor] = {}
        for name, gate in self.gates.items():
            g = torch.softmax(gate(x), dim=-1)
            mixed = torch.einsum("be,bef->bf", g.to(experts.dtype), experts)
            if self._one_gate:
                out = {task: mixed for task in self.tasks}
                weights = {f"{task}/gate": g.detach() for task in self.tasks}
            else:
                out[name] = mixed
                weights[f"{name}/gate"] = g.detach()
        self.last_gate_weights = weights
        return out


class MMoE(_MixtureOfExperts):
    """Multi-gate Mixture-of-Experts: shared experts, one softmax gate per task.

    Ma, Zhao, Yi, Chen, Hong & Chi (2018), "Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts", KDD. Each expert ``fᵢ`` is an MLP
    ``in_features -> expert_hidden... -> expert_features`` with ReLU activations; task ``k`` gets
    ``fᵏ(x) = Σᵢ gᵏ(x)ᵢ fᵢ(x)`` with ``gᵏ(x) = softmax(W_gᵏ x)`` (Eqs. 7-8), and its head (the paper's
    *tower*) is the ``Task``'s head. Inputs ``(batch, ...)`` are flattened to ``in_features``.

    Args:
        in_features: size of the (flattened) input.
        expert_features: output size of every expert, hence of each task's mixture.
        num_experts: number of shared experts.
        tasks: task names, the same as the ``MultiTaskModule``'s.
        expert_hidden: hidden widths inside each expert (empty: one ``Linear -> ReLU``).

    Attributes:
        last_gate_weights: ``{"{task}/gate": (batch, num_experts)}`` weights of the last forward
            (detached), read by :class:`~lightning_mtl.callbacks.GateStatistics`.
    """

    _one_gate = False


class OMoE(_MixtureOfExperts):
    """One-gate Mixture-of-Experts, the baseline of MMoE: all tasks share one softmax gate.

    Ma et al. (2018), Sec. 4.2: "a direct adaption of the MoE layer to the Shared-Bottom multi-task
    model". Same arguments and output form as :class:`MMoE` (every task receives the same mixture); it
    has no task-specific parameters besides the heads.
    """

    _one_gate = True
