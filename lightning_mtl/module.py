"""`MultiTaskModule`: a shared backbone, one head per task, trained with Lightning's `Trainer`."""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import nullcontext
from functools import partial
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from lightning_mtl.balancers import Balancer, Static, resolve_balancer
from lightning_mtl.balancers._utils import all_true
from lightning_mtl.gradients import (
    GRADIENT_MODES,
    GradientMode,
    TaskJacobian,
    global_gramian,
    output_cotangents,
    parameter_jacobian,
    surrogate,
    task_views,
)
from lightning_mtl.task import Task

Stage = Literal["train", "val", "test"]
# One backbone input with the labels of the tasks it carries: `(x, {task: y})`.
_Group = tuple[Any, dict[str, Tensor]]


@dataclass
class _RepresentationStep:
    """What a representation-mode backward needs to weight its step (filled in by ``training_step``), and the weights."""

    batch_idx: int
    losses: Optional[Tensor] = None
    present: Optional[Tensor] = None
    loss_scale: float = 1.0
    accumulation: int = 1  # Lightning divides the loss by accumulate_grad_batches before its backward
    total: Optional[Tensor] = None  # set when the backward, not training_step, checks the loss (one process)
    weights: Optional[Tensor] = None
    skipped: bool = False  # the backward found a non-finite value and skips the step: nothing to log


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
        if self.balancer.needs != "losses":
            self._check_no_shared_head_parameters()
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
        self._all_present_mask: Optional[Tensor] = None  # cached all-True task mask (no state, not a buffer)
        # (backbone parameters, all parameters), gathered at first use in a fit
        self._parameters_cache: Optional[tuple[tuple[nn.Parameter, ...], tuple[nn.Parameter, ...]]] = None
        # plain DDP (no find_unused_parameters): every parameter needs a gradient at every step
        self._ddp_needs_every_parameter = False
        # representation mode: what to log once the backward has weighted the step; a skip it asked for
        self._pending_log: Optional[tuple[_RepresentationStep, int, bool]] = None
        self._skip_optimizer_step = False
        # 16-mixed: (the GradScaler's scale, the balancer's state) before the optimizer step's first balancing
        self._state_before_scaled_step: Optional[tuple[float, dict[str, Any]]] = None
        # the step's regularisers when the backbone ran once per group of per-task inputs (see _forward_groups)
        self._combined_regularization: Optional[dict[str, Tensor]] = None
        # metrics and task losses of the evaluation dataloaders after the first: {(stage, index): (metrics, losses)}
        self._more_evaluation_metrics: dict[tuple[str, int], tuple[nn.ModuleDict, nn.ModuleDict]] = {}

    def _check_no_shared_head_parameters(self) -> None:
        """Gradient-level balancing needs the backbone's parameters apart from the heads' and losses'."""
        backbone = {id(p) for p in self.backbone.parameters()}
        for name in self.task_names:
            modules = [self.heads[name]] + ([self.losses[name]] if name in self.losses else [])
            if any(id(p) in backbone for module in modules for p in module.parameters()):
                raise ValueError(
                    f"task {name!r}: its head (or loss) shares parameters with the backbone (tied weights). "
                    f"Balancer {type(self.balancer).__name__} combines the task gradients at the backbone "
                    "output, so a shared parameter would also get the head's unbalanced gradient. Untie the "
                    "weights, or use a loss-level balancer."
                )

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
        if captured is not None and not isinstance(features, Tensor):
            raise TypeError(
                f"task {name!r}: balancer {type(self.balancer).__name__} balances the task gradients at the backbone "
                f"output, so the backbone must return one tensor (or a {{task: tensor}} dict); "
                f"{type(self.backbone).__name__} returned a {type(features).__name__}. Return the tensor the heads "
                "share (put extra outputs in a dict keyed by task), or use a loss-level balancer."
            )
        if captured is not None and features.requires_grad:
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
        balance: Optional[Callable[[list[Tensor]], list[Tensor]]] = None,
    ) -> tuple[list[Any], list[tuple[str, Tensor, Tensor, bool]]]:
        """Run the backbone and the heads on every group of the batch.

        Returns what the heads read (the backbone outputs actually computed; in representation mode
        ``views[j][k]``, task k's view of output j) and ``(task, prediction, target, may have
        unlabelled samples)`` for every task. Per-task inputs of identical shape go through the
        backbone in one call (one concatenated batch). ``captured`` (parameter mode) makes the heads
        read detached leaves (:meth:`_head`); ``balance`` (representation mode) gives each head its own
        view of the outputs, which the backward balances with it (:func:`~lightning_mtl.gradients.task_views`).
        """
        inputs = [x for x, _ in groups]
        stacked = len(groups) > 1 and _stackable(inputs)
        self._combined_regularization = None
        if stacked or len(inputs) == 1 or self._regularization_losses is None:
            outputs = [self.backbone(torch.cat(inputs))] if stacked else [self.backbone(x) for x in inputs]
        else:
            # One backbone call per group: a regulariser computed from the inputs (DSelectK's) would report the
            # last call's only. Combine every call's, weighted by its samples, as one stacked call would.
            outputs, terms = [], []
            for x in inputs:
                outputs.append(self.backbone(x))
                terms.append((_num_samples(x), self._regularization_losses()))
            samples = sum(n for n, _ in terms)
            self._combined_regularization = {
                name: sum(n * values[name] for n, values in terms) / samples for name in terms[-1][1]
            }
        sources: list[Any] = outputs  # what group i's heads read: sources[0 if stacked else i]
        if balance is not None and any(isinstance(output, Mapping) for output in outputs):
            raise ValueError(
                f"gradients='representation' needs a backbone that returns one shared tensor; "
                f"{type(self.backbone).__name__} returns one tensor per task, so the tasks share no "
                "representation. Use gradients='parameters'."
            )
        if balance is not None and not all(isinstance(output, Tensor) for output in outputs):
            kind = next(type(output).__name__ for output in outputs if not isinstance(output, Tensor))
            raise TypeError(
                f"gradients='representation' needs a backbone that returns one shared tensor; "
                f"{type(self.backbone).__name__} returned a {kind}. Return the tensor the heads share, or use a "
                "loss-level balancer."
            )
        if balance is not None and any(output.requires_grad for output in outputs):  # else a frozen backbone
            sources = task_views(outputs, len(self.task_names), balance)
        sizes = [x.shape[0] for x in inputs] if stacked else []
        parts: dict[int, list[Any]] = {}  # a stacked output (or view) cut into the groups' parts, once

        def features(i: int, name: str) -> Any:
            source = sources[0 if stacked else i]
            if sources is not outputs:
                source = source[self._task_index[name]]
            if not stacked:
                return source
            if id(source) not in parts:
                parts[id(source)] = _split_features(source, sizes)
            return parts[id(source)][i]

        predictions = []
        for i, (_, labels) in enumerate(groups):
            flagged = self._tasks_missing_labels(labels)
            for name, target in labels.items():
                prediction = self._head(name, features(i, name), captured)
                predictions.append((name, prediction, target, name in flagged))
        return sources, predictions

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
        scale = self._loss_scale()
        if scale != 1.0 and self._state_before_scaled_step is None:
            # Under 16-mixed the GradScaler may still skip the step (an inf in a gradient the balancer does not
            # see): keep the balancer's state from before the step's first balancing, restored if it does.
            self._state_before_scaled_step = (scale, copy.deepcopy(self.balancer.state_dict()))
        groups = self._groups(batch)
        by_gradients = self.balancer.needs != "losses"
        in_backward = by_gradients and self.gradients == "representation"
        captured: Optional[dict[str, tuple[Tensor, Tensor]]] = {} if by_gradients and not in_backward else None
        step = _RepresentationStep(batch_idx) if in_backward else None
        read, predictions = self._forward_groups(groups, captured, partial(self._balance_in_backward, step) if step else None)
        viewed = step is not None and bool(read) and isinstance(read[0], list)  # the backward will balance
        task_losses: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        for name, prediction, target, maybe_missing in predictions:
            loss, prediction, target, count = self._loss(name, prediction, target, maybe_missing)
            if loss is None:  # no labelled sample of this task in the step: it is not trained by it
                continue
            self._seen_tasks.add(name)
            task_losses[name] = loss
            counts[name] = count
            for _, metric in self._train_metric_items[name]:
                metric.update(prediction.detach(), target)
        self._last_batch = None
        self._pending_log = None
        empty = not task_losses
        if empty:
            if self._world_size == 1:
                rank_zero_warn(f"step {self.global_step}: no task had a labelled sample; the step is skipped")
                return None
            # The other processes run this step's collectives (finiteness flag, Jacobian or Gramian, balancer
            # state) and backward: this one takes part with every task absent and contributes zero gradients.
            warnings.warn(f"step {self.global_step}: no task had a labelled sample in this process's batch")
        losses, present = self._stack_losses(task_losses)
        batch_size = max(counts.values(), default=1)
        log_tasks = self._is_logging_step()
        # Balancing runs in full precision: under autocast a K x K matmul or a solver would run in bf16/fp16.
        autocast = torch.is_autocast_enabled(losses.device.type)
        with torch.autocast(losses.device.type, enabled=False) if autocast else nullcontext():
            losses = losses.float()
            if by_gradients and not in_backward:
                # in one process the loss check joins the Gramian's (one host sync instead of two)
                if self._world_size > 1 and not self._is_finite(losses.sum(), losses, batch_idx):
                    return self._skipped_step()
                total, weights = self._parameter_balanced_loss(losses, present, captured, batch_idx, scale)
                if total is None:
                    return self._skipped_step()
            else:
                deferred = False
                if in_backward:
                    total, weights = losses.sum(), None
                    # representation mode in one process: the views' backward checks the loss with the Gramian
                    deferred = viewed and self._world_size == 1
                else:
                    # A method whose forward updates state (DWA's loss history, FAMO's pre-step losses, RLW's
                    # generator) must not see the losses of a step that is then skipped: check them first. For
                    # the others the check of the combined loss below is the step's only host sync.
                    if self.balancer.forward_changes_state and not self._is_finite(losses.sum(), losses, batch_idx):
                        return self._skipped_step()
                    total, weights = self.balancer(losses, present)
                if not deferred and not self._is_finite(total, losses, batch_idx):
                    return self._skipped_step()
        if self.balancer.needs_losses_after_step:
            self._last_batch = batch
        if step is not None:  # representation mode: the weights come in the backward; logged after it
            step.losses, step.present, step.loss_scale = losses.detach(), present, scale
            step.accumulation = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
            step.total = total.detach() if deferred else None
            self._pending_log = (step, batch_size, log_tasks)
            if empty and viewed:  # the backward must reach the views (a collective)
                total = total + sum(views[0].reshape(-1)[0] for views in read) * 0.0
        else:
            self._log_balance(losses.detach(), total, weights, batch_size, log_tasks)
        if empty or (self._ddp_needs_every_parameter and len(task_losses) < len(self.task_names)):
            # plain DDP fails on a parameter without gradient (an absent task's head, its UW term)
            total = total + self._zero_touching_parameters()
        if self._regularization_losses is not None:
            total = total + self._regularization(batch_size)

        # Each `self.log` call costs ~0.1 ms; per-task step values only reach the logger on its logging
        # steps (every `log_every_n_steps`), so they are logged only then.
        if log_tasks:
            for name, loss in task_losses.items():
                self.log(f"train/{name}/loss", loss, prog_bar=True, batch_size=counts[name])
        return total

    def _skipped_step(self) -> Tensor:
        """A step skipped by ``nonfinite_loss="skip"``: the whole optimizer step is skipped, on every process.

        Returns a zero loss whose backward gives every trainable parameter a zero gradient instead of
        None: Lightning refuses None from ``training_step`` under DDP, and under accumulation None would
        only drop this micro-batch while the optimizer still stepped on the others. The flag makes
        ``on_before_optimizer_step`` drop every gradient, as a non-finite gradient found in a
        representation-mode backward does.
        """
        self._skip_optimizer_step = True
        return self._zero_touching_parameters()

    def _log_balance(
        self, losses: Tensor, total: Tensor, weights: Optional[Tensor], batch_size: int, log_tasks: bool
    ) -> None:
        """Log ``train/loss`` (for a gradient-level balancer the weighted sum ``Σ w_k L_k``) and the weights."""
        combined = weights.detach() @ losses if self.balancer.needs != "losses" and weights is not None else total
        self.log("train/loss", combined, prog_bar=True, batch_size=batch_size)
        if log_tasks and weights is not None and not isinstance(self.balancer, Static):
            for name, weight in zip(self.task_names, weights.detach()):
                self.log(f"train/{name}/weight", weight)

    def on_after_backward(self) -> None:
        # Right after the backward, before any callback's on_train_batch_end reads the logged values
        # (ModelCheckpoint monitoring train/loss every n steps, ...).
        self._log_pending_balance()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._log_pending_balance()  # in case a subclass's on_after_backward does not call this class's

    def _log_pending_balance(self) -> None:
        """Representation mode: log the step's loss and weights, which its backward has set (not a skipped step's)."""
        if self._pending_log is not None:
            step, batch_size, log_tasks = self._pending_log
            self._pending_log = None
            if not step.skipped:
                self._log_balance(step.losses, step.losses.sum(), step.weights, batch_size, log_tasks)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._skip_optimizer_step:  # a representation-mode backward found a non-finite task gradient
            self._skip_optimizer_step = False
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None

    def _parameter_balanced_loss(
        self,
        losses: Tensor,
        present: Tensor,
        captured: dict[str, tuple[Tensor, Tensor]],
        batch_idx: int,
        loss_scale: float,
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Parameter mode: the loss to back-propagate for a gradient-level balancer, and its task weights.

        One backward of ``Σ_k L_k`` through the heads (which read detached features) gives every task's
        cotangent at the backbone output and the heads' own plain gradients; one batched backward
        through the backbone turns the cotangents into the task Jacobian of the shared parameters (see
        :mod:`lightning_mtl.gradients`). The Jacobian is reduced across DDP ranks and handed to the
        balancer. The returned loss has the value ``Σ_k L_k`` and the gradient of a surrogate that puts
        the balanced direction (``Jᵀ w`` for a Gramian weighting, the method's own direction otherwise)
        into the shared parameters and each head's plain gradient into the head. Lightning's own
        backward then runs as usual, so DDP gradient sync, AMP loss scaling, gradient clipping and
        accumulation all apply.
        """
        total = losses.sum()
        backbone_params, all_params = self._parameter_lists()
        params = [p for p in backbone_params if p.requires_grad]
        single = self._world_size == 1  # else the losses were checked (and all-reduced) by the caller
        if not captured or not params:  # a frozen backbone (e.g. SequentialTransfer): nothing shared to balance
            if single and not self._is_finite(total, losses, batch_idx):
                return None, None
            return total, None
        features, cotangents, plain = output_cotangents(
            total * loss_scale if loss_scale != 1.0 else total,
            [captured.get(name) for name in self.task_names],
            [p for p in all_params if p.requires_grad],
        )
        # the heads' (and loss modules') plain gradients, through the same surrogate as the direction
        head_params = [p for p, _ in plain]
        head_grads = [g / loss_scale if loss_scale != 1.0 else g for _, g in plain]
        cotangents = self._log_loss_cotangents(cotangents, losses, present)
        jacobian = TaskJacobian(params, parameter_jacobian(features, cotangents, params))
        balanced = self._balance(jacobian, losses, present, loss_scale, batch_idx, total if single else None)
        if balanced is None:
            return None, None
        directions, weights = balanced
        if loss_scale != 1.0:  # the surrogate's gradient is scaled by Lightning's backward
            directions = [d / loss_scale for d in directions]
        loss = total.detach() + surrogate([*directions, *head_grads], [*jacobian.inputs, *head_params])
        return loss, weights

    def _balance_in_backward(self, step: _RepresentationStep, stacks: list[Tensor]) -> list[Tensor]:
        """Representation mode, called by the backward: the backbone outputs' balanced directions."""
        cotangents = self._log_loss_cotangents(stacks, step.losses, step.present)
        jacobian = TaskJacobian([stack[0] for stack in cotangents], cotangents)
        balanced = self._balance(
            jacobian, step.losses, step.present, step.loss_scale, step.batch_idx, step.total, step.accumulation
        )
        if balanced is None:  # non-finite loss or task gradient, nonfinite_loss="skip": the optimizer step is skipped
            self._skip_optimizer_step = step.skipped = True
            return [torch.zeros_like(stack[0]) for stack in stacks]
        directions, step.weights = balanced
        return [d.to(stack.dtype) for d, stack in zip(directions, stacks)]

    def _log_loss_cotangents(self, cotangents: list[Tensor], losses: Tensor, present: Tensor) -> list[Tensor]:
        """For a method on ``log(L_k + eps)`` (DB-MTL), the cotangents of the logs: ``∂L_k / (L_k + eps)``."""
        if not self.balancer.log_losses:
            return cotangents
        losses = losses.detach()
        if self._world_size > 1:  # log of the global batch's loss, which DDP takes as the mean over processes
            losses = self._all_reduce(losses * present, "mean")
            present = losses > 0
        factors = torch.where(present, 1.0 / (losses + self.balancer.log_eps), 0.0)
        return [c * factors.view(-1, *([1] * (c.ndim - 1))).to(c.dtype) for c in cotangents]

    def _balance(
        self,
        jacobian: TaskJacobian,
        losses: Tensor,
        present: Tensor,
        loss_scale: float,
        batch_idx: int,
        total: Optional[Tensor] = None,
        accumulation: int = 1,
    ) -> Optional[tuple[list[Tensor], Optional[Tensor]]]:
        """The balancer on the task Jacobian: ``(directions shaped like jacobian.inputs, weights or None)``.

        ``jacobian`` holds the gradients of the loss as back-propagated, i.e. multiplied by
        ``loss_scale`` under ``16-mixed`` and, in representation mode, divided by ``accumulation``
        (Lightning divides the loss by ``accumulate_grad_batches`` before its backward); the balancer
        sees the task gradients themselves (like Lightning unscales before clipping) and the
        directions come back in the same units as the Jacobian. ``total`` (one process)
        is checked for finiteness in the same host sync as the Gramian (a named error for a NaN loss). Returns None
        when the step is to be skipped (``nonfinite_loss="skip"``); raises ``FloatingPointError`` on a
        non-finite task gradient otherwise. Under ``16-mixed`` an overflow gives the static direction,
        whose inf/NaN makes the GradScaler skip the step and lower its scale, with the balancer untouched.
        """
        units = loss_scale / accumulation  # the Jacobian's rows are the task gradients times this
        gramian = global_gramian(jacobian, self.gradients, self._world_size, self._all_reduce)
        if units != 1.0:
            gramian = gramian / units**2
        # One host read of the K x K Gramian (and, in one process, the loss) gives the finiteness verdict
        # (the same on every rank: the Gramian is global) and the tasks with a nonzero gradient.
        entries = gramian.reshape(-1)
        values = (entries if total is None else torch.cat([entries, total.detach().reshape(1).to(entries.dtype)])).tolist()
        num_tasks = gramian.shape[0]
        diagonal = values[: num_tasks * num_tasks : num_tasks + 1]
        if not all(map(math.isfinite, values)):
            if total is not None and not self._is_finite(total, losses, batch_idx):  # a non-finite loss: named
                return None
            if loss_scale == 1.0:
                bad = [name for name, g in zip(self.task_names, diagonal) if not math.isfinite(g)]
                message = f"non-finite task gradient for task(s) {bad} at global step {self.global_step} (batch {batch_idx})"
                if self.nonfinite_loss == "skip":
                    rank_zero_warn(message + "; the step is skipped (nonfinite_loss='skip')")
                    return None
                raise FloatingPointError(message + ". Check the data and learning rate, or pass nonfinite_loss='skip'.")
            weights = self.balancer.task_weights.to(losses.dtype) * present
            return jacobian.combine(weights), weights
        if self.balancer.needs == "gramian":
            weights = self.balancer.weights(gramian, losses.detach(), present, nonzero=[g > 0 for g in diagonal])
            return jacobian.combine(weights), weights
        flat = jacobian.flat()
        columns = None
        if self.gradients == "representation" and self._world_size > 1:
            flat, columns = self._in_global_columns(flat)
        direction = self.balancer(flat / units) * units if units != 1.0 else self.balancer(flat)
        return jacobian.split(direction if columns is None else direction[columns]), None

    def _in_global_columns(self, flat: Tensor) -> tuple[Tensor, slice]:
        """Representation mode under DDP, a direction method (GradDrop): this process's K x P columns at their place
        in the global batch's K x (world_size P) matrix, zero elsewhere, and that place.

        The columns are this process's samples. A method that draws per column (GradDrop's uniforms, seeded
        alike on every process) then draws for the global batch, as one process would, instead of giving
        sample i of every process the same draw. The blocks are ``P`` wide, the widest process's width.
        """
        width = int(self._all_reduce(torch.tensor(float(flat.shape[1]), device=flat.device), "max"))
        start = self.global_rank * width
        padded = flat.new_zeros(flat.shape[0], width * self._world_size)
        padded[:, start : start + flat.shape[1]] = flat
        return padded, slice(start, start + flat.shape[1])

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
        if self._state_before_scaled_step is not None:
            scale, state = self._state_before_scaled_step
            self._state_before_scaled_step = None
            if self._loss_scale() < scale:  # the GradScaler found inf/NaN and skipped the step: so does the balancer
                self.balancer.load_state_dict(state)

    def _is_logging_step(self) -> bool:
        """Whether Lightning writes step-level values to the logger after this training step."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return True if connector is None else bool(connector.should_update_logs)

    def _regularization(self, batch_size: int) -> Union[Tensor, float]:
        """Sum of the backbone's ``regularization_losses()`` (e.g. soft sharing), each logged as ``train/{name}``.

        Added after balancing: a regulariser is not a task, so balancers never re-weight it.
        """
        total: Union[Tensor, float] = 0.0
        terms = self._combined_regularization
        for name, value in (terms if terms is not None else self._regularization_losses()).items():
            self.log(f"train/{name}", value, batch_size=batch_size)
            total = total + value
        return total

    def _stack_losses(self, task_losses: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Task losses in registry order (0 for a task without one) and the mask of tasks that have one."""
        if len(task_losses) == len(self.task_names):  # every task present: the common case
            losses = torch.stack([task_losses[name] for name in self.task_names])
            self._all_present_mask = all_true(self._all_present_mask, len(self.task_names), losses.device)
            return losses, self._all_present_mask
        zero = next(iter(task_losses.values())).new_zeros(()) if task_losses else torch.zeros((), device=self.device)
        losses = torch.stack([task_losses.get(name, zero) for name in self.task_names])
        return losses, torch.tensor([name in task_losses for name in self.task_names], device=losses.device)

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
        values = {name: loss for name, loss in zip(self.task_names, losses.detach().tolist()) if not math.isfinite(loss)}
        bad = list(values)
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

    def _evaluation_step(self, batch: Any, stage: Stage, dataloader_idx: int) -> None:
        """Update the task losses and metrics of ``stage`` (of this dataloader); they are logged at the epoch's end."""
        metrics, task_losses = self._evaluation_metrics(stage, dataloader_idx)
        for name, prediction, target, maybe_missing in self._forward_groups(self._groups(batch))[1]:
            loss, prediction, target, count = self._loss(name, prediction, target, maybe_missing)
            if loss is None:
                continue
            task_losses[name].update(loss.detach(), weight=count)
            for metric in metrics[name].values():
                metric.update(prediction, target)

    def _evaluation_metrics(self, stage: Stage, dataloader_idx: int) -> tuple[nn.ModuleDict, nn.ModuleDict]:
        """``({task: {name: metric}}, {task: mean loss})`` of one evaluation dataloader: the module's own for the
        first, fresh copies (created at first use) for the others, so several dataloaders are never pooled."""
        own = (getattr(self, f"{stage}_metrics"), getattr(self, f"{stage}_task_losses"))
        if dataloader_idx == 0:
            return own
        key = (stage, dataloader_idx)
        if key not in self._more_evaluation_metrics:
            copies = copy.deepcopy(nn.ModuleList(own)).to(self.device)
            for module in copies.modules():
                if isinstance(module, Metric):
                    module.reset()
            self._more_evaluation_metrics[key] = (copies[0], copies[1])
        return self._more_evaluation_metrics[key]

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, "val", dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, "test", dataloader_idx)

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
    def _log_evaluation(self, stage: Stage) -> None:
        """Log ``{stage}/{task}/loss``, ``{stage}/{task}/{metric}`` and ``{stage}/loss`` for the epoch, then reset.

        Every process computes every task's values in the same order (each ``compute`` synchronises the
        processes), including tasks it had no label of: a key logged on some processes only would leave
        the others waiting in its synchronisation. A task with no labelled sample on any process is not
        logged. ``{stage}/loss`` is the static-weighted sum of the task losses of the tasks with data.
        With several dataloaders every key ends in ``/dataloader_idx_{i}``, one set per dataloader
        (Lightning's convention), never pooled; ``{stage}/loss`` without suffix is then the first
        dataloader's (which ``lr_scheduler``'s ``ReduceLROnPlateau`` and checkpoints monitoring it follow).
        """
        batches = getattr(self.trainer, f"num_{stage}_batches", None) if self._trainer is not None else None
        count = max(len(batches), 1) if isinstance(batches, list) else 1
        for index in range(count):
            metrics, task_losses = self._evaluation_metrics(stage, index)
            suffix = f"/dataloader_idx_{index}" if count > 1 else ""
            total, found = 0.0, False
            for name in self.task_names:
                value = _compute_quietly(task_losses[name])  # NaN for a task without data: not logged
                if torch.isfinite(value):
                    self.log(f"{stage}/{name}/loss{suffix}", value, add_dataloader_idx=False)
                    total, found = total + self.tasks[name].weight * value, True
                    for metric_name, metric in metrics[name].items():
                        self.log(f"{stage}/{name}/{metric_name}{suffix}", metric.compute(), add_dataloader_idx=False)
                task_losses[name].reset()
                for metric in metrics[name].values():
                    metric.reset()
            if found:
                self.log(f"{stage}/loss{suffix}", total, prog_bar=stage == "val", add_dataloader_idx=False)
                if index == 0 and suffix:  # what a scheduler or checkpoint monitoring {stage}/loss follows
                    self.log(f"{stage}/loss", total, add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def _log_train_metrics(self) -> None:
        """``train/{task}/{metric}`` for the epoch, computed on every process in the same order, then reset.

        A task's metrics are computed when any process updated them (one small reduction of that
        flag per task under DDP), so every process takes part in the same synchronisations.
        """
        for name in self.task_names:
            items = self._train_metric_items[name]
            if not items:
                continue
            updated = torch.tensor(float(any(metric.update_count > 0 for _, metric in items)), device=self.device)
            if self._world_size > 1:
                updated = self._all_reduce(updated, "sum")
            if updated.item() > 0:
                for metric_name, metric in items:
                    self.log(f"train/{name}/{metric_name}", _compute_quietly(metric))
            for _, metric in items:
                metric.reset()

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
        self._log_train_metrics()
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


def _num_samples(x: Any) -> int:
    """The number of samples of a backbone input: its (first tensor's) first dimension, else 1."""
    if isinstance(x, Tensor):
        return x.shape[0] if x.ndim else 1
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    return next((_num_samples(value) for value in values if isinstance(value, Tensor)), 1)


def _compute_quietly(metric: Metric) -> Tensor:
    """``metric.compute()`` without its warning when this process never updated it (no label of the task here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric.compute()
