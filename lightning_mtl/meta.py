"""Meta steps: held-out batches for a balancer that learns from them during training (Auto-Lambda).

A balancer declaring ``needs_meta_batches`` (:class:`~lightning_mtl.balancers.AutoLambda`) gets, before the
training step of each optimizer step it asks for, one *meta batch* from the data module's ``meta_dataloader()``
(``MultiTaskDataModule(meta=...)``) and the module's forward. :class:`MetaSteps` is the module's unit that does
this; the balancer itself never sees the ``Trainer``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_mtl.data.loader import SHARED_INPUT, EndlessLoader
from lightning_mtl.forward import ModuleUnit

if TYPE_CHECKING:
    from lightning_mtl.module import MultiTaskModule


class MetaSteps(ModuleUnit):
    """Runs the balancer's meta step before training steps: one per optimizer step it asks for.

    Built at fit set-up; a data module without meta batches is refused then, before any step. The meta batch
    is drawn at the balancer's saved position (:class:`~lightning_mtl.data.loader.EndlessLoader`), moved to the
    device as Lightning moves training batches, and the balancer runs the module's forward on it and on the
    step's training batch, in the run's precision. The model's buffers (BatchNorm statistics) are put back
    afterwards and the global random generators are left as they were (drawing the meta batch does not advance
    them either): the meta step changes the balancer's state only.
    """

    def __init__(self, module: "MultiTaskModule") -> None:
        super().__init__(module)
        trainer = module.trainer
        datamodule = trainer.datamodule
        meta_dataloader = getattr(datamodule, "meta_dataloader", None)
        if meta_dataloader is None:
            where = "no data module" if datamodule is None else f"the data module {type(datamodule).__name__}"
            raise ValueError(
                f"balancer {type(module.balancer).__name__} learns from held-out batches during training, and {where} "
                "gives none: fit with datamodule=MultiTaskDataModule(train=..., meta=...) (the `meta` argument: a "
                "held-out Dataset or {task: Dataset}), or a data module with a meta_dataloader() method."
            )
        self.stream = EndlessLoader(meta_dataloader())
        meta_tasks = getattr(getattr(self.stream.loader, "sampler", None), "tasks", [SHARED_INPUT])
        check = getattr(module.balancer, "check_meta_tasks", None)
        if check is not None and SHARED_INPUT not in meta_tasks:  # per-task data: the tasks are known before any step
            check(meta_tasks)

    def before_training_step(self, batch: Any, batch_idx: int) -> None:
        """The meta step, if the balancer asks for one at this optimizer step (first micro-batch of its window)."""
        module = self.module
        trainer, balancer = module.trainer, module.balancer
        if batch_idx % trainer.accumulate_grad_batches or not balancer.meta_step_due(trainer.global_step):
            return
        self.stream.seek(balancer.meta_batches)
        with torch.random.fork_rng(devices=[]):  # a new DataLoader iterator draws its base seed from the global RNG
            meta_batch = next(self.stream)
        meta_batch = self._to_device(meta_batch)
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        parameters = [p for p in module.task_forward.parameter_lists()[1] if p.requires_grad]
        with self._buffers_kept():
            balancer.meta_step(self._task_losses, parameters, batch, meta_batch, lr, module._loss_scale())

    def _task_losses(self, batch: Any) -> tuple[Tensor, Tensor]:
        """The task losses of ``batch`` (K,) with their graph, and which tasks have labels in it.

        In the run's precision; a forward without a graph (the balancer's finite-difference forwards) with autocast
        off, in the parameters' dtype: the difference of two close losses would be mostly bf16/fp16 rounding."""
        forward = self.module.task_forward
        full_precision = nullcontext() if torch.is_grad_enabled() else torch.autocast(self.module.device.type, enabled=False)
        with self.module.trainer.precision_plugin.forward_context(), full_precision:
            _, predictions = forward.run(forward.groups(batch))
            by_name = {}
            for prediction in predictions:
                loss = forward.loss(*prediction)[0]
                if loss is not None:
                    by_name[prediction[0]] = loss
        losses, present = forward.stack_losses(by_name)
        return losses.float(), present

    def _to_device(self, batch: Any) -> Any:
        """As Lightning's fit loop prepares a training batch before ``on_train_batch_start``."""
        trainer = self.module.trainer
        batch = trainer.precision_plugin.convert_input(batch)
        batch = self.module._on_before_batch_transfer(batch, dataloader_idx=0)
        return trainer.strategy.batch_to_device(batch, dataloader_idx=0)

    @contextmanager
    def _buffers_kept(self) -> Iterator[None]:
        module = self.module
        buffers = [b for part in (module.backbone, module.heads, module.losses) for b in part.buffers()]
        saved = [b.clone() for b in buffers]
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in zip(buffers, saved):
                    buffer.copy_(value)
