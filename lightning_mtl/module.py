"""`MultiTaskModule`: a shared backbone, one head per task, trained with Lightning's `Trainer`."""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import nullcontext
from functools import partial
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_mtl.balancers import Balancer, Static, resolve_balancer
from lightning_mtl.gradients import (
    GRADIENT_MODES,
    GradientMode,
    TaskJacobian,
    global_gramian,
    output_cotangents,
    parameter_jacobian,
    surrogate,
)
from lightning_mtl.task import Task

Stage = Literal["train", "val", "test"]
# One backbone input with the labels of the tasks it carries: `(x, {task: y})`.
_Group = tuple[Any, dict[str, Tensor]]


class MultiTaskModule(LightningModule):
    """A shared backbone and one head per :class:`~lightning_mtl.Task`, as a ``LightningModule``.

    Args:
        backbone: shared network. It returns one tensor (fed to every head) or a dict
            ``{task name: tensor}`` (one input per head, e.g. MMoE).
        tasks: the task registry, a sequence of ``Task`` or a mapping ``{name: Task}``.
        balancer: how the task losses are combined: a ``Balancer``, a registered name
            (case-insensitive, e.g. ``"static"``) or ``None`` for static ``Task.weight`` weights.
        optimizer: ``callable(params) -> Optimizer``; default ``Adam(lr=1e-3)``.
        lr_scheduler: ``callable(optimizer) -> LRScheduler``; ``ReduceLROnPlateau`` monitors
            ``val/loss``.
        nonfinite_loss: ``"raise"`` (default) raises ``FloatingPointError`` naming the task and step
            when a task loss is NaN or infinite, before backward touches any parameter; ``"skip"``
            warns and skips that optimizer step instead.

    Batches take either form (see the README): shared input ``(x, {task: y})`` or per-task inputs
    ``{task: (x, y)}`` holding any subset of the tasks. Unlabelled samples (class target equal to the
    loss's ``ignore_index``, default -100, or a NaN regression target) are left out of that task's
    loss and metrics; a task with no labelled sample in a step contributes nothing to it.

    Hyper-parameters: the constructor takes modules and callables, which do not belong in a
    checkpoint's ``hyper_parameters`` (they break ``weights_only`` loading), so none are saved; the
    ``lightning-mtl`` CLI saves the whole YAML config beside the logs instead. Restore with
    ``MultiTaskModule.load_from_checkpoint(path, backbone=..., tasks=...)`` or ``fit(ckpt_path=...)``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tasks: Union[Sequence[Task], Mapping[str, Task]],
        balancer: Union[Balancer, str, None] = None,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        nonfinite_loss: Literal["raise", "skip"] = "raise",
        gradients: GradientMode = "parameters",
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if gradients not in GRADIENT_MODES:
            raise ValueError(f"gradients must be one of {list(GRADIENT_MODES)}, got {gradients!r}")
        if nonfinite_loss not in ("raise", "skip"):
            raise ValueError(f"nonfinite_loss must be 'raise' or 'skip', got {nonfinite_loss!r}")
        self.tasks = _task_registry(tasks)
        self.task_names = list(self.tasks)
        self.backbone = backbone
        check_tasks = getattr(backbone, "check_tasks", None)
        if check_tasks is not None:  # a multi-task architecture (MMoE, ...) built for a task list
            check_tasks(self.task_names)
        self.heads = _module_dict({name: task.head for name, task in self.tasks.items()}, "heads")
        self.losses = _module_dict(
            {name: task.loss for name, task in self.tasks.items() if isinstance(task.loss, nn.Module)}, "losses"
        )
        self.balancer = resolve_balancer(balancer)
        if gradients == "representation" and not self.balancer.supports_representation:
            raise ValueError(
                f"balancer {type(self.balancer).__name__} keeps gradient state across steps, which is meaningless "
                "for representation gradients (their entries belong to different samples at every step); "
                "use gradients='parameters'"
            )
        self.balancer.setup(self.task_names, [task.weight for task in self.tasks.values()])
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.nonfinite_loss = nonfinite_loss
        self.gradients = gradients
        self._task_index = {name: k for k, name in enumerate(self.task_names)}
        self._regularization_losses = getattr(backbone, "regularization_losses", None)
        self._last_batch: Any = None
        # torchmetrics objects per stage; deep copies so train/val/test never share state.
        for stage in ("train", "val", "test"):
            metrics = {
                name: _module_dict(copy.deepcopy(task.metrics), f"metrics of task {name!r}")
                for name, task in self.tasks.items()
            }
            setattr(self, f"{stage}_metrics", nn.ModuleDict(metrics))
        # (name, metric) pairs per task, looked up once instead of per step (the same Metric objects).
        self._train_metric_items = {name: list(self.train_metrics[name].items()) for name in self.tasks}
        # Task losses averaged over each evaluation epoch, weighted by labelled samples, synced across ranks.
        for stage in ("val", "test"):
            setattr(self, f"{stage}_task_losses", nn.ModuleDict({name: MeanMetric() for name in self.tasks}))
        self._seen_tasks: set[str] = set()
        self._all_present_mask: Optional[Tensor] = None
        # (backbone parameters, all parameters), gathered at first use in a fit
        self._parameters_cache: Optional[tuple[tuple[nn.Parameter, ...], tuple[nn.Parameter, ...]]] = None
        # plain DDP (no find_unused_parameters): every parameter needs a gradient at every step
        self._ddp_needs_every_parameter = False

    # ------------------------------------------------------------------ forward
    def forward(self, x: Any) -> dict[str, Tensor]:
        """Run the backbone once and every head on its output: ``{task: prediction}``."""
        features = self.backbone(x)
        return {name: self._head(name, features) for name in self.task_names}

    def _head(
        self,
        name: str,
        features: Union[Tensor, Mapping[str, Tensor]],
        captured: Optional[dict[str, tuple[Tensor, Tensor]]] = None,
    ) -> Tensor:
        """Task ``name``'s head on its backbone features.

        With ``captured`` (gradient-level balancing) the head reads a detached leaf copy of its
        features, recorded as ``captured[name] = (features, leaf)``: the heads' backward then stops at
        the backbone output, where it yields each task's own cotangent, and the backbone receives the
        balanced direction instead (see :mod:`lightning_mtl.gradients`).
        """
        if isinstance(features, Mapping):
            if name not in features:
                raise KeyError(
                    f"task {name!r}: the backbone returned a dict without this task (keys: {sorted(features)}); "
                    "a backbone returning a dict must have one entry per task"
                )
            features = features[name]
        if captured is not None and isinstance(features, Tensor) and features.requires_grad:
            leaf = features.detach().requires_grad_()
            captured[name] = (features, leaf)
            features = leaf
        try:
            return self.heads[name](features)
        except RuntimeError as error:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise RuntimeError(
                f"task {name!r}: head {type(self.heads[name]).__name__} failed on the backbone output of shape "
                f"{shape}: {error}. Check that the head's input width matches the backbone's output width."
            ) from error

    # ------------------------------------------------------------------ batches
    def _groups(self, batch: Any) -> list[_Group]:
        """Normalise both batch forms to a list of ``(x, {task: y})`` and check the task names."""
        if isinstance(batch, Mapping):
            groups = []
            for name, item in batch.items():
                if not (isinstance(item, (tuple, list)) and len(item) == 2):
                    raise TypeError(
                        f"task {name!r}: a per-task batch must map each task to (x, y), got {type(item).__name__}"
                    )
                groups.append((item[0], {name: item[1]}))
        elif isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Mapping):
            groups = [(batch[0], dict(batch[1]))]
        else:
            raise TypeError(
                "a multi-task batch is either (x, {task: y}) (one input labelled for several tasks) or "
                f"{{task: (x, y)}} (one input per task); got {type(batch).__name__}"
            )
        for _, labels in groups:
            for name in labels:
                if name not in self.tasks:
                    raise ValueError(
                        f"the batch has data for task {name!r}, which the model does not have; "
                        f"model tasks: {self.task_names}. Add a Task named {name!r} or drop it from the data."
                    )
        return groups

    def _forward_groups(
        self,
        groups: list[_Group],
        captured: Optional[dict[str, tuple[Tensor, Tensor]]] = None,
    ) -> tuple[list[Any], list[tuple[str, Tensor, Tensor, bool]]]:
        """Run the backbone and the heads on every group of the batch.

        Returns the backbone outputs actually computed (the representation gradient-level balancers
        differentiate) and ``(task, prediction, target, may have unlabelled samples)`` for every task.
        Per-task inputs of identical shape go through the backbone in one call (one concatenated batch).
        """
        inputs = [x for x, _ in groups]
        if len(groups) > 1 and _stackable(inputs):
            features = self.backbone(torch.cat(inputs))
            outputs = [features]
            chunks = _split_features(features, [x.shape[0] for x in inputs])
        else:
            chunks = outputs = [self.backbone(x) for x in inputs]
        predictions = []
        for features, (_, labels) in zip(chunks, groups):
            flagged = self._tasks_missing_labels(labels)
            for name, target in labels.items():
                prediction = self._head(name, features, captured)
                predictions.append((name, prediction, target, name in flagged))
        return outputs, predictions

    def _tasks_missing_labels(self, labels: Mapping[str, Tensor]) -> set[str]:
        """Names of the tasks whose targets hold an unlabelled sample.

        One fused reduction per target dtype for the usual per-sample (1-D) targets of equal length,
        instead of one per task; other targets are checked one by one.
        """
        flagged: set[str] = set()
        by_dtype: dict[tuple[torch.dtype, int], list[str]] = {}
        for name, target in labels.items():
            if isinstance(target, Tensor) and target.ndim == 1 and target.dtype != torch.bool:
                by_dtype.setdefault((target.dtype, target.shape[0]), []).append(name)
            elif _missing_labels(target, self.tasks[name].ignore_index) is not None:
                flagged.add(name)
        for (dtype, _), names in by_dtype.items():
            targets = torch.stack([labels[name] for name in names])
            if dtype.is_floating_point:
                missing = torch.isnan(targets)
            else:
                ignore = torch.tensor([self.tasks[name].ignore_index for name in names], device=targets.device)
                missing = targets == ignore.unsqueeze(1)
            flagged.update(name for name, flag in zip(names, missing.any(dim=1).tolist()) if flag)
        return flagged

    def _loss(
        self, name: str, prediction: Tensor, target: Tensor, maybe_missing: bool = True
    ) -> tuple[Optional[Tensor], Tensor, Tensor, int]:
        """The task loss over its labelled samples (None if there are none) and the samples used.

        ``maybe_missing=False`` (from :meth:`_tasks_missing_labels`) skips the per-task label check.
        """
        missing = _missing_labels(target, self.tasks[name].ignore_index) if maybe_missing else None
        if missing is not None:
            keep = ~missing
            prediction, target = prediction[keep], target[keep]
        count = target.shape[0] if target.ndim else 1
        if count == 0:
            return None, prediction, target, 0
        try:
            loss = self.tasks[name].loss(prediction, target)
        except (RuntimeError, ValueError, IndexError) as error:
            raise type(error)(
                f"task {name!r}: the loss failed on prediction of shape {tuple(prediction.shape)} and target of "
                f"shape {tuple(target.shape)} ({target.dtype}): {error}"
            ) from error
        return loss, prediction, target, count

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        groups = self._groups(batch)
        by_gradients = self.balancer.needs != "losses"
        captured: Optional[dict[str, tuple[Tensor, Tensor]]] = {} if by_gradients else None
        outputs, predictions = self._forward_groups(groups, captured)
        task_losses: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        for name, prediction, target, maybe_missing in predictions:
            loss, prediction, target, count = self._loss(name, prediction, target, maybe_missing)
            self._seen_tasks.add(name)
            if loss is None:
                continue
            task_losses[name] = loss
            counts[name] = count
            for _, metric in self._train_metric_items[name]:
                metric.update(prediction.detach(), target)
        self._last_batch = None
        empty = not task_losses
        if empty:
            if self._world_size == 1:
                rank_zero_warn(f"step {self.global_step}: no task had a labelled sample; the step is skipped")
                return None
            # The other processes run this step's collectives (finiteness flag, Jacobian or Gramian, balancer
            # state) and backward: this one takes part with every task absent and contributes zero gradients.
            warnings.warn(f"step {self.global_step}: no task had a labelled sample in this process's batch")
        losses, present = self._stack_losses(task_losses)
        # Balancing runs in full precision: under autocast a K x K matmul or a solver would run in bf16/fp16.
        autocast = torch.is_autocast_enabled(losses.device.type)
        with torch.autocast(losses.device.type, enabled=False) if autocast else nullcontext():
            losses = losses.float()
            if by_gradients:
                # in one process the loss check joins the Gramian's (one host sync instead of two)
                if self._world_size > 1 and not self._is_finite(losses.sum(), losses, batch_idx):
                    return None
                total, weights = self._gradient_balanced_loss(losses, present, outputs, captured, batch_idx)
                if total is None:
                    return None
            else:
                total, weights = self.balancer(losses, present)
                if not self._is_finite(total, losses, batch_idx):
                    return None
        if self.balancer.needs_losses_after_step:
            self._last_batch = batch
        batch_size = max(counts.values(), default=1)
        combined = weights.detach() @ losses.detach() if by_gradients and weights is not None else total
        self.log("train/loss", combined, prog_bar=True, batch_size=batch_size)
        if empty or (self._ddp_needs_every_parameter and len(task_losses) < len(self.task_names)):
            # plain DDP fails on a parameter without gradient (an absent task's head, its UW term)
            total = total + self._zero_touching_parameters()
        if self._regularization_losses is not None:
            total = total + self._regularization(batch_size)

        # Each `self.log` call costs ~0.1 ms; per-task step values only reach the logger on its logging
        # steps (every `log_every_n_steps`), so they are logged only then.
        log_tasks = self._is_logging_step()
        for name, loss in task_losses.items():
            if log_tasks:
                self.log(f"train/{name}/loss", loss, prog_bar=True, batch_size=counts[name])
            for metric_name, metric in self._train_metric_items[name]:
                self.log(f"train/{name}/{metric_name}", metric, on_step=False, on_epoch=True)
        if log_tasks and weights is not None and not isinstance(self.balancer, Static):
            for name, weight in zip(self.task_names, weights.detach()):
                self.log(f"train/{name}/weight", weight)
        return total

    def _gradient_balanced_loss(
        self,
        losses: Tensor,
        present: Tensor,
        outputs: list[Any],
        captured: dict[str, tuple[Tensor, Tensor]],
        batch_idx: int,
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The loss to back-propagate for a gradient-level balancer, and its task weights (if it has any).

        One backward of ``Σ_k L_k`` through the heads (which read detached features) gives every task's
        cotangent at the backbone output and the heads' own plain gradients; in parameter mode one
        batched backward through the backbone turns the cotangents into the task Jacobian of the shared
        parameters (see :mod:`lightning_mtl.gradients`). The Jacobian is reduced across DDP ranks and
        handed to the balancer. The returned loss has the value ``Σ_k L_k`` and the gradient of a
        surrogate that puts the balanced direction (``Jᵀ w`` for a Gramian weighting, the method's own
        direction otherwise) into the shared parameters (or, in representation mode, into the backbone
        output, from where Lightning's backward takes it through the backbone once) and each head's
        plain gradient into the head. Lightning's own backward then runs as usual, so DDP gradient
        sync, AMP loss scaling, gradient clipping and accumulation all apply.
        """
        total = losses.sum()
        if self.gradients == "representation" and any(isinstance(output, Mapping) for output in outputs):
            raise ValueError(
                f"gradients='representation' needs a backbone that returns one shared tensor; "
                f"{type(self.backbone).__name__} returns one tensor per task, so the tasks share no "
                "representation. Use gradients='parameters'."
            )
        backbone_params, all_params = self._parameter_lists()
        params = [p for p in backbone_params if p.requires_grad]
        world_size = self._world_size
        check_losses = world_size == 1  # else checked (and all-reduced) by the caller
        if not captured or not params:  # a frozen backbone (e.g. SequentialTransfer): nothing shared to balance
            if check_losses and not self._is_finite(total, losses, batch_idx):
                return None, None
            return total, None
        loss_scale = self._loss_scale()
        features, cotangents, plain = output_cotangents(
            total * loss_scale if loss_scale != 1.0 else total,
            [captured.get(name) for name in self.task_names],
            [p for p in all_params if p.requires_grad],
        )
        # the heads' (and loss modules') plain gradients, through the same surrogate as the direction
        head_params = [p for p, _ in plain]
        head_grads = [g / loss_scale if loss_scale != 1.0 else g for _, g in plain]
        if self.balancer.log_losses:  # rows of log(L_k + eps): its gradient is ∂L_k / (L_k + eps)
            factors = torch.where(present, 1.0 / (losses.detach() + self.balancer.log_eps), 0.0)
            cotangents = [c * factors.view(-1, *([1] * (c.ndim - 1))).to(c.dtype) for c in cotangents]
        if self.gradients == "parameters":
            jacobian = TaskJacobian(params, parameter_jacobian(features, cotangents, params))
        else:
            jacobian = TaskJacobian(features, cotangents)
        if loss_scale != 1.0:  # unscale before balancing, like Lightning before clipping
            jacobian.scale_(1.0 / loss_scale)
        gramian = global_gramian(jacobian, self.gradients, world_size, self._all_reduce)
        finite = torch.isfinite(gramian).all()  # same verdict on every rank: the Gramian is global
        if check_losses:
            finite = finite & torch.isfinite(total)
        if not bool(finite):
            if check_losses and not self._is_finite(total, losses, batch_idx):  # a non-finite loss: named
                return None, None
            if loss_scale == 1.0:
                bad = [name for name, g in zip(self.task_names, gramian.diagonal().tolist()) if not math.isfinite(g)]
                message = f"non-finite task gradient for task(s) {bad} at global step {self.global_step} (batch {batch_idx})"
                if self.nonfinite_loss == "skip":
                    rank_zero_warn(message + "; the step is skipped (nonfinite_loss='skip')")
                    return None, None
                raise FloatingPointError(message + ". Check the data and learning rate, or pass nonfinite_loss='skip'.")
            # fp16 overflow: the non-finite static direction makes the scaler skip this step and lower its
            # scale; the balancer is not called, so its state is untouched
            weights = self.balancer.task_weights.to(losses.dtype) * present
            directions = jacobian.combine(weights)
        elif self.balancer.needs == "gramian":
            weights = self.balancer.weights(gramian, losses.detach(), present)
            directions = jacobian.combine(weights)
        else:
            directions, weights = jacobian.split(self.balancer(jacobian.flat())), None
        loss = total.detach() + surrogate([*directions, *head_grads], [*jacobian.inputs, *head_params])
        return loss, weights

    @property
    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def _parameter_lists(self) -> tuple[tuple[nn.Parameter, ...], tuple[nn.Parameter, ...]]:
        """(backbone parameters, all parameters), gathered once per fit: walking the tree costs ~0.2 ms."""
        if self._parameters_cache is None:
            self._parameters_cache = (tuple(self.backbone.parameters()), tuple(self.parameters()))
        return self._parameters_cache

    def _zero_touching_parameters(self) -> Tensor:
        """A zero loss whose backward gives every trainable parameter a (zero) gradient."""
        return sum(p.reshape(-1)[0] for p in self._parameter_lists()[1] if p.requires_grad) * 0.0

    def _loss_scale(self) -> float:
        """The GradScaler's current scale under ``16-mixed`` (1.0 otherwise)."""
        scaler = getattr(self._trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def _all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        return self.trainer.strategy.reduce(tensor, reduce_op=op)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self._last_batch is not None:  # the balancer asked for the losses after the update (FAMO)
            with torch.no_grad(), self.trainer.precision_plugin.forward_context():
                _, predictions = self._forward_groups(self._groups(self._last_batch))
                losses = [self._loss(*prediction)[0] for prediction in predictions]
                by_name = {prediction[0]: loss for prediction, loss in zip(predictions, losses) if loss is not None}
            self.balancer.after_optimizer_step(self._stack_losses(by_name)[0].float())
            self._last_batch = None

    def _is_logging_step(self) -> bool:
        """Whether Lightning writes step-level values to the logger after this training step."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return True if connector is None else bool(connector.should_update_logs)

    def _regularization(self, batch_size: int) -> Union[Tensor, float]:
        """Sum of the backbone's ``regularization_losses()`` (e.g. soft sharing), each logged as ``train/{name}``.

        Added after balancing: a regulariser is not a task, so balancers never re-weight it.
        """
        total: Union[Tensor, float] = 0.0
        for name, value in self._regularization_losses().items():
            self.log(f"train/{name}", value, batch_size=batch_size)
            total = total + value
        return total

    def _stack_losses(self, task_losses: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Task losses in registry order (0 for a task without one) and the mask of tasks that have one."""
        if len(task_losses) == len(self.task_names):  # every task present: the common case
            losses = torch.stack([task_losses[name] for name in self.task_names])
            return losses, self._all_present(losses.device)
        zero = next(iter(task_losses.values())).new_zeros(()) if task_losses else torch.zeros((), device=self.device)
        losses = torch.stack([task_losses.get(name, zero) for name in self.task_names])
        return losses, torch.tensor([name in task_losses for name in self.task_names], device=losses.device)

    def _all_present(self, device: torch.device) -> Tensor:
        """A cached all-True task mask (not a buffer: it is no state)."""
        if self._all_present_mask is None or self._all_present_mask.device != device:
            self._all_present_mask = torch.ones(len(self.task_names), dtype=torch.bool, device=device)
        return self._all_present_mask

    def _is_finite(self, total: Tensor, losses: Tensor, batch_idx: int) -> bool:
        """Raise (or, with ``nonfinite_loss="skip"``, warn and return False) on a NaN/inf task loss.

        Checks the combined loss only (one reduction; a NaN/inf task loss makes it non-finite), then
        names the culprit tasks. Under DDP the flag is all-reduced so every rank raises or skips alike.
        """
        distributed = self._world_size > 1
        if not distributed and bool(torch.isfinite(total)):
            return True
        nonfinite = ~torch.isfinite(total.detach())
        if distributed:
            nonfinite = self.trainer.strategy.reduce(nonfinite.float(), reduce_op="sum") > 0
        if not bool(nonfinite):
            return True
        bad = [name for name, loss in zip(self.task_names, losses.detach().tolist()) if not math.isfinite(loss)]
        values = {name: float(losses[self.task_names.index(name)]) for name in bad}
        message = (
            f"non-finite loss for task(s) {bad or 'none: the balancer ' + type(self.balancer).__name__ + ' or another process'} "
            f"at global step {self.global_step} "
            f"(batch {batch_idx}): {values}"
        )
        if self.nonfinite_loss == "skip":
            rank_zero_warn(message + "; the step is skipped (nonfinite_loss='skip')")
            return False
        raise FloatingPointError(
            message + ". No parameter was updated. Check the task's data, targets and learning rate, "
            "or pass nonfinite_loss='skip' to skip such steps."
        )

    def _evaluation_step(self, batch: Any, stage: Stage) -> None:
        task_losses = getattr(self, f"{stage}_task_losses")
        for name, prediction, target, maybe_missing in self._forward_groups(self._groups(batch))[1]:
            loss, prediction, target, count = self._loss(name, prediction, target, maybe_missing)
            if loss is None:
                continue
            task_losses[name].update(loss.detach(), weight=count)
            self.log(f"{stage}/{name}/loss", task_losses[name], on_step=False, on_epoch=True)
            for metric_name, metric in getattr(self, f"{stage}_metrics")[name].items():
                metric.update(prediction, target)
                self.log(f"{stage}/{name}/{metric_name}", metric, on_step=False, on_epoch=True)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """``{task: prediction}``: for a per-task batch, each task's head on its own input."""
        if isinstance(batch, Mapping):
            out = {}
            for name, item in batch.items():
                x = item[0] if isinstance(item, (tuple, list)) else item
                out[name] = self._head(name, self.backbone(x))
            return out
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    # ------------------------------------------------------------------ epoch ends
    def _log_combined_loss(self, stage: Stage) -> None:
        """``{stage}/loss``: the static-weighted sum of the epoch's task losses (tasks with data only)."""
        total, found = 0.0, False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a task without data this epoch computes NaN; it is left out
            for name, mean in getattr(self, f"{stage}_task_losses").items():
                value = mean.compute()
                if torch.isfinite(value):
                    total, found = total + self.tasks[name].weight * value, True
        if found:
            self.log(f"{stage}/loss", total, prog_bar=stage == "val")

    def on_validation_epoch_end(self) -> None:
        self._log_combined_loss("val")

    def on_test_epoch_end(self) -> None:
        self._log_combined_loss("test")

    def setup(self, stage: str) -> None:
        self._parameters_cache = None
        strategy = self.trainer.strategy
        plain_ddp = isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False)
        self._ddp_needs_every_parameter = plain_ddp and self.trainer.world_size > 1
        if stage == "fit":
            self._check_ddp_unused_parameters(plain_ddp)
            self._check_gradient_strategy()
            if self.trainer.world_size > 1:
                self.balancer.all_reduce_mean = partial(self._all_reduce, op="mean")

    def _check_gradient_strategy(self) -> None:
        """Per-task parameter gradients need the full parameters, which sharded strategies do not keep."""
        strategy = type(self.trainer.strategy).__name__
        sharded = "FSDP" in strategy or "DeepSpeed" in strategy
        if sharded and self.balancer.needs != "losses" and self.gradients == "parameters":
            raise ValueError(
                f"balancer {type(self.balancer).__name__} with gradients='parameters' is not supported under "
                f"{strategy}: the strategy shards the parameters and owns backward, so per-task parameter "
                "gradients cannot be formed. Use gradients='representation' (gradients w.r.t. the backbone "
                "output) or a loss-level balancer."
            )

    def _check_ddp_unused_parameters(self, plain_ddp: bool) -> None:
        """Single-task sampling leaves the other heads without gradient; plain DDP rejects that mid-run."""
        datamodule = self.trainer.datamodule
        sampling = getattr(datamodule, "sampling", None)
        if sampling in (None, "zip", "zip_shortest") or getattr(datamodule, "task_names", None) is None:
            return
        if plain_ddp:
            raise ValueError(
                f"sampling={sampling!r} trains one task per step, so the other tasks' heads get no gradient in "
                "that step, which plain DDP rejects. Use Trainer(strategy='ddp_find_unused_parameters_true') "
                "(or DDPStrategy(find_unused_parameters=True)), or sampling='zip'."
            )

    def on_fit_start(self) -> None:
        data_tasks = getattr(self.trainer.datamodule, "task_names", None) if self.trainer.datamodule else None
        if data_tasks:
            unknown = [name for name in data_tasks if name not in self.tasks]
            if unknown:
                raise ValueError(
                    f"the data has task(s) {unknown} that the model does not have; model tasks: {self.task_names}"
                )
            self._warn_missing(set(data_tasks), "the data module provides no training data")

    def on_train_epoch_end(self) -> None:
        self.balancer.on_train_epoch_end()
        if self.current_epoch == 0 or not self._seen_tasks:
            self._warn_missing(self._seen_tasks, "no training batch of the epoch had labels")

    def _warn_missing(self, provided: set[str], reason: str) -> None:
        missing = [name for name in self.task_names if name not in provided]
        if missing:
            rank_zero_warn(f"task(s) {missing}: {reason} for them, so they are never trained")

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        else:
            optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}


