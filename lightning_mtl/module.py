"""`MultiTaskModule`: a shared backbone, one head per task, trained with Lightning's `Trainer`.

This file is the Lightning glue and reads as the story of a step; the work is done by units beside it:
:class:`~lightning_mtl.forward.TaskForward` (batches, backbone and heads, task losses),
:mod:`lightning_mtl.updates` (one balancing path per configuration),
:class:`~lightning_mtl.evaluation.TaskEvaluation` (metrics and evaluation losses) and
:class:`~lightning_mtl.nonfinite.NonfiniteCheck` (the ``nonfinite_loss`` policy). See
``docs/architecture.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import AttributeDict
from torch import Tensor, nn

from lightning_mtl.balancers import Balancer, Static, resolve_balancer
from lightning_mtl.checks import (
    check_balancer_under_sampling,
    check_data_tasks,
    check_gradient_strategy,
    check_no_shared_head_parameters,
    check_sampling_under_ddp,
    task_registry,
    warn_untrained,
)
from lightning_mtl.evaluation import TaskEvaluation, stage_metrics, stage_task_losses
from lightning_mtl.forward import Prediction, TaskForward
from lightning_mtl.gradients import GRADIENT_MODES, GradientMode
from lightning_mtl.meta import MetaSteps
from lightning_mtl.nonfinite import NonfiniteCheck, SkippedStepGuard
from lightning_mtl.run_config import describe
from lightning_mtl.runs import explain_load_error
from lightning_mtl.step import StepContext, StepRecord, StepView
from lightning_mtl.task import Task, task_module_dict
from lightning_mtl.updates import balancing_path

Stage = Literal["train", "val", "test"]


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
        gradients: which per-task gradients a gradient-level balancer combines: ``"parameters"``
            (default), the exact Jacobian of the task losses w.r.t. the shared parameters, or
            ``"representation"``, w.r.t. the backbone's output (MGDA-UB; cheaper, for shared-input
            batches). Loss-level balancers ignore it.

    Batches take either form (see the README): shared input ``(x, {task: y})`` or per-task inputs
    ``{task: (x, y)}`` holding any subset of the tasks. Unlabelled samples (class target equal to the
    loss's ``ignore_index``, default -100, or a NaN regression target) are left out of that task's
    loss and metrics; a task with no labelled sample in a step contributes nothing to it.

    After each training step's backward, :attr:`last_step` describes the step (task losses, weights,
    and the Gramian when per-task gradients were formed) for callbacks; :meth:`request_gramian` asks
    for the Gramian on a step whose balancer works on losses alone.

    Hyper-parameters: the constructor takes modules and callables, which do not belong in a
    checkpoint's ``hyper_parameters`` (they break ``weights_only`` loading), so none are saved; the
    ``lightning-mtl`` CLI saves the whole YAML config beside the logs instead. Restore a ``lightning-mtl``
    run with ``lightning_mtl.load_run(run_folder)``; otherwise with
    ``MultiTaskModule.load_from_checkpoint(path, backbone=..., tasks=...)`` or ``fit(ckpt_path=...)``.
    Loggers still get the run's description: :attr:`hparams_initial` adds ``"multitask"``, the module as
    plain data (:func:`lightning_mtl.run_config.describe`: tasks, balancer, gradient mode, optimizer,
    parameter counts), which Lightning logs to every logger when a run starts (``log_hyperparams``).
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
        self.tasks = task_registry(tasks)
        self.task_names = list(self.tasks)
        self.backbone = backbone
        check_tasks = getattr(backbone, "check_tasks", None)
        if check_tasks is not None:  # a multi-task architecture (MMoE, ...) built for a task list
            check_tasks(self.task_names)
        self.heads = task_module_dict({name: task.head for name, task in self.tasks.items()}, "heads")
        self.losses = task_module_dict(
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
            check_no_shared_head_parameters(self.backbone, self.heads, self.losses, self.balancer)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.nonfinite_loss = nonfinite_loss
        self.gradients = gradients
        self._regularization_losses = getattr(backbone, "regularization_losses", None)
        # torchmetrics objects per stage (deep copies: train/val/test never share state), and evaluation losses
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_metrics", stage_metrics(self.tasks))
        for stage in ("val", "test"):
            setattr(self, f"{stage}_task_losses", stage_task_losses(self.tasks))
        # The units that do the work (plain objects: nothing of theirs is a submodule or in the checkpoint).
        self.task_forward = TaskForward(self)
        self.evaluation = TaskEvaluation(self)
        self._build_balancing()
        self._seen_tasks: set[str] = set()
        # plain DDP (no find_unused_parameters): every parameter needs a gradient at every step
        self._ddp_needs_every_parameter = False
        self._last_batch: Any = None  # FAMO: the batch whose losses are recomputed after the optimizer step
        self._meta_steps: Optional[MetaSteps] = None  # Auto-Lambda: held-out batches before training steps (fit)
        self._step_record: Optional[StepRecord] = None  # the last training step, read through last_step
        self._gramian_requested = False
        self._unlabelled_steps = 0  # training steps of this epoch whose batch had no labelled sample
        # representation mode: what to log once the backward has weighted the step; a skip it asked for
        self._pending_log: Optional[tuple[StepRecord, int, bool]] = None
        self._skip_optimizer_step = False
        self._log_hyperparams = True  # Lightning logs hparams_initial (the description) to every logger at run start

    def _build_balancing(self) -> None:
        """The units that depend on the settings: rebuilt when ``balancer``, ``gradients`` or ``nonfinite_loss``
        is reassigned after construction (checked at every training step, as the settings were read then)."""
        self.nonfinite = NonfiniteCheck(self.nonfinite_loss, self.task_names, type(self.balancer).__name__)
        self.balancing = balancing_path(
            self.balancer, self.gradients, self.task_names, self.nonfinite, self.task_forward.parameter_lists
        )
        # a skipped optimizer step (nonfinite_loss="skip", or the 16-mixed GradScaler) leaves the balancer's state alone
        self.skipped_step_guard = SkippedStepGuard(self.balancer, self.nonfinite_loss)
        self._balancing_settings = (self.balancer, self.gradients, self.nonfinite_loss)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> "MultiTaskModule":  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``; without ``backbone=`` and ``tasks=`` (kept out of checkpoints) the
        ``TypeError`` names the :func:`lightning_mtl.load_run` call that rebuilds the model from its run."""
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except TypeError as error:
            explain_load_error(error, checkpoint_path)
            raise

    @property
    def hparams_initial(self) -> AttributeDict:
        """What Lightning gives every logger as hyper-parameters when a run starts (``log_hyperparams``, rank zero):
        any hyper-parameters a subclass saved, and ``"multitask"``: this module as plain data
        (:func:`lightning_mtl.run_config.describe`), read at that moment. Never in a checkpoint (``hparams`` stays
        empty); ``Trainer(enable_autolog_hparams=False)`` leaves it out of the loggers."""
        return AttributeDict({**super().hparams_initial, "multitask": describe(self)})

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for unit in (self.__dict__.get("task_forward"), self.__dict__.get("evaluation")):
            if unit is not None:  # a copy or an unpickled module: its units read this module
                unit.link(self)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Any) -> dict[str, Tensor]:
        """Run the backbone once and every head on its output: ``{task: prediction}``."""
        features = self.backbone(x)
        return {name: self.task_forward.head(name, features) for name in self.task_names}

    # ------------------------------------------------------------------ the training step
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._meta_steps is not None:  # a balancer that learns from held-out batches (needs_meta_batches)
            self._meta_steps.before_training_step(batch, batch_idx)

    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        """Forward, task losses, then the balancing path's loss (see ``docs/architecture.md``)."""
        try:
            return self._balanced_step(batch, batch_idx)
        finally:
            self.balancing.end_step()  # e.g. the layer recorder's global hook, after a step that ended early

    def _balanced_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        context = self._step_context(batch_idx)
        groups = self.task_forward.groups(batch)
        tap = self.balancing.tap(context)
        tap.sources, predictions = self.task_forward.run(groups, tap.captured, tap.balance)
        task_losses, counts = self._task_losses(predictions)
        self._last_batch = None
        self._pending_log = None
        empty = not task_losses
        if empty:
            self._warn_unlabelled_step()
            if self._world_size == 1:
                return None
            # The other processes run this step's collectives (finiteness flag, Jacobian or Gramian, balancer
            # state) and backward: this one takes part with every task absent and contributes zero gradients.
        losses, present = self.task_forward.stack_losses(task_losses)
        batch_size = max(counts.values(), default=1)
        log_tasks = self._is_logging_step()
        # Balancing runs in full precision: under autocast a K x K matmul or a solver would run in bf16/fp16.
        autocast = torch.is_autocast_enabled(losses.device.type)
        with torch.autocast(losses.device.type, enabled=False) if autocast else nullcontext():
            losses = losses.float()
            context.record.losses, context.record.present = losses.detach(), present
            total = self.balancing.combine(tap, losses, present, context, empty)
        if total is None:
            return self._skipped_step()
        if self.balancer.needs_losses_after_step:
            self._last_batch = batch
        if self.balancing.weights_after_backward:  # representation mode: the weights come in the backward
            self._pending_log = (context.record, batch_size, log_tasks)
        else:
            self._log_balance(losses.detach(), total, context.record.weights, batch_size, log_tasks)
        if empty or (self._ddp_needs_every_parameter and len(task_losses) < len(self.task_names)):
            # plain DDP fails on a parameter without gradient (an absent task's head, its UW term)
            total = total + self._zero_touching_parameters()
        if self._regularization_losses is not None:
            total = total + self._regularization(batch_size)
        # Each `self.log` call costs ~0.1 ms; per-task step values only reach the logger on its logging
        # steps (every `log_every_n_steps`), so without a progress bar they are logged only then. A progress
        # bar shows them every step, so that they move with train/loss instead of standing still in between.
        if log_tasks or self._progress_bar_shown():
            for name, loss in task_losses.items():
                self.log(f"train/{name}/loss", loss, prog_bar=True, batch_size=counts[name])
        return total

    def _progress_bar_shown(self) -> bool:
        trainer = self._trainer
        return trainer is not None and trainer.progress_bar_callback is not None

    def _step_context(self, batch_idx: int) -> StepContext:
        """The step's view of the run, and a fresh record of the step (read by :attr:`last_step`)."""
        if self._balancing_settings != (self.balancer, self.gradients, self.nonfinite_loss):
            self._build_balancing()
        scale = self._loss_scale()
        self.skipped_step_guard.before_micro_batch(scale)
        trainer = self._trainer
        self._step_record = record = StepRecord(self.global_step, batch_idx, tuple(self.task_names))
        wants_gramian, self._gramian_requested = self._gramian_requested, False
        return StepContext(
            batch_idx=batch_idx,
            global_step=self.global_step,
            world_size=self._world_size,
            rank=self.global_rank,
            all_reduce=self._all_reduce,
            all_gather=self.trainer.strategy.all_gather if trainer is not None else _unsqueeze,
            record=record,
            skip_optimizer_step=self._request_optimizer_skip,
            loss_scale=scale,
            accumulation=trainer.accumulate_grad_batches if trainer is not None else 1,
            wants_gramian=wants_gramian,
        )

    def _task_losses(self, predictions: list[Prediction]) -> tuple[dict[str, Tensor], dict[str, int]]:
        """Each task's loss over its labelled samples and their count; updates the training metrics."""
        task_losses: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        for name, prediction, target, maybe_missing in predictions:
            loss, prediction, target, count = self.task_forward.loss(name, prediction, target, maybe_missing)
            if loss is None:  # no labelled sample of this task in the step: it is not trained by it
                continue
            self._seen_tasks.add(name)
            task_losses[name] = loss
            counts[name] = count
            self.evaluation.update_train(name, prediction, target)
        return task_losses, counts

    def _warn_unlabelled_step(self) -> None:
        """A batch without any labelled sample: warned about once per epoch, counted, summed up at its end."""
        self._unlabelled_steps += 1
        if self._unlabelled_steps == 1:
            effect = "the step is skipped" if self._world_size == 1 else "it contributes zero gradients to the step"
            warnings.warn(
                f"step {self.global_step}: no task had a labelled sample in this process's batch; {effect}. Further "
                "such steps of this epoch are counted and reported at the epoch's end."
            )

    def _skipped_step(self) -> Tensor:
        """A step skipped by ``nonfinite_loss="skip"``: the whole optimizer step is skipped, on every process.

        Returns a zero loss whose backward gives every trainable parameter a zero gradient instead of
        None: Lightning refuses None from ``training_step`` under DDP, and under accumulation None would
        only drop this micro-batch while the optimizer still stepped on the others. The flag makes
        ``on_before_optimizer_step`` drop every gradient, as a non-finite gradient found in a
        representation-mode backward does.
        """
        if self._step_record is not None:
            self._step_record.skipped = True
        self._request_optimizer_skip()
        return self._zero_touching_parameters()

    def _request_optimizer_skip(self) -> None:
        self._skip_optimizer_step = True
        self.skipped_step_guard.skip()

    # ------------------------------------------------------------------ what callbacks see of a step
    @property
    def last_step(self) -> Optional[StepView]:
        """The last training step as the balancer saw it (a :class:`~lightning_mtl.StepView`), or None.

        Complete from the step's ``on_after_backward`` on (in representation mode the weights are set by
        the backward), so ``on_before_optimizer_step`` and ``on_train_batch_end`` read the current step.
        None before the first training step and for a step that had no labelled sample (one process).
        Building the view costs nothing: its tensors are the step's own, detached.
        """
        return None if self._step_record is None else self._step_record.view()

    def request_gramian(self) -> None:
        """Ask for the K × K Gramian of the *next* training step's task gradients in :attr:`last_step`.

        Gradient-level balancers form it anyway (it is in ``last_step.gramian`` whenever the step balanced
        something); for a loss-level balancer (static weights included) this costs one batched backward
        of the K task losses on that step, on the side: the update is unchanged. Under DDP every process
        must ask on the same steps (the Jacobian, or in representation mode the Gramian, is reduced
        across them), e.g. from a callback's ``on_train_batch_start`` deciding by ``trainer.global_step``.
        """
        self._gramian_requested = True

    # ------------------------------------------------------------------ logging
    def _log_balance(
        self, losses: Tensor, total: Tensor, weights: Optional[Tensor], batch_size: int, log_tasks: bool
    ) -> None:
        """Log ``train/loss`` (for a gradient-level balancer the weighted sum ``Σ w_k L_k``) and the weights."""
        if self.balancer.needs != "losses" and weights is not None:  # float64 weights of a float64 model: losses are float32
            # elementwise, not `@`: in parameter mode this runs under the step's autocast, which would take a bf16 matmul
            combined = (weights.detach().to(losses.dtype) * losses).sum()
        else:
            combined = total
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
            record, batch_size, log_tasks = self._pending_log
            self._pending_log = None
            if not record.skipped:
                self._log_balance(record.losses, record.losses.sum(), record.weights, batch_size, log_tasks)

    def _regularization(self, batch_size: int) -> Union[Tensor, float]:
        """Sum of the backbone's ``regularization_losses()`` (e.g. soft sharing), each logged as ``train/{name}``.

        Added after balancing: a regulariser is not a task, so balancers never re-weight it.
        """
        total: Union[Tensor, float] = 0.0
        terms = self.task_forward.combined_regularization
        for name, value in (terms if terms is not None else self._regularization_losses()).items():
            self.log(f"train/{name}", value, batch_size=batch_size)
            total = total + value
        return total

    def _is_logging_step(self) -> bool:
        """Whether Lightning writes step-level values to the logger after this training step."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return True if connector is None else bool(connector.should_update_logs)

    # ------------------------------------------------------------------ the optimizer step
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._skip_optimizer_step:  # a skipped step, or a representation-mode backward found a non-finite gradient
            self._skip_optimizer_step = False
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        skipped = self.skipped_step_guard.after_optimizer_step(self._loss_scale())  # state put back if skipped
        if self._last_batch is not None and not skipped:  # the balancer asked for the losses after the update (FAMO)
            forward = self.task_forward
            with torch.no_grad(), self.trainer.precision_plugin.forward_context():
                _, predictions = forward.run(forward.groups(self._last_batch))
                losses = [forward.loss(*prediction)[0] for prediction in predictions]
                by_name = {prediction[0]: loss for prediction, loss in zip(predictions, losses) if loss is not None}
            self.balancer.after_optimizer_step(forward.stack_losses(by_name)[0].float())
        self._last_batch = None

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation.evaluation_step(batch, "val", dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation.evaluation_step(batch, "test", dataloader_idx)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """``{task: prediction}``: for a per-task batch, each task's head on its own input."""
        if isinstance(batch, Mapping):
            out = {}
            for name, item in batch.items():
                x = item[0] if isinstance(item, (tuple, list)) else item
                out[name] = self.task_forward.head(name, self.backbone(x))
            return out
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    def on_validation_epoch_end(self) -> None:
        self.evaluation.log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self.evaluation.log_evaluation("test")

    # ------------------------------------------------------------------ fit set-up and epoch ends
    def setup(self, stage: str) -> None:
        self.task_forward.parameters_cache = None
        strategy = self.trainer.strategy
        plain_ddp = isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False)
        self._ddp_needs_every_parameter = plain_ddp and self.trainer.world_size > 1
        if stage == "fit":
            check_balancer_under_sampling(self.trainer.datamodule, self.balancer)
            check_sampling_under_ddp(self.trainer.datamodule, plain_ddp)
            self._check_gradient_strategy()
            if self.trainer.world_size > 1:
                self.balancer.all_reduce_mean = partial(self._all_reduce, op="mean")
            self._meta_steps = MetaSteps(self) if self.balancer.needs_meta_batches else None

    def _check_gradient_strategy(self) -> None:
        check_gradient_strategy(self.trainer.strategy, self.balancer, self.gradients)

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        check_data_tasks(getattr(datamodule, "task_names", None) if datamodule else None, self.task_names)
        self.evaluation.renew_inference_states()  # after a trainer.validate/test of the same module

    def on_train_epoch_end(self) -> None:
        if self._unlabelled_steps > 1:
            warnings.warn(
                f"epoch {self.current_epoch}: {self._unlabelled_steps} training steps had no labelled sample in this "
                "process's batch"
            )
        self._unlabelled_steps = 0
        self.evaluation.log_train_metrics()
        self.balancer.on_train_epoch_end()
        if self.current_epoch == 0 or not self._seen_tasks:
            warn_untrained(self.task_names, self._seen_tasks, "no training batch of the epoch had labels")

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

    # ------------------------------------------------------------------ the run
    @property
    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def _parameter_lists(self) -> tuple[tuple[nn.Parameter, ...], tuple[nn.Parameter, ...]]:
        return self.task_forward.parameter_lists()

    def _zero_touching_parameters(self) -> Tensor:
        """A zero loss whose backward gives every trainable parameter a (zero) gradient."""
        return sum(p.reshape(-1)[0] for p in self._parameter_lists()[1] if p.requires_grad) * 0.0

    def _loss_scale(self) -> float:
        """The GradScaler's current scale under ``16-mixed`` (1.0 otherwise)."""
        scaler = getattr(self._trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def _all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        return self.trainer.strategy.reduce(tensor, reduce_op=op)


def _unsqueeze(tensor: Tensor) -> Tensor:
    """``all_gather`` in one process, without a ``Trainer``: the tensor as the only row."""
    return tensor.unsqueeze(0)
