"""Two-process CPU DDP fit over uneven per-task datasets; run as a script by test_data_trainer.py.

Usage: python _ddp_fit.py OUT_DIR MODE [MODE ...]

For each sampling mode, every rank writes OUT_DIR/MODE-rank{R}.json with the task keys and sample
ids of each training and validation step. Strategy "ddp" re-launches this script for rank 1, so the
test runs it in a subprocess (not under pytest) and can time out a hang.
"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import TensorDataset

from lightning_mtl.cli import end_process_group
from lightning_mtl.data import MultiTaskDataModule

SIZES = {"a": 37, "b": 101}
OFFSETS = {"a": 0, "b": 1000}
BATCH_SIZE = {"a": 4, "b": 8}


def task_datasets() -> dict[str, TensorDataset]:
    # x is the sample id (offset + index), so batches tell which samples they hold.
    return {
        task: TensorDataset(torch.arange(size, dtype=torch.float64).unsqueeze(1) + OFFSETS[task], torch.zeros(size))
        for task, size in SIZES.items()
    }


class Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 1, dtype=torch.float64)
        self.train_steps: list[dict] = []
        self.val_steps: list[dict] = []

    @staticmethod
    def _ids(batch: dict) -> dict[str, list[int]]:
        return {task: [int(v) for v in x.flatten().tolist()] for task, (x, _) in batch.items()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.train_steps.append({"epoch": self.current_epoch, "batch_idx": batch_idx, "ids": self._ids(batch)})
        # One shared layer used by every task: all parameters get gradients at every step.
        return sum(self.linear(x / 1000).pow(2).mean() for x, _ in batch.values())

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not self.trainer.sanity_checking:
            self.val_steps.append({"epoch": self.current_epoch, "batch_idx": batch_idx, "ids": self._ids(batch)})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out_dir: str, modes: list[str]) -> None:
    for mode in modes:
        data = task_datasets()
        datamodule = MultiTaskDataModule(data, val=data, batch_size=BATCH_SIZE, sampling=mode, seed=3)
        model = Recorder()
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            use_distributed_sampler=True,  # the default; the loader must pass through untouched
            max_epochs=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, datamodule=datamodule)
        loader = trainer.fit_loop._combined_loader.flattened[0]
        record = {
            "rank": trainer.global_rank,
            "world_size": loader.sampler.world_size,
            "loader_type": type(loader).__name__,
            "num_steps": len(loader),
            "train": model.train_steps,
            "val": model.val_steps,
        }
        with open(os.path.join(out_dir, f"{mode}-rank{trainer.global_rank}.json"), "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    end_process_group()  # Lightning leaves the group alive; a gloo thread can abort the exit (rc -6)