def _task_registry(tasks: Union[Sequence[Task], Mapping[str, Task]]) -> dict[str, Task]:
    if isinstance(tasks, Mapping):
        items = list(tasks.items())
        for key, task in items:
            if isinstance(task, Task) and key != task.name:
                raise ValueError(f"tasks[{key!r}] is a Task named {task.name!r}; the key and the name must match")
        tasks = [task for _, task in items]
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a sequence of Task or a mapping {{name: Task}}, got {type(tasks).__name__}")
    if not tasks:
        raise ValueError("tasks is empty: a MultiTaskModule needs at least one Task")
    registry: dict[str, Task] = {}
    for task in tasks:
        if not isinstance(task, Task):
            raise TypeError(f"every entry of tasks must be a Task, got {type(task).__name__}: {task!r}")
        if task.name in registry:
            raise ValueError(f"duplicate task name {task.name!r}: task names must be unique")
        registry[task.name] = task
    return registry


def _module_dict(modules: Mapping[str, nn.Module], what: str) -> nn.ModuleDict:
    for name in modules:
        if hasattr(nn.ModuleDict, name):
            raise ValueError(
                f"{what}: the name {name!r} collides with an attribute of torch.nn.ModuleDict; rename it"
            )
    return nn.ModuleDict(modules)


