"""FAMO on 2 real DDP processes (gloo) where a task's labels are missing on one rank; run by
test_ddp_balancers.py (not collected by pytest).

Usage: python _ddp_famo_absent.py OUT_DIR

Every step gives each rank its own task losses before and after the update and its mask of present
tasks (``STEPS``): some tasks are absent on one rank, one on both. The balancer reduces the losses with
the mean over ranks, as ``MultiTaskModule`` sets it up under DDP. Rank 0 writes OUT_DIR/results.json:
FAMO's logits after every update, to compare with one process on the global losses.
"""

import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_mtl.balancers import FAMO

TASKS = ["a", "b", "c"]
LR = 0.1
# One entry per step: for rank 0 and rank 1, (losses before the update, losses after it, present).
STEPS = [
    (
        ([1.0, 2.0, 3.0], [0.9, 1.9, 2.5], [True, True, True]),
        ([1.2, 0.0, 2.0], [1.0, 0.0, 1.9], [True, False, True]),  # no labels for b on rank 1
    ),
    (
        ([0.8, 1.5, 0.0], [0.7, 1.45, 0.0], [True, True, False]),  # c absent on both ranks
        ([1.0, 1.6, 0.0], [0.95, 1.5, 0.0], [True, True, False]),
    ),
    (
        ([0.0, 1.4, 2.0], [0.0, 1.3, 1.9], [False, True, True]),  # no labels for a on rank 0
        ([0.9, 1.3, 2.2], [0.8, 1.25, 2.0], [True, True, True]),
    ),
]


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    reduced = tensor.clone()
    dist.all_reduce(reduced)
    return reduced / dist.get_world_size()


def run(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        famo = FAMO(lr=LR)
        famo.setup(TASKS)
        famo.all_reduce_mean = mean_over_ranks
        logits = []
        for step in STEPS:
            before, after, present = step[rank]
            famo(torch.tensor(before), torch.tensor(present))
            famo.after_optimizer_step(torch.tensor(after))
            logits.append(famo.logits.tolist())
        if rank == 0:
            with open(os.path.join(out_dir, "results.json"), "w") as f:
                json.dump(logits, f)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    mp.spawn(run, args=(free_port(), sys.argv[1]), nprocs=2)
