"""Cross-stitch networks: one column per task, mixed after every stage (Misra et al., 2016)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_mtl.architectures.base import MultiTaskBackbone
from lightning_mtl.architectures.cnn import SmallCNN
from lightning_mtl.architectures.mlp import MLP


def column_stages(column: nn.Module) -> list[nn.Module]:
    """The stages of a column, after each of which a cross-stitch unit mixes the tasks' activations.

    - :class:`~lightning_mtl.architectures.SmallCNN`: each conv block, then the flatten-linear head.
    - :class:`~lightning_mtl.architectures.MLP`: each ``Linear`` with the activation/dropout after it
      (a leading ``Flatten`` joins the first stage).
    - ``nn.Sequential`` / ``nn.ModuleList``: each child.
    """
    if isinstance(column, SmallCNN):
        return [*column.blocks, column.head]
    if isinstance(column, MLP):
        stages: list[list[nn.Module]] = [[]]
        for layer in column.layers:
            if isinstance(layer, nn.Linear) and any(isinstance(m, nn.Linear) for m in stages[-1]):
                stages.append([])
            stages[-1].append(layer)
        return [nn.Sequential(*stage) for stage in stages]
    if isinstance(column, (nn.Sequential, nn.ModuleList)) and len(column) > 0:
        return list(column)
    raise TypeError(
        f"CrossStitch: `column` must be a SmallCNN, an MLP, or an nn.Sequential/nn.ModuleList whose children are "
        f"the stages to stitch after; got {type(column).__name__}."
    )


def _reset_parameters(module: nn.Module) -> None:
    for child in module.modules():
        reset = getattr(child, "reset_parameters", None)
        if callable(reset):
            reset()


class CrossStitch(MultiTaskBackbone):
    """One copy of ``column`` per task, linearly mixed after every stage by cross-stitch units.

    Misra, Shrivastava, Gupta & Hebert (2016), "Cross-stitch Networks for Multi-task Learning", CVPR.
    Each task has its own column (a fresh copy of ``column``, re-initialised); after stage ``l`` the
    activations ``hⱼ`` of all columns are combined into task ``k``'s next input as
    ``h̃ₖ = Σⱼ αₖⱼ hⱼ`` with learned scalars ``αₖⱼ`` (one unit per stage, for the whole layer as in
    the paper's main variant). The units start near identity, ``αₖₖ = self_weight`` and the rest
    ``(1 - self_weight) / (K - 1)`` (the paper suggests 0.9 / 0.1 for two tasks), so each column
    starts as its task's own network. Task ``k``'s head receives column ``k``'s last stitched output.

    There are no shared parameters: task ``k`` owns its column and the row ``αₖ·`` of every unit
    (:meth:`task_parameters`). Through the stitches every column still receives gradient from every
    task, except the last unit's rows, which reach one head each.

    Args:
        column: the per-task network; its stages are found by :func:`column_stages`
            (``SmallCNN``, ``MLP``, or ``nn.Sequential``/``nn.ModuleList`` of stages).
        tasks: task names, the same as the ``MultiTaskModule``'s.
        self_weight: initial ``αₖₖ``, in ``[0, 1]``.

    Attributes:
        out_features: the column's ``out_features``, when it has one.
    """

    def __init__(self, column: nn.Module, tasks: Sequence[str], self_weight: float = 0.9) -> None:
        super().__init__(tasks)
        if not isinstance(column, nn.Module):
            raise TypeError(f"CrossStitch: `column` must be an nn.Module, got {type(column).__name__}.")
        column_stages(column)  # validate before copying
        if not 0.0 <= self_weight <= 1.0:
            raise ValueError(f"CrossStitch: `self_weight` must be in [0, 1], got {self_weight!r}.")
        self.out_features = getattr(column, "out_features", None)
        self.columns = nn.ModuleDict()
        for task in self.tasks:
            copied = copy.deepcopy(column)
            _reset_parameters(copied)
            self.columns[task] = copied
        # Views of the columns' layers (not registered again, so the state_dict holds each weight once).
        self._stages = {task: column_stages(self.columns[task]) for task in self.tasks}
        num_tasks = len(self.tasks)
        other = (1.0 - self_weight) / (num_tasks - 1) if num_tasks > 1 else 0.0
        self.num_stages = len(self._stages[self.tasks[0]])
        # alphas[task][l] is the row α_task,· of the unit after stage l, over self.tasks.
        self.alphas = nn.ModuleDict(
            {
                task: nn.ParameterList(
                    nn.Parameter(torch.tensor([self_weight if other_task == task else other for other_task in self.tasks]))
                    for _ in range(self.num_stages)
                )
                for task in self.tasks
            }
        )

    def task_modules(self) -> Mapping[str, nn.Module]:
        return {task: nn.ModuleList([self.columns[task], self.alphas[task]]) for task in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        hidden = {task: x for task in self.tasks}
        for level in range(self.num_stages):
            outputs = torch.stack([self._stages[task][level](hidden[task]) for task in self.tasks])  # (K, B, ...)
            hidden = {}
            for task in self.tasks:
                alpha = self.alphas[task][level].to(outputs.dtype)
                hidden[task] = torch.tensordot(alpha, outputs, dims=1)
        return hidden
