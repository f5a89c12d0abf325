"""The interface every balancer implements."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Balancer(nn.Module):
    """Combines the task losses of a training step into the one loss that Lightning back-propagates.

    A balancer is an ``nn.Module`` so that its learned parameters and its state (buffers, extra state)
    move with the model and are saved in the checkpoint. ``MultiTaskModule`` calls :meth:`setup` once
    with the task registry, then ``balancer(losses, present)`` every training step.

    ``losses`` has one entry per task in registry order; a task without labelled data in the step has
    ``present[k] = False`` and a zero loss. The balancer returns the loss to back-propagate and the
    effective per-task weights (for logging).
    """

    task_names: list[str]

    def setup(self, task_names: Sequence[str], task_weights: Sequence[float]) -> None:
        """Receive the task registry; called once by ``MultiTaskModule.__init__``."""
        self.task_names = list(task_names)
        self.register_buffer("task_weights", torch.tensor(list(task_weights), dtype=torch.float32), persistent=False)

    def forward(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError
