"""Soft parameter sharing: one tower per task, tied by a distance penalty (Duong et al., 2015)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_mtl.architectures.base import MultiTaskBackbone

PENALTIES = ("l2", "trace_norm")


class SoftSharing(MultiTaskBackbone):
    """One copy of ``tower`` per task; a penalty on the distance between corresponding parameters.

    Duong, Cohn, Bird & Cook (2015), "Low Resource Dependency Parsing: Cross-lingual Parameter
    Sharing in a Neural Network Parser", ACL: two task networks whose parameters are tied softly by
    ``λ ‖θ₁ - θ₂‖²`` added to the loss. Each task gets its own tower (a copy of ``tower``; the copies
    start identical, so the penalty starts at 0), and its head reads that tower's output.

    ``penalty``:

    - ``"l2"``: ``Σ_params Σ_{i<j} ‖θᵢ - θⱼ‖²`` over all pairs of towers (Duong et al.'s penalty, for
      any number of tasks); zero exactly when the towers are identical.
    - ``"trace_norm"``: ``Σ_params ‖[vec θ₁; …; vec θ_K]‖_*``, the nuclear norm of the ``K × numel``
      matrix stacking each parameter's copies (the matrix form of Yang & Hospedales, 2017, "Trace Norm
      Regularised Deep Multi-Task Learning", ICLR workshop), which favours low-rank (similar) copies
      rather than equal ones; for identical towers it equals ``sqrt(K)·‖θ‖``.

    :meth:`regularization_losses` returns ``{"soft_sharing_penalty": weight × penalty}``; a
    ``MultiTaskModule`` adds it to the training loss after balancing and logs it as
    ``train/soft_sharing_penalty``. There are no shared parameters: each tower is its task's.

    Args:
        tower: the per-task network (any ``nn.Module``).
        tasks: task names, the same as the ``MultiTaskModule``'s.
        penalty: ``"l2"`` or ``"trace_norm"``.
        weight: ``λ``, the penalty's weight in the loss (>= 0).

    Attributes:
        out_features: the tower's ``out_features``, when it has one.
    """

    def __init__(
        self,
        tower: nn.Module,
        tasks: Sequence[str],
        penalty: Literal["l2", "trace_norm"] = "l2",
        weight: float = 1e-3,
    ) -> None:
        super().__init__(tasks)
        if not isinstance(tower, nn.Module):
            raise TypeError(f"SoftSharing: `tower` must be an nn.Module, got {type(tower).__name__}.")
        if penalty not in PENALTIES:
            raise ValueError(f"SoftSharing: `penalty` must be one of {PENALTIES}, got {penalty!r}.")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"SoftSharing: `weight` must be a number >= 0, got {weight!r}.")
        if not any(True for _ in tower.parameters()):
            raise ValueError("SoftSharing: `tower` has no parameters to tie.")
        self.penalty_kind = penalty
        self.weight = float(weight)
        self.out_features = getattr(tower, "out_features", None)
        self.towers = nn.ModuleDict({task: copy.deepcopy(tower) for task in self.tasks})

    def task_modules(self) -> Mapping[str, nn.Module]:
        return dict(self.towers.items())

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {task: tower(x) for task, tower in self.towers.items()}

    def penalty(self) -> Tensor:
        """The unweighted penalty between the towers' corresponding parameters (see the class docstring)."""
        groups = zip(*(list(self.towers[task].parameters()) for task in self.tasks))
        total = next(self.parameters()).new_zeros((), dtype=torch.float32)
        for copies in groups:
            if self.penalty_kind == "l2":
                for a, b in itertools.combinations(copies, 2):
                    total = total + (a.float() - b.float()).pow(2).sum()
            else:
                stacked = torch.stack([p.float().reshape(-1) for p in copies])
                total = total + torch.linalg.svdvals(stacked).sum()
        return total

    def regularization_losses(self) -> dict[str, Tensor]:
        """``{"soft_sharing_penalty": weight × penalty}``, added to the training loss by ``MultiTaskModule``."""
        return {"soft_sharing_penalty": self.weight * self.penalty()}
