"""Two-process CPU DDP fit of the real MultiTaskModule on uneven per-task data; run by test_ddp.py.

Usage: python _ddp_module_fit.py OUT_DIR SAMPLING STRATEGY

Every rank writes OUT_DIR/rank{R}.json: its final parameters, the task keys of each training step
and the validation metrics it logged. Strategy "ddp" re-launches this script for rank 1, so the
test runs it in a subprocess (not under pytest) and can time out a hang.
"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_mtl import MultiTaskDataModule, MultiTaskModule, Task
from lightning_mtl.cli import end_process_group


def task_data(seed: int) -> dict[str, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    xa, xb = torch.randn(37, 4, generator=g), torch.randn(101, 4, generator=g)
    return {"a": TensorDataset(xa, (xa[:, 0] > 0).long()), "b": TensorDataset(xb, xb[:, 1] * 2)}


class Steps(pl.Callback):
    def __init__(self) -> None:
        self.tasks: list[list[str]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.tasks.append(sorted(batch))


def main(out_dir: str, sampling: str, strategy: str) -> None:
    pl.seed_everything(0, verbose=False)
    tasks = [
        Task("a", nn.Linear(8, 2), nn.CrossEntropyLoss(), {"acc": MulticlassAccuracy(2, average="micro")}),
        Task("b", nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), nn.MSELoss()),
    ]
    model = MultiTaskModule(nn.Sequential(nn.Linear(4, 8), nn.Tanh()), tasks)
    datamodule = MultiTaskDataModule(task_data(0), val=task_data(1), batch_size={"a": 4, "b": 8}, sampling=sampling)
    steps = Steps()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[steps],
    )
    trainer.fit(model, datamodule=datamodule)
    record = {
        "parameters": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
        "tasks": steps.tasks,
        "val": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
    }
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
    end_process_group()  # Lightning leaves the group alive; a gloo thread can abort the exit (rc -6)
