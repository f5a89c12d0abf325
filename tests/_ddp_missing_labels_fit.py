"""Two-process plain-DDP fit where rank 0 never sees a label of task "b", and its first batch has no label at all.

Usage: python _ddp_missing_labels_fit.py OUT_DIR BALANCER [GRADIENTS]

Shared-input batches ``(x, {"a": class, "b": value})``; a fixed sampler (Lightning's own sampler
injection is off) gives rank r the indices r, r + 2, ...: every even index has a NaN "b" target, and indices 0–15 also have
"a" = -100, so rank 0's first batch (8 samples) is entirely unlabelled. Under plain DDP (no
``find_unused_parameters``) the head of "b" on rank 0 (and a UW log-variance) would get no gradient.
Every parameter is its own DDP gradient bucket, so the buckets' all-reduces interleave with any collective
that a balancer runs inside the backward (representation mode) in a different order on each rank.
Both tasks have a metric, and the same data is the validation set. Every rank writes
OUT_DIR/rank{R}.json with its final parameters, its number of backward passes and the epoch metrics.
"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch import nn
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning.pytorch.strategies import DDPStrategy

from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import MeanAbsoluteError

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.cli import end_process_group


class EveryOtherIndex(Sampler):
    """Rank r reads indices r, r + 2, ..., in order (read at iteration time, after DDP set-up)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __iter__(self):
        return iter(range(dist.get_rank(), self.size, 2))

    def __len__(self) -> int:
        return self.size // 2


def collate(items):
    x, a, b = (torch.stack(column) for column in zip(*items))
    return x, {"a": a, "b": b}


class Backwards(pl.Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_after_backward(self, trainer, module) -> None:
        self.count += 1


def main(out_dir: str, balancer: str, gradients: str = "parameters") -> None:
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    a = (x[:, 0] > 0).long()
    b = x[:, 1] * 2
    b[0::2] = float("nan")
    a[:16:2] = -100
    # Metrics on both tasks: rank 0 never updates b's, which must not leave rank 1 alone in their synchronisation.
    tasks = [
        Task("a", nn.Linear(8, 2), nn.CrossEntropyLoss(), {"acc": MulticlassAccuracy(2, average="micro")}),
        Task("b", nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), nn.MSELoss(), {"mae": MeanAbsoluteError()}),
    ]
    model = MultiTaskModule(nn.Sequential(nn.Linear(4, 8), nn.Tanh()), tasks, balancer=None if balancer == "none" else balancer, gradients=gradients)
    loader = DataLoader(TensorDataset(x, a, b), batch_size=8, sampler=EveryOtherIndex(64), collate_fn=collate)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(bucket_cap_mb=1e-5),  # one bucket per parameter
        use_distributed_sampler=False,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[backwards := Backwards()],
    )
    trainer.fit(model, loader, loader)  # the same data for validation: rank 0 has no label of b there either
    record = {
        "metrics": {key: float(value) for key, value in trainer.callback_metrics.items() if "/" in key},
        "parameters": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
        "steps": trainer.global_step,
        "backwards": backwards.count,
    }
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
    end_process_group()  # Lightning leaves the group alive; a gloo thread can abort the exit (rc -6)