def _missing_labels(target: Tensor, ignore_index: int) -> Optional[Tensor]:
    """Boolean mask of unlabelled samples, or None when every sample is labelled.

    A sample is unlabelled when its regression target has a NaN, or all its class targets equal
    ``ignore_index`` (dense targets with some ignored entries are left to the loss's own masking).
    """
    if not isinstance(target, Tensor) or target.ndim == 0:
        return None
    if target.is_floating_point():
        missing = torch.isnan(target)
    elif target.dtype == torch.bool:
        return None
    else:
        missing = target == ignore_index
    if not bool(missing.any()):
        return None
    if target.ndim == 1:
        return missing
    flat = missing.reshape(target.shape[0], -1)
    return flat.any(dim=1) if target.is_floating_point() else flat.all(dim=1)


def _stackable(inputs: list[Any]) -> bool:
    first = inputs[0]
    return isinstance(first, Tensor) and all(
        isinstance(x, Tensor) and x.shape[1:] == first.shape[1:] and x.dtype == first.dtype and x.device == first.device
        for x in inputs[1:]
    )


def _split_features(features: Union[Tensor, Mapping[str, Tensor]], sizes: list[int]) -> list[Any]:
    if isinstance(features, Mapping):
        parts = {name: torch.split(value, sizes) for name, value in features.items()}
        return [{name: parts[name][i] for name in parts} for i in range(len(sizes))]
    return list(torch.split(features, sizes))
