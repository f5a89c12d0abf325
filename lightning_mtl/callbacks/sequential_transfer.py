"""`SequentialTransfer`: learn a representation on some tasks, then freeze it (or slow it) for the others."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lightning_mtl.architectures.base import MultiTaskBackbone

_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr", "base_lr")


# A scheduler's per-group lists, extended for the new group (torch zips them with the param groups):
# learning rates scaled like the group, the rest (lambdas, momenta, ReduceLROnPlateau's floors) copied.
_PER_GROUP_LISTS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs", "lr_lambdas", "base_momentums", "max_momentums")
_SCALED_LISTS = ("base_lrs", "_last_lr", "max_lrs")

class SequentialTransfer(pl.Callback):
    """Switches a module (the backbone by default) from learning to transfer once, mid-training.

    Sequential transfer learns a representation on a source task and then reuses it for the others
    (the pretrain-then-fine-tune recipe; see Ruder, 2017, "An Overview of Multi-Task Learning in
    Deep Neural Networks"). The switch happens at exactly one of these triggers:

    - ``source_tasks``: at the first training batch that holds a task outside ``source_tasks``. With
      ``MultiTaskDataModule(train={...}, sampling="sequential")`` an epoch runs all batches of the
      first task, then all of the second, and so on (in the mapping's order), so listing the first
      task(s) here pretrains the backbone on them and switches exactly when the next task starts.
      Later epochs start again with the source tasks; the switch is permanent, so from then on
      only the heads (or, with ``"scale_lr"``, the heads and a slowly moving backbone) learn. Use
      ``max_epochs=1`` for a single pass, or repeat each task's dataset to pretrain longer. Needs
      per-task batches (``{task: (x, y)}``).
    - ``at_epoch``: at the start of that (0-based) training epoch.
    - ``at_step``: at the first training batch with ``trainer.global_step >= at_step``.

    ``mode``:

    - ``"freeze"``: the module's parameters stop requiring gradients (their ``.grad`` is cleared, so
      the optimizer skips them) and the module runs in eval mode during training (dropout off,
      BatchNorm statistics frozen), as a fixed feature extractor. Under DDP this needs
      ``strategy="ddp_find_unused_parameters_true"`` (which per-task sampling needs anyway).
    - ``"scale_lr"``: the module's parameters move into their own optimizer parameter group(s) with
      the learning rate multiplied by ``lr_scale``; optimizer state (e.g. Adam moments) is kept, and
      learning-rate schedulers follow: their per-group lists (``base_lrs``, ``max_lrs``, ``lr_lambdas``,
      momenta, ``ReduceLROnPlateau``'s ``min_lrs``) get an entry for the new group (learning rates scaled).
      A callback reused for another ``fit`` applies a switch it has made again at that fit's start.

    The callback's state (whether it has switched) is saved in checkpoints; resuming re-applies the
    switch before the optimizer state is restored.

    Args:
        source_tasks: tasks learned before the switch (trigger 1).
        at_epoch: epoch at which to switch (trigger 2).
        at_step: global step at which to switch (trigger 3).
        mode: ``"freeze"`` or ``"scale_lr"``.
        lr_scale: learning-rate multiplier of ``"scale_lr"`` (> 0; below 1 slows the module down).
        module: attribute of the ``LightningModule`` to switch, ``"backbone"`` by default.

    Attributes:
        switched: whether the switch has happened.
        switch_step: ``trainer.global_step`` at the switch, or ``None``.
    """

    def __init__(
        self,
        source_tasks: Optional[Sequence[str]] = None,
        at_epoch: Optional[int] = None,
        at_step: Optional[int] = None,
        mode: Literal["freeze", "scale_lr"] = "freeze",
        lr_scale: float = 0.1,
        module: str = "backbone",
    ) -> None:
        triggers = [name for name, value in (("source_tasks", source_tasks), ("at_epoch", at_epoch), ("at_step", at_step)) if value is not None]
        if len(triggers) != 1:
            raise ValueError(
                f"SequentialTransfer: give exactly one of `source_tasks`, `at_epoch`, `at_step`; got {triggers or 'none'}."
            )
        if source_tasks is not None:
            if isinstance(source_tasks, str) or not isinstance(source_tasks, Sequence) or not source_tasks:
                raise ValueError(f"SequentialTransfer: `source_tasks` must be a non-empty list of task names, got {source_tasks!r}.")
        for name, value in (("at_epoch", at_epoch), ("at_step", at_step)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"SequentialTransfer: `{name}` must be an int >= 0, got {value!r}.")
        if mode not in ("freeze", "scale_lr"):
            raise ValueError(f"SequentialTransfer: `mode` must be 'freeze' or 'scale_lr', got {mode!r}.")
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not lr_scale > 0:
            raise ValueError(f"SequentialTransfer: `lr_scale` must be a number > 0, got {lr_scale!r}.")
        self.source_tasks = list(source_tasks) if source_tasks is not None else None
        self.at_epoch, self.at_step = at_epoch, at_step
        self.mode, self.lr_scale, self.module_name = mode, float(lr_scale), module
        self.switched = False
        self.switch_step: Optional[int] = None
        self._applied = False

    # ------------------------------------------------------------------ checks
    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        target = getattr(pl_module, self.module_name, None)
        if not isinstance(target, nn.Module) or not any(True for _ in target.parameters()):
            raise ValueError(
                f"SequentialTransfer: `module={self.module_name!r}` must name an nn.Module attribute with parameters "
                f"of {type(pl_module).__name__}, got {type(target).__name__}."
            )
        return target

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._applied = False  # a new fit (the callback reused, or resumed): a made switch is applied again at its start
        self._target(pl_module)
        tasks = getattr(pl_module, "task_names", None)
        backbone = getattr(pl_module, "backbone", None)
        if isinstance(backbone, MultiTaskBackbone) and tasks is not None:
            backbone.check_tasks(tasks)
        if self.source_tasks is not None and tasks is not None:
            unknown = [task for task in self.source_tasks if task not in tasks]
            if unknown:
                raise ValueError(f"SequentialTransfer: `source_tasks` has task(s) {unknown} that the model lacks; its tasks are {list(tasks)}.")
        strategy = trainer.strategy
        if (
            self.mode == "freeze"
            and isinstance(strategy, DDPStrategy)
            and not strategy._ddp_kwargs.get("find_unused_parameters", False)
        ):
            raise ValueError(
                "SequentialTransfer(mode='freeze') stops gradients of parameters that plain DDP expects in every step; "
                "use Trainer(strategy='ddp_find_unused_parameters_true') or mode='scale_lr'."
            )

    # ------------------------------------------------------------------ triggers
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.switched and not self._applied:  # resumed from a checkpoint taken after the switch
            self._apply(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.switched and self.at_epoch is not None and trainer.current_epoch >= self.at_epoch:
            self._switch(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.switched:
            if self.at_step is not None and trainer.global_step >= self.at_step:
                self._switch(trainer, pl_module)
            elif self.source_tasks is not None and any(task not in self.source_tasks for task in _batch_tasks(batch)):
                self._switch(trainer, pl_module)
        if self.switched and self.mode == "freeze":
            self._target(pl_module).eval()  # Lightning puts the model back in train mode after validation

    # ------------------------------------------------------------------ the switch
    def _switch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.switched = True
        self.switch_step = trainer.global_step
        self._apply(trainer, pl_module)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = self._target(pl_module)
        self._applied = True
        if self.mode == "freeze":
            for parameter in target.parameters():
                parameter.requires_grad_(False)
                parameter.grad = None
            target.eval()
            return
        chosen = {id(p) for p in target.parameters()}
        for optimizer in trainer.optimizers:
            added: list[tuple[int, dict[str, Any]]] = []
            for index, group in enumerate(optimizer.param_groups):
                moved = [p for p in group["params"] if id(p) in chosen]
                if not moved or group.get("sequential_transfer"):
                    continue
                group["params"] = [p for p in group["params"] if id(p) not in chosen]
                new = {key: value for key, value in group.items() if key != "params"}
                for key in _LR_KEYS:
                    if isinstance(new.get(key), (int, float)):
                        new[key] = new[key] * self.lr_scale
                new["params"] = moved
                new["sequential_transfer"] = True
                added.append((index, new))
            for index, new in added:
                optimizer.add_param_group(new)
                for config in trainer.lr_scheduler_configs:
                    scheduler = config.scheduler
                    if getattr(scheduler, "optimizer", None) is not optimizer:
                        continue
                    for attribute in _PER_GROUP_LISTS:
                        values = getattr(scheduler, attribute, None)
                        if isinstance(values, list) and len(values) == len(optimizer.param_groups) - 1:
                            value = values[index]
                            values.append(value * self.lr_scale if attribute in _SCALED_LISTS else value)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"switched": self.switched, "switch_step": self.switch_step}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.switched = bool(state_dict["switched"])
        self.switch_step = state_dict.get("switch_step")
        self._applied = False


def _batch_tasks(batch: Any) -> list[str]:
    if isinstance(batch, Mapping):
        return list(batch)
    raise ValueError(
        "SequentialTransfer(source_tasks=...) switches when a batch holds another task, which needs per-task batches "
        "{task: (x, y)} (MultiTaskDataModule with a mapping of datasets, e.g. sampling='sequential'); this batch is a "
        f"{type(batch).__name__} holding every task. Use at_epoch or at_step instead."
    )
