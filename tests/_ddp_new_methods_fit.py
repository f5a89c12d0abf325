"""2-process DDP fits with FairGrad, SDMGrad (and SDMGrad-OS), MoCo and ExcessMTL; run by
tests/balancers/test_new_methods.py (not collected by pytest).

Usage: python _ddp_new_methods_fit.py OUT_DIR

Each rank trains on its half of every global batch (no DistributedSampler: the split is explicit), so the
run can be compared with one process on the whole global batch. Rank 0 writes OUT_DIR/results.json with the
final parameters and the balancer's state tensors for every case of ``CASES``; every rank writes its own
state to OUT_DIR/state_rank{r}.json, so the test can check that the ranks agree.
"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset

from lightning_mtl.balancers import BALANCERS
from lightning_mtl.cli import end_process_group
from test_module import SharedInput, make_module, make_tasks

# (key, registered name, arguments, gradient mode): both modes for the Gramian weightings, parameter mode for
# the methods that refuse representation gradients; SDMGrad-OS draws one of the two tasks per step.
CASES = [
    ("fairgrad", "fairgrad", {}, "parameters"),
    ("fairgrad", "fairgrad", {}, "representation"),
    ("sdmgrad", "sdmgrad", {}, "parameters"),
    ("sdmgrad", "sdmgrad", {}, "representation"),
    ("sdmgrad-os", "sdmgrad", {"num_sampled": 1, "seed": 3}, "parameters"),
    ("moco", "moco", {"gamma": 0.5}, "parameters"),
    ("excessmtl", "excessmtl", {}, "parameters"),
]
PER_RANK, STEPS = 16, 4


def build(name: str, arguments: dict, mode: str):
    return make_module(
        tasks=make_tasks(metrics=False),
        balancer=BALANCERS[name](**arguments),
        gradients=mode,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )


def state_tensors(balancer) -> dict[str, list[float]]:
    """The balancer's floating-point state (extra state included), flattened."""
    out = {}
    for key, value in balancer.state_dict().items():
        values = value.items() if isinstance(value, dict) else [(key, value)]
        for name, tensor in values:
            if torch.is_tensor(tensor) and tensor.is_floating_point():
                out[name] = tensor.detach().double().flatten().tolist()
    return out


def rank_loader(rank: int, world_size: int) -> DataLoader:
    data = SharedInput(PER_RANK * world_size * STEPS)
    glob = PER_RANK * world_size
    indices = [j * glob + rank * PER_RANK + i for j in range(STEPS) for i in range(PER_RANK)]
    return DataLoader(Subset(data, indices), batch_size=PER_RANK, shuffle=False)


def main(out_dir: str) -> None:
    results, states = {}, {}
    for key, name, arguments, mode in CASES:
        module = build(name, arguments, mode)
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
        results[f"{key}/{mode}"] = torch.cat([p.detach().flatten() for p in module.parameters()]).tolist()
        states[f"{key}/{mode}"] = state_tensors(module.balancer)
    with open(os.path.join(out_dir, f"state_rank{trainer.global_rank}.json"), "w") as f:
        json.dump(states, f)
    if trainer.global_rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()  # Lightning leaves the group alive; a gloo thread can abort the exit (rc -6)
