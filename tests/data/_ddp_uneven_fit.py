"""Two-process CPU DDP fits whose ranks build datasets of different lengths; run by test_data_trainer.py.

Usage: python _ddp_uneven_fit.py OUT_DIR CASE [CASE ...]

Cases (see ``CASES``): rank 1 builds task ``b`` (or the shared-input dataset) one sample longer than
rank 0, which with these sizes gives it one more batch per epoch: ``per_task_val`` (with a validation
split), ``per_task`` (without one), ``shared_input_val`` (a single shared-input dataset); then
``per_task_equal`` and ``shared_input_equal`` (the same lengths everywhere: they train). Each rank
writes OUT_DIR/CASE-rank{R}.json with the error it raised (``None`` if none) and the number of
training steps it ran. Strategy "ddp" re-launches this script for rank 1, so the test runs it in a
subprocess (not under pytest) and can time out a hang.
"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset, TensorDataset

from lightning_mtl.cli import end_process_group
from lightning_mtl.data import MultiTaskDataModule

CASES = ("per_task_val", "per_task", "shared_input_val", "per_task_equal", "shared_input_equal")
BATCH_SIZE = 8
# 96 samples over 2 ranks are 48 per rank, 6 batches of 8; 97 are 49 per rank, 7 batches.
SHORT, LONG = 96, 97


def task_datasets(size_b: int) -> dict[str, TensorDataset]:
    return {
        task: TensorDataset(torch.arange(size, dtype=torch.float64).unsqueeze(1), torch.zeros(size))
        for task, size in {"a": 37, "b": size_b}.items()
    }


class SharedInput(Dataset):
    """Items ``(x, {task: y})`` for tasks ``a`` and ``b``."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple:
        return torch.tensor([float(index)], dtype=torch.float64), {"a": 0.0, "b": 1.0}


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 1, dtype=torch.float64)
        self.train_steps = 0

    @staticmethod
    def _inputs(batch) -> list[torch.Tensor]:
        return [x for x, _ in batch.values()] if isinstance(batch, dict) else [batch[0]]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self.train_steps += 1
        return sum(self.linear(x / 100).pow(2).mean() for x in self._inputs(batch))

    def validation_step(self, batch, batch_idx: int) -> None:
        for x in self._inputs(batch):
            self.linear(x / 100)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def datamodule(case: str, rank: int) -> MultiTaskDataModule:
    size = LONG if rank == 1 and not case.endswith("equal") else SHORT
    if case.startswith("shared_input"):
        return MultiTaskDataModule(SharedInput(size), val=SharedInput(size), batch_size=BATCH_SIZE, seed=3)
    data = task_datasets(size)
    val = None if case == "per_task" else data
    return MultiTaskDataModule(data, val=val, batch_size=BATCH_SIZE, seed=3)


def main(out_dir: str, cases: list[str]) -> None:
    # Rank 1 is this script re-launched by rank 0's Trainer with LOCAL_RANK set.
    rank = int(os.environ.get("LOCAL_RANK", 0))
    for case in cases:
        model = Model()
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            max_epochs=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        error = None
        try:
            trainer.fit(model, datamodule=datamodule(case, rank))
        except ValueError as e:
            error = str(e)
            print(f"[{case}] rank {trainer.global_rank} raised ValueError: {e}", flush=True)
        assert trainer.global_rank == rank
        with open(os.path.join(out_dir, f"{case}-rank{rank}.json"), "w") as f:
            json.dump({"error": error, "train_steps": model.train_steps}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    end_process_group()  # Lightning leaves the group alive; a gloo thread can abort the exit (rc -6)
