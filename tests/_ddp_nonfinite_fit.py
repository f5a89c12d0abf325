"""2-process DDP fits where rank 1 alone meets a non-finite value, with nonfinite_loss="skip"; run by test_ddp.py.

Usage: python _ddp_nonfinite_fit.py OUT_DIR

At step 1 of each epoch rank 1's first sample has an infinite regression target ("loss": a non-finite
task loss) or a target that makes the loss's backward infinite ("grad": a non-finite task gradient of a
finite loss). Each case also runs "clean", the same data without step 1. Every rank writes
OUT_DIR/{kind}-{balancer}-{mode}.{variant}.rank{R}.json: error (if any), parameters, balancer state,
global step, and the non-finite warnings it issued (every rank must name the task, and the rank for a loss). A skip must skip the whole step on both ranks, so "bad" equals "clean".
"""

import json
import os
import sys
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.cli import end_process_group
from test_gradient_balancing import InfiniteGradient
from test_module import SharedInput

PER_RANK, STEPS, INFINITE_GRADIENT = 8, 3, 12345.0
CASES = [("loss", "none", "parameters"), ("loss", "dwa", "parameters"), ("loss", "mgda", "representation"),
         ("grad", "mgda", "parameters")]  # fmt: skip


def regression_loss(prediction, target):
    """MSE; a target equal to INFINITE_GRADIENT gives a finite loss whose gradient is infinite."""
    marked = target == INFINITE_GRADIENT
    if bool(marked.any()):
        prediction, target = InfiniteGradient.apply(prediction), torch.where(marked, 0.0, target)
    return nn.functional.mse_loss(prediction, target)


class RankData(Dataset):
    def __init__(self, rank: int, kind: str, clean: bool) -> None:
        base = SharedInput(PER_RANK * 2 * STEPS)
        self.items = []
        for step in range(STEPS):
            if clean and step == 1:
                continue
            for i in range(PER_RANK):
                x, y = base[step * 2 * PER_RANK + rank * PER_RANK + i]
                if rank == 1 and step == 1 and i == 0:
                    bad = float("inf") if kind == "loss" else INFINITE_GRADIENT
                    y = {"cls": y["cls"], "reg": torch.tensor(bad)}
                self.items.append((x, y))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def build(balancer: str, mode: str) -> MultiTaskModule:
    torch.manual_seed(1)
    tasks = [
        Task("cls", nn.Linear(8, 2), nn.CrossEntropyLoss()),
        Task("reg", nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), regression_loss),
    ]
    torch.manual_seed(0)
    return MultiTaskModule(
        nn.Sequential(nn.Linear(6, 8), nn.Tanh()), tasks, balancer=None if balancer == "none" else balancer,
        gradients=mode, nonfinite_loss="skip", optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )  # fmt: skip


def main(out_dir: str) -> None:
    warnings.filterwarnings("ignore")
    for kind, balancer, mode in CASES:
        for variant in ("bad", "clean"):
            module = build(balancer, mode)
            trainer = pl.Trainer(
                accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False, max_epochs=2,
                logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            )  # fmt: skip
            record = {"error": None}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    trainer.fit(module, DataLoader(RankData(trainer.global_rank, kind, variant == "clean"), batch_size=PER_RANK))
                except (FloatingPointError, RuntimeError) as error:
                    record["error"] = f"{type(error).__name__}: {error}"[:300]
            record["nonfinite_warnings"] = [str(w.message) for w in caught if "non-finite" in str(w.message)]
            state = {k: v.double().flatten().tolist() for k, v in module.balancer.state_dict().items() if torch.is_tensor(v)}
            record.update(
                parameters=torch.cat([p.detach().flatten() for p in module.parameters()]).tolist(),
                state=state,
                global_step=trainer.global_step,
            )
            name = f"{kind}-{balancer}-{mode}.{variant}.rank{trainer.global_rank}.json"
            with open(os.path.join(out_dir, name), "w") as f:
                json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()  # Lightning leaves the group alive; a gloo thread can abort the exit (rc -6)
