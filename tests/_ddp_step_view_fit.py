"""2-process DDP fits recording ``MultiTaskModule.last_step``; run by test_ddp_step_view.py (not collected by pytest).

Usage: python _ddp_step_view_fit.py OUT_DIR

Each rank trains on its half of every global batch (no DistributedSampler: the split is explicit), so
the run can be compared with one process on the whole global batch. A :class:`Recorder` keeps, at every
step's ``on_train_batch_end``, the step's Gramian and weights; with a loss-level balancer it asks for the
Gramian (``request_gramian``) on every step. Every rank writes OUT_DIR/rank{R}.json with, for every
(balancer, gradient mode) of ``CASES``, its records and its final parameters.
"""

import json
import os
import sys

import lightning.pytorch as pl
import torch

from _ddp_balancer_fit import STEPS, rank_loader
from lightning_mtl.cli import end_process_group
from test_module import make_module, make_tasks

# Gradient balancers form the Gramian anyway; Static forms it only on request (asked on every step here).
CASES = [("mgda", "parameters"), ("upgrad", "representation"), ("static", "parameters"), ("static", "representation")]
# Static with unequal task weights, so that the recorded weights say something.
TASK_WEIGHTS = {"static": (0.5, 2.0)}


def build(balancer: str, mode: str):
    cls_weight, reg_weight = TASK_WEIGHTS.get(balancer, (1.0, 1.0))
    return make_module(
        tasks=make_tasks(metrics=False, cls_weight=cls_weight, reg_weight=reg_weight),
        balancer=balancer,
        gradients=mode,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )


class Recorder(pl.Callback):
    """Records ``(global_step, batch_idx, gramian, weights)`` of every step; asks for the Gramian if ``request``."""

    def __init__(self, request: bool):
        self.request = request
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.request:  # every step, on every process alike
            pl_module.request_gramian()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.last_step
        self.steps.append(
            {
                "global_step": step.global_step,
                "batch_idx": step.batch_idx,
                "gramian": None if step.gramian is None else step.gramian.tolist(),
                "weights": None if step.weights is None else step.weights.tolist(),
            }
        )


def parameters(module) -> list[float]:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).tolist()


def main(out_dir: str) -> None:
    results = {}
    for balancer, mode in CASES:
        module = build(balancer, mode)
        recorder = Recorder(request=balancer == "static")
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            use_distributed_sampler=False,
            max_steps=STEPS,
            callbacks=[recorder],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, rank_loader(trainer.global_rank, 2))
        results[f"{balancer}/{mode}"] = {"steps": recorder.steps, "parameters": parameters(module)}
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()  # Lightning leaves the group alive; a gloo thread can abort the exit (rc -6)
