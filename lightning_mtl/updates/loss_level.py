"""Loss level: the balancer combines the task losses into one scalar; Lightning back-propagates it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor

from lightning_mtl.gradients import GradientMode, TaskJacobian, global_gramian, parameter_jacobian
from lightning_mtl.gramian import LayerRecorder, layerwise_gramian, use_layerwise
from lightning_mtl.step import StepContext
from lightning_mtl.updates.base import BalancingPath, Tap


class LossLevelPath(BalancingPath):
    """``(loss, weights) = balancer(losses, present)`` (Static, UW, DWA, FAMO, ...), checked for NaN/inf.

    No per-task gradient is formed, unless a callback asked for the step's Gramian
    (``MultiTaskModule.request_gramian``): then the Jacobian of the task losses (w.r.t. the shared
    parameters, or the backbone output in representation mode) is computed on the side for the step
    record; the update is unchanged. In parameter mode, in one process, the Gramian may be formed layer by
    layer, without the K × P Jacobian (:mod:`lightning_mtl.gramian`, :func:`~lightning_mtl.gramian.use_layerwise`).
    """

    def __init__(self, *args, gradients: GradientMode = "parameters", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gradients = gradients
        self.recorder = LayerRecorder()

    def tap(self, context: StepContext) -> Tap:
        if context.wants_gramian and self.gradients == "parameters" and context.world_size == 1:
            self.recorder.start(self._shared())
        return Tap()

    def end_step(self) -> None:
        self.recorder.stop()  # the global forward hook must not outlive a step that ended before combine

    def _shared(self) -> list[Tensor]:
        return [p for p in self.parameter_lists()[0] if p.requires_grad]

    def combine(
        self, tap: Tap, losses: Tensor, present: Tensor, context: StepContext, empty: bool = False
    ) -> Optional[Tensor]:
        calls = self.recorder.stop()
        # A method whose forward updates state (DWA's loss history, FAMO's pre-step losses, RLW's generator)
        # must not see the losses of a step that is then skipped: check them first. For the others the check
        # of the combined loss below is the step's only host sync.
        if self.balancer.forward_changes_state and not self.nonfinite.losses_finite(losses.sum(), losses, context):
            return None
        total, weights = self.balancer(losses, present)
        if not self.nonfinite.losses_finite(total, losses, context):
            return None
        context.record.weights = weights
        if context.wants_gramian:
            context.record.gramian = self.gramian(losses, tap.sources, context, calls)
        return total

    def gramian(
        self, losses: Tensor, sources: list, context: StepContext, calls: Optional[list] = None
    ) -> Optional[Tensor]:
        """The global batch's task-gradient Gramian, for the step record: one batched backward of the K losses
        (a loop for modules without a batching rule), the graph kept for Lightning's backward. Under DDP it is
        reduced like the balancing paths' (parameter mode: the K x P Jacobian; representation: the K x K Gramian).
        With ``calls`` (the forward's recorded layers) it is formed layer by layer instead."""
        if self.gradients == "parameters":
            inputs = self._shared()
        else:
            outputs = [value for source in sources for value in (source.values() if isinstance(source, Mapping) else [source])]
            inputs = [output for output in outputs if isinstance(output, Tensor) and output.requires_grad]
        if not inputs:  # a frozen backbone (alike on every process): no shared gradient
            return None
        num_tasks, scale = losses.shape[0], context.loss_scale
        if losses.requires_grad:
            # Under 16-mixed the backward runs through fp16 ops: scaled like Lightning's, so small gradients
            # do not underflow, then unscaled in the Gramian.
            eye = torch.eye(num_tasks, dtype=losses.dtype, device=losses.device) * scale
            if calls is not None and use_layerwise(calls, num_tasks, inputs):
                gramian = layerwise_gramian(calls, [losses], [eye], inputs)
                return gramian / scale**2 if scale != 1.0 else gramian
            rows = parameter_jacobian([losses], [eye], inputs)
        else:  # no task has a label on this process: zero rows, and it still joins the reduction
            rows = [x.new_zeros((num_tasks, *x.shape)) for x in inputs]
        jacobian = TaskJacobian(inputs, rows)
        gramian = global_gramian(jacobian, self.gradients, context.world_size, context.all_reduce)
        return gramian / scale**2 if scale != 1.0 else gramian
