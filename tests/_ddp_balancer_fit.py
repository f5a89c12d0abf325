"""2-process DDP fits with gradient balancers; run by test_ddp_balancers.py (not collected by pytest).

Usage: python _ddp_balancer_fit.py OUT_DIR

Each rank trains on its half of every global batch (no DistributedSampler: the split is explicit), so
the run can be compared with one process on the whole global batch. Rank 0 writes OUT_DIR/results.json
with the final parameters for every (balancer, gradient mode) of ``CASES``.
"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset

from lightning_mtl.cli import end_process_group
from test_module import SharedInput, make_module, make_tasks

BALANCERS = ("mgda", "upgrad", "imtlg", "pcgrad")
MODES = ("parameters", "representation")
# (balancer, mode): the four above in both modes, and methods whose DDP path differs: DB-MTL (the log of the
# global loss), GradDrop in representation mode (per-column draws for the global batch), GLS and STCH (weights
# that are a nonlinear function of the losses: those of the global batch).
CASES = [(balancer, mode) for balancer in BALANCERS for mode in MODES] + [
    ("dbmtl", "parameters"),
    ("graddrop", "representation"),
    ("gls", "parameters"),
    ("stch", "parameters"),
]
PER_RANK, STEPS = 16, 3


def build(balancer: str, mode: str):
    return make_module(
        tasks=make_tasks(metrics=False),
        balancer=balancer,
        gradients=mode,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )


def rank_loader(rank: int, world_size: int) -> DataLoader:
    data = SharedInput(PER_RANK * world_size * STEPS)
    glob = PER_RANK * world_size
    indices = [j * glob + rank * PER_RANK + i for j in range(STEPS) for i in range(PER_RANK)]
    return DataLoader(Subset(data, indices), batch_size=PER_RANK, shuffle=False)


def main(out_dir: str) -> None:
    results = {}
    for balancer, mode in CASES:
        module = build(balancer, mode)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            use_distributed_sampler=False,
            max_steps=STEPS,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, rank_loader(trainer.global_rank, 2))
        results[f"{balancer}/{mode}"] = torch.cat([p.detach().flatten() for p in module.parameters()]).tolist()
    if trainer.global_rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()  # Lightning leaves the group alive; a gloo thread can abort the exit (rc -6)
