"""`GateStatistics`: per-expert gate load of mixture-of-experts architectures, logged every epoch."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_mtl.architectures.base import MultiTaskBackbone


class GateStatistics(pl.Callback):
    """Logs the mean gate weight of every expert, per gate, over each training epoch.

    A collapsed mixture of experts (every task's gate sending all its weight to one or two experts,
    the others idle) shows up as mean weights near 1 and 0 and a low entropy. For every gate of the
    backbone (``"{task}/gate"`` for MMoE, OMoE, CGC, DSelectK and PLE's last level; PLE's inner levels
    add ``"{task}/gate_level{l}"`` and ``"shared/gate_level{l}"``) it logs at the end of each training
    epoch

    - ``train/{gate}/{expert}``: the weight the gate gave that expert, averaged over all training
      samples of the epoch (e.g. ``train/t1/gate/expert_3``; CGC/PLE name experts
      ``{task}_expert_{i}`` and ``shared_expert_{i}``);
    - ``train/{gate}/entropy`` (with ``log_entropy=True``): the entropy (nats) of that mean
      distribution, between 0 (one expert takes everything) and ``log(num_experts)`` (uniform load).

    The backbone must keep its last forward's gate weights in ``last_gate_weights`` (``{gate:
    (batch, num_experts)}``, as the architectures of :mod:`lightning_mtl.architectures` do); a
    forward hook accumulates them after every training forward (so per-task batches that run the
    backbone several times per step all count), counting the forwards of the training loop (the
    trainer's stage, so a backbone frozen in eval mode by ``SequentialTransfer`` still counts), not
    validation's or no-grad ones. Under DDP the sums are reduced over processes, so every rank logs
    the global mean; a gate that no training sample reached in the epoch is not logged. The values
    accumulate as tensors, without synchronising the device in the training loop.

    Args:
        log_entropy: also log the entropy of each gate's mean weights.
    """

    def __init__(self, log_entropy: bool = True) -> None:
        self.log_entropy = log_entropy
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, Tensor] = {}
        self._names: dict[str, list[str]] = {}
        self._handle: Optional[RemovableHandle] = None
        self._trainer: Optional[pl.Trainer] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        backbone = getattr(pl_module, "backbone", None)
        if backbone is None or not hasattr(backbone, "last_gate_weights"):
            raise ValueError(
                f"GateStatistics: the model's backbone ({type(backbone).__name__}) keeps no gate weights "
                "(`last_gate_weights`); use it with a mixture-of-experts architecture (MMoE, OMoE, CGC, PLE, DSelectK)."
            )
        if isinstance(backbone, MultiTaskBackbone) and hasattr(pl_module, "task_names"):
            backbone.check_tasks(pl_module.task_names)
        self._names = dict(getattr(backbone, "gate_expert_names", {}))
        self._trainer = trainer
        if self._handle is None:
            self._handle = backbone.register_forward_hook(self._accumulate)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _accumulate(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        # The trainer's stage, not the module's mode, tells a training forward: a backbone may run in eval mode
        # while it trains (SequentialTransfer(mode="freeze")); no-grad forwards (FAMO's recompute) do not count.
        if self._trainer is None or not self._trainer.training or not torch.is_grad_enabled():
            return
        for gate, weights in module.last_gate_weights.items():
            total = weights.float().sum(dim=0)
            count = torch.tensor(weights.shape[0], dtype=torch.float32, device=weights.device)
            if gate in self._sums:
                self._sums[gate] += total
                self._counts[gate] += count
            else:
                self._sums[gate], self._counts[gate] = total, count

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sums, self._counts = {}, {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gates = list(self._names) or sorted(self._sums)
        for gate in gates:
            names = self._names.get(gate)
            if gate in self._sums:
                total, count = self._sums[gate], self._counts[gate]
            elif names is not None:  # no training forward on this process; still join the reduction
                total = torch.zeros(len(names), device=pl_module.device)
                count = torch.zeros((), device=pl_module.device)
            else:
                continue
            if trainer.world_size > 1:
                total = trainer.strategy.reduce(total, reduce_op="sum")
                count = trainer.strategy.reduce(count, reduce_op="sum")
            if not count.item():  # no training sample reached this gate in the epoch: nothing to average
                continue
            mean = total / count
            names = names or [f"expert_{i}" for i in range(mean.numel())]
            for name, value in zip(names, mean):
                pl_module.log(f"train/{gate}/{name}", value, on_step=False, on_epoch=True)
            if self.log_entropy:
                entropy = -(mean * torch.log(mean.clamp_min(1e-12))).sum()
                pl_module.log(f"train/{gate}/entropy", entropy, on_step=False, on_epoch=True)
        self._sums, self._counts = {}, {}
