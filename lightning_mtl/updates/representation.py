"""Representation mode: the task gradients at the backbone output, balanced inside Lightning's own backward."""

from __future__ import annotations

from functools import partial
from typing import ClassVar, Optional

import torch
from torch import Tensor

from lightning_mtl.gradients import GradientMode, TaskJacobian
from lightning_mtl.step import StepContext
from lightning_mtl.updates.base import Tap
from lightning_mtl.updates.gradient import GradientPath


class RepresentationPath(GradientPath):
    """``gradients="representation"`` with a gradient-level balancer (MGDA-UB, Sener & Koltun 2018).

    Each head reads its own view of the backbone output (:func:`~lightning_mtl.gradients.task_views`);
    the loss returned is the plain ``Σ_k L_k``. When Lightning's backward reaches the views it calls
    :meth:`balance_in_backward` with every task's cotangent, and the backbone's backward continues
    with the balanced direction instead of their sum: no second backward. The weights are therefore
    known only after the backward (:attr:`weights_after_backward`).
    """

    mode: ClassVar[GradientMode] = "representation"
    weights_after_backward: ClassVar[bool] = True

    def tap(self, context: StepContext) -> Tap:
        tap = Tap()
        tap.balance = partial(self.balance_in_backward, tap, context)
        return tap

    def combine(
        self, tap: Tap, losses: Tensor, present: Tensor, context: StepContext, empty: bool = False
    ) -> Optional[Tensor]:
        total = losses.sum()
        viewed = bool(tap.sources) and isinstance(tap.sources[0], list)  # the backward will balance
        # in one process the views' backward checks the loss with the Gramian (one host sync)
        deferred = viewed and context.world_size == 1
        if not deferred and not self.nonfinite.losses_finite(total, losses, context):
            return None
        tap.deferred_total = total.detach() if deferred else None
        if empty and viewed:  # a process without labels: its backward must still reach the views (a collective)
            total = total + sum(views[0].reshape(-1)[0] for views in tap.sources) * 0.0
        return total

    def balance_in_backward(self, tap: Tap, context: StepContext, jacobian: TaskJacobian) -> list[Tensor]:
        """Called by the backward: the backbone outputs' balanced directions from the task cotangents' ``jacobian``."""
        record = context.record
        factors = self.log_loss_factors(record.losses, record.present, context)
        if factors is not None:
            jacobian.scale_rows(factors)
        balanced = self.balance(jacobian, record.losses, record.present, context, tap.deferred_total)
        if balanced is None:  # non-finite loss or task gradient, nonfinite_loss="skip": the optimizer step is skipped
            record.skipped = True
            context.skip_optimizer_step()
            return [torch.zeros_like(x) for x in jacobian.inputs]
        directions, _ = balanced
        return [d if d.dtype == x.dtype else d.to(x.dtype) for d, x in zip(directions, jacobian.inputs)]
