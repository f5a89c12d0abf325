"""2-process DDP fits with the diagnostics callbacks; run by test_gradient_conflict.py and test_task_affinity.py.

Usage: python _ddp_gradient_conflict_fit.py OUT_DIR {conflict,affinity}

Each rank trains on its half of every global batch (no DistributedSampler: the split is explicit), so the run can
be compared with one process on the whole global batch. ``conflict``: for every (balancer, gradient mode) of
``CASES``, ``GradientConflict(every_n_steps=1)`` and a recorder of its per-step cosines and norms. ``affinity``:
``TaskAffinity(every_n_steps=1)`` with static weights; its mean affinity and the final parameters. Every rank
writes OUT_DIR/rank{R}.json.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: conftest

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Subset  # noqa: E402

from conftest import RecordingLogger  # noqa: E402
from lightning_mtl import MultiTaskModule, Task  # noqa: E402
from lightning_mtl.callbacks import GradientConflict  # noqa: E402
from lightning_mtl.cli import end_process_group  # noqa: E402

PER_RANK, STEPS = 16, 3
# a loss-level balancer (asks for the Gramian) and gradient-level ones (form it anyway), in both gradient modes
CASES = [("static", "parameters"), ("static", "representation"), ("upgrad", "parameters"), ("mgda", "representation")]


class ThreeTasks(Dataset):
    """``(x, {cls, reg, neg})``: ``neg`` pulls against ``reg`` (its target is ``-reg`` plus another feature)."""

    def __init__(self, n=96, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.cls = (self.x[:, 0] > 0).long()
        self.reg = 2.0 * self.x[:, 1]
        self.neg = -2.0 * self.x[:, 1] + self.x[:, 2]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {"cls": self.cls[i], "reg": self.reg[i], "neg": self.neg[i]}


def build(balancer=None, gradients="parameters", lr=0.1):
    """A 6 → 8 tanh backbone and three heads, trained with SGD."""
    torch.manual_seed(0)
    tasks = [
        Task("cls", nn.Linear(8, 2), nn.CrossEntropyLoss()),
        Task("reg", nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), nn.MSELoss()),
        Task("neg", nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), nn.MSELoss()),
    ]
    backbone = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    return MultiTaskModule(backbone, tasks, balancer=balancer, gradients=gradients, optimizer=lambda p: torch.optim.SGD(p, lr=lr))


def rank_indices(rank: int, world_size: int) -> list[int]:
    """The samples of ``rank``: its half of each global batch of ``PER_RANK * world_size``."""
    glob = PER_RANK * world_size
    return [j * glob + rank * PER_RANK + i for j in range(STEPS) for i in range(PER_RANK)]


def rank_loader(rank: int, world_size: int) -> DataLoader:
    return DataLoader(Subset(ThreeTasks(PER_RANK * world_size * STEPS), rank_indices(rank, world_size)), batch_size=PER_RANK)


def global_loader(world_size: int = 2) -> DataLoader:
    return DataLoader(ThreeTasks(PER_RANK * world_size * STEPS), batch_size=PER_RANK * world_size)


class Recorder(pl.Callback):
    def __init__(self, conflict: GradientConflict):
        self.conflict, self.cosines, self.norms = conflict, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.cosines.append(self.conflict.cosines.tolist())
        self.norms.append(self.conflict.norms.tolist())


def parameters(module) -> list[float]:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).tolist()


def trainer(out_dir: str, callbacks, logger=False) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        use_distributed_sampler=False,
        max_steps=STEPS,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=out_dir,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main(out_dir: str, part: str) -> None:
    results = {}
    if part == "conflict":
        logged = []
        for balancer, mode in CASES:
            conflict = GradientConflict(every_n_steps=1, heatmap=False)
            recorder, logger = Recorder(conflict), RecordingLogger()
            fit = trainer(out_dir, [conflict, recorder], logger)
            fit.fit(build(balancer, mode), rank_loader(fit.global_rank, 2))
            results[f"{balancer}/{mode}"] = {"cosines": recorder.cosines, "norms": recorder.norms}
            if not logged:
                logged = [step for step, metrics in logger.history if "train/gradients/mean_cosine" in metrics]
                results["logged_steps"] = logged
    else:
        from lightning_mtl.callbacks import TaskAffinity

        affinity = TaskAffinity(every_n_steps=1, heatmap=False)
        module = build()
        fit = trainer(out_dir, [affinity])
        fit.fit(module, rank_loader(fit.global_rank, 2))
        results = {"affinity": affinity.affinity.tolist(), "samples": affinity._samples, "parameters": parameters(module)}
    with open(os.path.join(out_dir, f"rank{fit.global_rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    end_process_group()  # Lightning leaves the group alive; a gloo thread can abort the exit (rc -6)
