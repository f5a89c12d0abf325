"""Two-process CPU DDP fit with DeltaM and a ModelCheckpoint on val/delta_m; run by test_delta_m.py.

Usage: python _ddp_delta_m_fit.py OUT_DIR

Every rank writes OUT_DIR/rank{R}.json: the val/... values it held after each validation epoch (as
ModelCheckpoint saw them), the checkpoint's best score, and the validation inputs it saw itself.
"""

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers

from callbacks.test_delta_m import baselines, loader, module

from lightning_mtl.callbacks import DeltaM
from lightning_mtl.cli import end_process_group


class Record(pl.Callback):
    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.local: list[float] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.local += batch[0][:, 0].tolist()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})


def main(out_dir: str) -> None:
    pl.seed_everything(0, verbose=False)
    record = Record()
    checkpoint = ModelCheckpoint(dirpath=os.path.join(out_dir, "checkpoints"), monitor="val/delta_m", mode="max")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[checkpoint, DeltaM(baselines()), record],
    )
    trainer.fit(module(), loader(64, seed=0), loader(48, seed=1))
    result = {"epochs": record.epochs, "best": float(checkpoint.best_model_score), "local": sorted(record.local)}
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
    end_process_group()  # Lightning leaves the group alive; a gloo thread can abort the exit (rc -6)
