"""What the two gradient-level paths share: the balancer applied to the global batch's task Jacobian."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from typing import ClassVar, Optional

import torch
from torch import Tensor

from lightning_mtl.gradients import GradientMode, TaskJacobian, global_gramian
from lightning_mtl.step import StepContext
from lightning_mtl.updates.base import BalancingPath


class GradientPath(BalancingPath):
    """A path that hands the balancer per-task gradients (of the shared parameters, or of the backbone output)."""

    #: Which Jacobian the path forms; the Gramian's DDP reduction depends on it.
    mode: ClassVar[GradientMode]

    def balance(
        self,
        jacobian: TaskJacobian,
        losses: Tensor,
        present: Tensor,
        context: StepContext,
        total: Optional[Tensor] = None,
    ) -> Optional[tuple[list[Tensor], Optional[Tensor]]]:
        """The balancer on the task Jacobian: ``(directions shaped like jacobian.inputs, weights or None)``.

        ``jacobian`` holds the gradients of the loss as back-propagated, i.e. multiplied by the loss
        scale under ``16-mixed`` and, in representation mode, divided by the accumulation (Lightning
        divides the loss by ``accumulate_grad_batches`` before its backward); the balancer sees the task
        gradients themselves (like Lightning unscales before clipping) and the directions come back in
        the same units as the Jacobian. ``total`` (one process) is checked for finiteness in the same
        host sync as the Gramian (a named error for a NaN loss). Returns None when the step is to be
        skipped (``nonfinite_loss="skip"``); raises ``FloatingPointError`` on a non-finite task gradient
        otherwise. Under ``16-mixed`` an overflow gives the static direction, whose inf/NaN makes the
        GradScaler skip the step and lower its scale, with the balancer untouched. The Gramian and the
        weights go to the step record.
        """
        accumulation = context.accumulation if self.mode == "representation" else 1
        units = context.loss_scale / accumulation  # the Jacobian's rows are the task gradients times this
        entries = jacobian.pair_entries() if context.world_size == 1 else None
        if entries is not None:  # two tasks' rows: the Gramian read as floats, made a tensor for the record
            gramian = torch.tensor(entries, dtype=jacobian.inputs[0].dtype).view(2, 2)
            if units != 1.0:  # in the rows' dtype, like the stacked path: an entry may overflow there, and is then seen
                gramian = gramian / units**2
                entries = gramian.view(-1).tolist()
        else:
            gramian = global_gramian(jacobian, self.mode, context.world_size, context.all_reduce)
            if units != 1.0:
                gramian = gramian / units**2
        context.record.gramian = gramian
        # One host read of the K x K Gramian (and, in one process, the loss) gives the finiteness verdict
        # (the same on every rank: the Gramian is global) and the tasks with a nonzero gradient.
        if entries is not None:
            values = entries + ([] if total is None else [total.item()])
        elif total is None or gramian.is_cpu:  # on the CPU two reads cost less than joining them
            values = [value for row in gramian.tolist() for value in row] + ([] if total is None else [total.item()])
        else:  # on an accelerator one read (one sync) of the Gramian and the loss together
            values = torch.cat([gramian.reshape(-1), total.detach().reshape(1).to(gramian.dtype)]).tolist()
        num_tasks = gramian.shape[0]
        diagonal = values[: num_tasks * num_tasks : num_tasks + 1]
        if not all(map(math.isfinite, values)):
            return self._nonfinite(jacobian, losses, present, context, total, diagonal)
        if self.balancer.needs == "gramian":
            nonzero = [g > 0 for g in diagonal]
            if _takes_entries(type(self.balancer)):  # the entries read above: none read again
                entries = values[: num_tasks * num_tasks]
                weights = self.balancer.weights(gramian, losses, present, nonzero=nonzero, entries=entries)
            else:  # a user's method with its own weights() of the signature before 2026-12-02
                weights = self.balancer.weights(gramian, losses.detach(), present, nonzero=nonzero)
            context.record.weights = weights
            return jacobian.combine(weights), weights
        flat = jacobian.flat()
        columns = None
        if self.mode == "representation" and context.world_size > 1:
            flat, columns = _in_global_columns(flat, context)
        direction = self.balancer(flat / units) * units if units != 1.0 else self.balancer(flat)
        return jacobian.split(direction if columns is None else direction[columns]), None

    def _nonfinite(
        self,
        jacobian: TaskJacobian,
        losses: Tensor,
        present: Tensor,
        context: StepContext,
        total: Optional[Tensor],
        diagonal: Sequence[float],
    ) -> Optional[tuple[list[Tensor], Optional[Tensor]]]:
        """A NaN/inf in the Gramian (or the loss): a named loss error, the policy on a task gradient, or, under a
        loss scale, the static direction whose inf makes the GradScaler skip the step."""
        if total is not None and not self.nonfinite.losses_finite(total, losses, context):  # a non-finite loss: named
            return None
        if context.loss_scale == 1.0:
            self.nonfinite.report_gradients(diagonal, context)  # raises, or warns that the step is skipped
            return None
        weights = self.balancer.task_weights.to(losses.dtype) * present
        context.record.weights = weights
        return jacobian.combine(weights), weights

    def log_loss_factors(self, losses: Tensor, present: Tensor, context: StepContext) -> Optional[Tensor]:
        """For a method on ``log(L_k + eps)`` (DB-MTL), the factors ``1 / (L_k + eps)`` that turn the task gradients
        into the logs' gradients (zero for an absent task); None for the others."""
        if not self.balancer.log_losses:
            return None
        losses = losses.detach()
        if context.world_size > 1:  # log of the global batch's loss, which DDP takes as the mean over processes
            losses = context.all_reduce(losses * present, "mean")
            present = losses > 0
        return torch.where(present, 1.0 / (losses + self.balancer.log_eps), 0.0)


@functools.cache
def _takes_entries(balancer_class: type) -> bool:
    """Whether the class's ``weights`` takes ``entries`` (``GramianBalancer``'s and GradNorm's do; a user's own
    ``weights`` written before the argument existed may not)."""
    return "entries" in inspect.signature(balancer_class.weights).parameters


def _in_global_columns(flat: Tensor, context: StepContext) -> tuple[Tensor, slice]:
    """Representation mode under DDP, a direction method (GradDrop): this process's K x P columns at their place
    in the global batch's K x (world_size P) matrix, zero elsewhere, and that place.

    The columns are this process's samples. A method that draws per column (GradDrop's uniforms, seeded
    alike on every process) then draws for the global batch, as one process would, instead of giving
    sample i of every process the same draw. The blocks are ``P`` wide, the widest process's width.
    """
    # float64 holds every width exactly (float32 rounded widths above 2**24, and the blocks overlapped)
    width = int(context.all_reduce(torch.tensor(float(flat.shape[1]), dtype=torch.float64, device=flat.device), "max"))
    start = context.rank * width
    padded = flat.new_zeros(flat.shape[0], width * context.world_size)
    padded[:, start : start + flat.shape[1]] = flat
    return padded, slice(start, start + flat.shape[1])
