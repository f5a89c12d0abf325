"""A 2-process DDP fit with Auto-Lambda; run by tests/balancers/test_autolambda.py (not collected by pytest).

Usage: python _ddp_autolambda_fit.py OUT_DIR

The data module shards the shared-input training and meta data across the 2 processes, each with batch size
``PER_RANK``: the union of the ranks' batches is the batch of one process with batch size ``2 * PER_RANK``, to
which the test compares. Rank 0 writes OUT_DIR/results.json: λ, the parameters, every rank's meta position, and
whether every rank holds the same λ.
"""

import json
import os
import sys

import lightning.pytorch as pl
import torch

from lightning_mtl.balancers.autolambda import AutoLambda
from lightning_mtl.cli import end_process_group
from lightning_mtl.data import MultiTaskDataModule
from test_module import SharedInput, make_module, make_tasks

PER_RANK, STEPS = 8, 4


def build():
    return make_module(
        tasks=make_tasks(metrics=False), balancer=AutoLambda(lr=0.01), optimizer=lambda p: torch.optim.SGD(p, lr=0.1)
    )


def data(batch_size: int) -> MultiTaskDataModule:
    # 48 meta samples: 3 meta batches an epoch, so the 4 steps cross a meta epoch's end
    return MultiTaskDataModule(
        train=SharedInput(2 * PER_RANK * STEPS), meta=SharedInput(48, seed=1), batch_size=batch_size, seed=2
    )


def main(out_dir: str) -> None:
    module = build()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data(PER_RANK))
    lambdas = trainer.strategy.all_gather(module.balancer.lambdas)
    positions = trainer.strategy.all_gather(torch.tensor(module.balancer.meta_batches)).tolist()
    if trainer.global_rank == 0:
        results = {
            "lambdas": module.balancer.lambdas.tolist(),
            "parameters": torch.cat([p.detach().flatten() for p in module.parameters()]).tolist(),
            "meta_batches": positions,
            "rank_lambdas_equal": bool(torch.equal(lambdas[0], lambdas[1])),
        }
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()  # Lightning leaves the group alive; a gloo thread can abort the exit (rc -6)
