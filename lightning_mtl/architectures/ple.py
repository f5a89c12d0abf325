"""CGC and PLE: shared and task-specific experts, gated per task (Tang et al., 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from lightning_mtl.architectures.base import (
    MultiTaskBackbone,
    check_positive_int,
    check_widths,
    expert_network,
    flatten_input,
)

_SHARED = "shared"


class _ExtractionLevel(nn.Module):
    """One extraction network: task and shared experts, a gate per task and optionally a shared gate."""

    def __init__(
        self,
        in_features: int,
        expert_features: int,
        tasks: Sequence[str],
        num_shared_experts: int,
        num_task_experts: int,
        expert_hidden: Sequence[int],
        shared_gate: bool,
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)

        def experts(count: int) -> nn.ModuleList:
            return nn.ModuleList(expert_network(in_features, expert_hidden, expert_features) for _ in range(count))

        self.shared_experts = experts(num_shared_experts)
        self.task_parts = nn.ModuleDict(
            {
                task: nn.ModuleDict(
                    {
                        "experts": experts(num_task_experts),
                        "gate": nn.Linear(in_features, num_task_experts + num_shared_experts, bias=False),
                    }
                )
                for task in self.tasks
            }
        )
        self.shared_gate: Optional[nn.Linear] = (
            nn.Linear(in_features, len(self.tasks) * num_task_experts + num_shared_experts, bias=False)
            if shared_gate
            else None
        )

    def forward(self, inputs: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``inputs``: ``{task: x}`` plus ``{"shared": x}``; returns ``(outputs, gate weights)`` alike."""
        shared = [expert(inputs[_SHARED]) for expert in self.shared_experts]
        task_experts = {task: [e(inputs[task]) for e in self.task_parts[task]["experts"]] for task in self.tasks}
        outputs: dict[str, Tensor] = {}
        weights: dict[str, Tensor] = {}
        for task in self.tasks:
            outputs[task], weights[task] = _mix(self.task_parts[task]["gate"], inputs[task], task_experts[task] + shared)
        if self.shared_gate is not None:
            every = [e for task in self.tasks for e in task_experts[task]] + shared
            outputs[_SHARED], weights[_SHARED] = _mix(self.shared_gate, inputs[_SHARED], every)
        return outputs, weights


def _mix(gate: nn.Linear, x: Tensor, experts: list[Tensor]) -> tuple[Tensor, Tensor]:
    stacked = torch.stack(experts, dim=1)  # (B, E, F)
    g = torch.softmax(gate(x), dim=-1)
    return torch.einsum("be,bef->bf", g.to(stacked.dtype), stacked), g.detach()


