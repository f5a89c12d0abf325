"""Two-process CPU DDP fits of every multi-task architecture, one after the other; run by a test.

Usage: python _ddp_arch_fit.py OUT_DIR [NAME ...]

For each architecture (all of ARCHITECTURES by default) it fits a MultiTaskModule for 2 epochs on a
small shared-input image dataset, under ``ddp_find_unused_parameters_true`` (SequentialTransfer
freezes the backbone mid-run; everything else uses every parameter in every step, so plain "ddp"
would do for them too) and writes OUT_DIR/{name}.rank{R}.json: the final parameters, the logged
training metrics and how many steps ran. Strategy "ddp" re-launches this script for rank 1, so the
test runs it in a subprocess (not under pytest) and can time out a hang.
"""

import json
import os
import sys
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_mtl import MultiTaskDataModule, MultiTaskModule, Task
from lightning_mtl.architectures import (
    CGC,
    MLP,
    MMoE,
    MTAN,
    OMoE,
    PLE,
    CrossStitch,
    DSelectK,
    RegressionHead,
    RNNEncoder,
    SmallCNN,
    SoftSharing,
)
from lightning_mtl.callbacks import GateStatistics, SequentialTransfer
from lightning_mtl.cli import end_process_group

TASKS = ["a", "b"]


def cnn():
    return SmallCNN(channels=(4, 8), out_features=16, input_size=(8, 8), batch_norm=True)


ARCHITECTURES = {
    "MMoE": lambda: MMoE(64, 16, 4, TASKS),
    "OMoE": lambda: OMoE(64, 16, 4, TASKS),
    "CGC": lambda: CGC(64, 16, TASKS, num_shared_experts=2),
    "PLE": lambda: PLE(64, 16, TASKS, num_levels=2),
    "DSelectK": lambda: DSelectK(64, 16, 6, TASKS, k=2, entropy_regularization=1e-3),
    "CrossStitch": lambda: CrossStitch(cnn(), TASKS),
    "MTAN": lambda: MTAN(cnn(), TASKS),
    "SoftSharing": lambda: SoftSharing(MLP(64, [16]), TASKS, weight=1e-2),
    "RNNEncoder": lambda: RNNEncoder(8, 8, bidirectional=True, input_layout="image_columns"),
    "SequentialTransfer": lambda: MLP(64, [16]),
}
GATED = {"MMoE", "OMoE", "CGC", "PLE", "DSelectK"}


class Images(Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 1, 8, 8, generator=g)
        self.a = (self.x[:, 0, :, :4].mean(dim=(1, 2)) > self.x[:, 0, :, 4:].mean(dim=(1, 2))).long()
        self.b = self.x.mean(dim=(1, 2, 3)) * 4

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {"a": self.a[i], "b": self.b[i]}


def fit(name: str, out_dir: str) -> None:
    pl.seed_everything(0, verbose=False)
    backbone = ARCHITECTURES[name]()
    width = 16
    tasks = [
        Task("a", nn.Linear(width, 2), nn.CrossEntropyLoss(), {"acc": MulticlassAccuracy(2, average="micro")}),
        Task("b", RegressionHead(width), nn.MSELoss()),
    ]
    model = MultiTaskModule(backbone, tasks, optimizer=lambda params: torch.optim.Adam(params, lr=1e-2))
    callbacks: list[pl.Callback] = []
    if name in GATED:
        callbacks.append(GateStatistics())
    if name == "SequentialTransfer":
        callbacks.append(SequentialTransfer(at_step=3))
    datamodule = MultiTaskDataModule(Images(44, 0), val=Images(16, 1), batch_size=8, shuffle=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_find_unused_parameters_true",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=datamodule)
    record = {
        "parameters": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
        "buffers": torch.cat([b.detach().float().flatten() for b in model.buffers()] or [torch.zeros(0)]).tolist(),
        "train": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")},
        "steps": trainer.global_step,
        "frozen": [not p.requires_grad for p in model.backbone.parameters()],
    }
    with open(os.path.join(out_dir, f"{name}.rank{trainer.global_rank}.json"), "w") as f:
        json.dump(record, f)


def main(out_dir: str, *names: str) -> None:
    warnings.filterwarnings("ignore")
    for name in names or ARCHITECTURES:
        fit(name, out_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])
    end_process_group()  # Lightning leaves the group alive; a gloo thread can abort the exit (rc -6)
