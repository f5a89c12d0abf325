"""The ``nonfinite_loss`` policy: a NaN/inf task loss or task gradient raises, or skips the step on every process."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from lightning_mtl.step import StepContext

NonfinitePolicy = Literal["raise", "skip"]


class NonfiniteCheck:
    """Checks a step's losses (and task gradients) for NaN/inf, and raises or asks for the step to be skipped.

    ``"raise"`` raises ``FloatingPointError`` naming the task and step before any parameter is updated
    (before Lightning's backward, except in representation mode in one process, where the backward's
    balancing finds it, after the heads' gradients are written but before the backbone's and before
    any optimizer step); ``"skip"`` warns and returns False, and the module then skips the whole
    optimizer step. Under DDP the verdict is gathered, so every process raises or skips alike.
    """

    def __init__(self, policy: NonfinitePolicy, task_names: Sequence[str], balancer_name: str) -> None:
        if policy not in ("raise", "skip"):
            raise ValueError(f"nonfinite_loss must be 'raise' or 'skip', got {policy!r}")
        self.policy = policy
        self.task_names = list(task_names)
        self.balancer_name = balancer_name

    def losses_finite(self, total: Tensor, losses: Tensor, context: StepContext) -> bool:
        """Whether ``total`` (the combined loss, or a sum of the task losses) is finite on every process.

        In one process: one check of ``total``, then the culprit tasks are named. Under DDP every process
        gathers every process's task losses and ``total`` (one small all-gather, the step's one collective
        for this check), so all take the same decision and every process reports which tasks were
        non-finite on which rank, not only the process that saw it.
        """
        if context.world_size == 1:
            if bool(torch.isfinite(total)):
                return True
            per_rank = {0: losses.detach().tolist()}
        else:
            local = torch.cat([losses.detach().float().reshape(-1), total.detach().float().reshape(1)])
            gathered = context.all_gather(local)
            if bool(torch.isfinite(gathered[:, -1]).all()):
                return True
            per_rank = {rank: row[:-1] for rank, row in enumerate(gathered.tolist())}
        message = self._loss_message(per_rank, context)
        if self.policy == "skip":
            warnings.warn(message + "; the step is skipped (nonfinite_loss='skip')", stacklevel=2)
            return False
        raise FloatingPointError(
            message + ". No parameter was updated. Check the task's data, targets and learning rate, "
            "or pass nonfinite_loss='skip' to skip such steps."
        )

    def _loss_message(self, per_rank: dict[int, list[float]], context: StepContext) -> str:
        """``non-finite loss for task(s) [...] at global step s (batch b): {...}``, per rank under DDP."""
        values = {
            rank: {name: loss for name, loss in zip(self.task_names, row) if not math.isfinite(loss)}
            for rank, row in per_rank.items()
        }
        bad = [name for name in self.task_names if any(name in found for found in values.values())]
        culprit = bad or f"none: the balancer {self.balancer_name} produced it"
        where = f"at global step {context.global_step} (batch {context.batch_idx})"
        if context.world_size == 1:
            return f"non-finite loss for task(s) {culprit} {where}: {values[0]}"
        ranks = "; ".join(f"rank {rank}: {found}" for rank, found in values.items() if found)
        return f"non-finite loss for task(s) {culprit} {where}: {ranks or 'on every rank, with finite task losses'}"

    def report_gradients(self, squared_norms: Sequence[float], context: StepContext) -> None:
        """A non-finite task gradient (``squared_norms``: the Gramian's diagonal): raise, or warn that the step is skipped."""
        bad = [name for name, g in zip(self.task_names, squared_norms) if not math.isfinite(g)]
        message = f"non-finite task gradient for task(s) {bad} at global step {context.global_step} (batch {context.batch_idx})"
        if self.policy == "skip":
            warnings.warn(message + "; the step is skipped (nonfinite_loss='skip')", stacklevel=2)
            return
        raise FloatingPointError(message + ". Check the data and learning rate, or pass nonfinite_loss='skip'.")


class SkippedStepGuard:
    """Leaves the balancer's state as it was when an optimizer step is skipped, whatever skipped it.

    An optimizer step is skipped by ``nonfinite_loss="skip"`` (a NaN/inf loss or task gradient in any
    micro-batch of the accumulation window, on any process) or by the ``16-mixed`` GradScaler (an
    inf/NaN it found in the gradients, perhaps where the balancer did not look). Either way the finite
    micro-batches of the window have already advanced the balancer (FAMO's logits and private Adam,
    RLW's generator, GradNorm's weights, GradVac's targets, DWA's loss history, ...). So, when a skip is
    possible (the ``"skip"`` policy, or a loss scale), the balancer's state is copied at the window's
    first micro-batch and put back after the optimizer step if that step was skipped: one mechanism for
    both causes. With ``nonfinite_loss="raise"`` and no loss scale nothing is copied.
    """

    def __init__(self, balancer: nn.Module, policy: NonfinitePolicy) -> None:
        self.balancer = balancer
        self.policy = policy
        #: (loss scale, balancer state) at the window's first micro-batch, or None outside a guarded window
        self._before: Optional[tuple[float, dict[str, Any]]] = None
        self._skipped = False

    def before_micro_batch(self, loss_scale: float) -> None:
        """Called by every training step: copy the state at the first micro-batch of a window that may be skipped."""
        if self._before is None and (self.policy == "skip" or loss_scale != 1.0):
            self._before = (loss_scale, copy.deepcopy(self.balancer.state_dict()))

    def skip(self) -> None:
        """The module drops this window's optimizer step (``nonfinite_loss="skip"``)."""
        self._skipped = True

    def after_optimizer_step(self, loss_scale: float) -> bool:
        """Whether the optimizer step just taken was skipped (by the policy or by the GradScaler lowering its
        scale); if so the balancer's state is put back as it was before the window."""
        before, skipped = self._before, self._skipped
        self._before, self._skipped = None, False
        if before is not None and loss_scale < before[0]:
            skipped = True
        if skipped and before is not None:
            self.balancer.load_state_dict(before[1])
        return skipped
