"""The ``nonfinite_loss`` policy: a NaN/inf task loss or task gradient raises, or skips the step on every process."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_mtl.step import StepContext

NonfinitePolicy = Literal["raise", "skip"]


class NonfiniteCheck:
    """Checks a step's losses (and task gradients) for NaN/inf, and raises or asks for the step to be skipped.

    ``"raise"`` raises ``FloatingPointError`` naming the task and step before backward touches any
    parameter; ``"skip"`` warns and returns False, and the module then skips the whole optimizer step.
    Under DDP the verdict is all-reduced, so every process raises or skips alike.
    """

    def __init__(self, policy: NonfinitePolicy, task_names: Sequence[str], balancer_name: str) -> None:
        if policy not in ("raise", "skip"):
            raise ValueError(f"nonfinite_loss must be 'raise' or 'skip', got {policy!r}")
        self.policy = policy
        self.task_names = list(task_names)
        self.balancer_name = balancer_name

    def losses_finite(self, total: Tensor, losses: Tensor, context: StepContext) -> bool:
        """Whether ``total`` (the combined loss, or a sum of the task losses) is finite on every process.

        Checks the combined loss only (one reduction; a NaN/inf task loss makes it non-finite), then
        names the culprit tasks.
        """
        distributed = context.world_size > 1
        if not distributed and bool(torch.isfinite(total)):
            return True
        nonfinite = ~torch.isfinite(total.detach())
        if distributed:
            nonfinite = context.all_reduce(nonfinite.float(), "sum") > 0
        if not bool(nonfinite):
            return True
        values = {name: loss for name, loss in zip(self.task_names, losses.detach().tolist()) if not math.isfinite(loss)}
        bad = list(values)
        message = (
            f"non-finite loss for task(s) {bad or 'none: the balancer ' + self.balancer_name + ' or another process'} "
            f"at global step {context.global_step} "
            f"(batch {context.batch_idx}): {values}"
        )
        if self.policy == "skip":
            rank_zero_warn(message + "; the step is skipped (nonfinite_loss='skip')")
            return False
        raise FloatingPointError(
            message + ". No parameter was updated. Check the task's data, targets and learning rate, "
            "or pass nonfinite_loss='skip' to skip such steps."
        )

    def report_gradients(self, squared_norms: Sequence[float], context: StepContext) -> None:
        """A non-finite task gradient (``squared_norms``: the Gramian's diagonal): raise, or warn that the step is skipped."""
        bad = [name for name, g in zip(self.task_names, squared_norms) if not math.isfinite(g)]
        message = f"non-finite task gradient for task(s) {bad} at global step {context.global_step} (batch {context.batch_idx})"
        if self.policy == "skip":
            rank_zero_warn(message + "; the step is skipped (nonfinite_loss='skip')")
            return
        raise FloatingPointError(message + ". Check the data and learning rate, or pass nonfinite_loss='skip'.")