class PLE(MultiTaskBackbone):
    """Progressive Layered Extraction: stacked CGC levels with a shared gate in the inner levels.

    Tang, Liu, Zhao & Gong (2020), "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning
    (MTL) Model for Personalized Recommendations", RecSys. Every level (*extraction network*) holds
    ``num_task_experts`` experts per task and ``num_shared_experts`` shared experts (MLPs with ReLU).
    Task ``k``'s gate mixes its own and the shared experts; in every level but the last, a shared gate
    mixes *all* experts into the input of the next level's shared experts, while task ``k``'s next
    experts and gate read task ``k``'s mixture. The last level's task mixtures, ``(batch,
    expert_features)`` each, go to the heads (the paper's towers). Gates are ``softmax(W x)``, linear without bias.

    Task-specific parameters (:meth:`task_parameters`) are each task's experts and gates in every
    level; note that in inner levels a task's experts also feed the shared gate, so they receive
    gradient from every task (only the last level's are used by their task alone).

    Args:
        in_features: size of the (flattened) input.
        expert_features: output size of every expert.
        tasks: task names, the same as the ``MultiTaskModule``'s (``"shared"`` is reserved).
        num_levels: number of extraction networks (1 is :class:`CGC`).
        num_shared_experts: shared experts per level.
        num_task_experts: experts per task per level.
        expert_hidden: hidden widths inside each expert.

    Attributes:
        last_gate_weights: the last forward's gate weights (detached): ``"{task}/gate"`` for the last
            level, ``"{task}/gate_level{l}"`` and ``"shared/gate_level{l}"`` for inner levels.
        gate_expert_names: the experts each gate mixes, in column order.
    """

    def __init__(
        self,
        in_features: int,
        expert_features: int,
        tasks: Sequence[str],
        num_levels: int = 2,
        num_shared_experts: int = 1,
        num_task_experts: int = 1,
        expert_hidden: Sequence[int] = (),
    ) -> None:
        super().__init__(tasks)
        if _SHARED in self.tasks:
            raise ValueError(f"{type(self).__name__}: the task name {_SHARED!r} is reserved for the shared experts.")
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("expert_features", expert_features)
        self.num_levels = check_positive_int("num_levels", num_levels)
        check_positive_int("num_shared_experts", num_shared_experts)
        check_positive_int("num_task_experts", num_task_experts)
        hidden = check_widths("expert_hidden", expert_hidden)
        self.levels = nn.ModuleList(
            _ExtractionLevel(
                in_features if level == 0 else expert_features,
                expert_features,
                self.tasks,
                num_shared_experts,
                num_task_experts,
                hidden,
                shared_gate=level < num_levels - 1,
            )
            for level in range(num_levels)
        )
        shared_names = [f"shared_expert_{i}" for i in range(num_shared_experts)]
        self.gate_expert_names: dict[str, list[str]] = {}
        for level in range(num_levels):
            for task in self.tasks:
                own = [f"{task}_expert_{i}" for i in range(num_task_experts)]
                self.gate_expert_names[self._gate_key(task, level)] = own + shared_names
            if level < num_levels - 1:
                every = [f"{task}_expert_{i}" for task in self.tasks for i in range(num_task_experts)]
                self.gate_expert_names[self._gate_key(_SHARED, level)] = every + shared_names
        self.last_gate_weights: dict[str, Tensor] = {}

    def _gate_key(self, owner: str, level: int) -> str:
        return f"{owner}/gate" if level == self.num_levels - 1 else f"{owner}/gate_level{level}"

    def task_modules(self) -> Mapping[str, nn.Module]:
        return {task: nn.ModuleList(level.task_parts[task] for level in self.levels) for task in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = flatten_input(x)
        inputs = {name: x for name in (*self.tasks, _SHARED)}
        weights: dict[str, Tensor] = {}
        for level, network in enumerate(self.levels):
            inputs, level_weights = network(inputs)
            weights.update({self._gate_key(owner, level): w for owner, w in level_weights.items()})
        self.last_gate_weights = weights
        return {task: inputs[task] for task in self.tasks}


class CGC(PLE):
    """Customized Gate Control: one extraction level of task-specific and shared experts.

    Tang et al. (2020), Sec. 4.2: each task has ``num_task_experts`` experts of its own and shares
    ``num_shared_experts`` experts with the others; task ``k``'s softmax gate mixes its own and the
    shared experts into its head's input, ``(batch, expert_features)``. :class:`PLE` stacks such levels.
    A task's experts and gate are used by that task only.

    Args:
        in_features: size of the (flattened) input.
        expert_features: output size of every expert.
        tasks: task names, the same as the ``MultiTaskModule``'s (``"shared"`` is reserved).
        num_shared_experts: number of shared experts.
        num_task_experts: experts per task.
        expert_hidden: hidden widths inside each expert.
    """

    def __init__(
        self,
        in_features: int,
        expert_features: int,
        tasks: Sequence[str],
        num_shared_experts: int = 1,
        num_task_experts: int = 1,
        expert_hidden: Sequence[int] = (),
    ) -> None:
        super().__init__(
            in_features,
            expert_features,
            tasks,
            num_levels=1,
            num_shared_experts=num_shared_experts,
            num_task_experts=num_task_experts,
            expert_hidden=expert_hidden,
        )
