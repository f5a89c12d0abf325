"""Kill-and-resume under 2-process CPU DDP (gloo); run by test_ddp_kill_resume.py (not collected by pytest).

Usage: python _ddp_kill_resume_fit.py OUT_DIR PHASE:CASE [PHASE:CASE ...]

Runs the fits in the order given, in the same 2 processes. CASE is one of ``CASES`` (balancer, sampling,
strategy). Every fit is the same seeded fit of a freshly built small ``MultiTaskModule`` on a per-task
``MultiTaskDataModule`` to ``MAX_STEPS`` optimizer steps, with a ``ModelCheckpoint`` every ``EVERY`` steps
(and ``last.ckpt``) in OUT_DIR/CASE/PHASE-ckpts (the resumed run does not write over the killed run's
checkpoints, so the test can inspect them), PHASE being:

* ``straight``: the uninterrupted fit.
* ``killed``: the same fit; once the checkpoint of step ``KILL_AFTER`` is on disk and every rank has passed a
  barrier after step ``KILL_AFTER + 1``, every rank SIGKILLs itself (no cleanup, no ``finally``). The
  process is gone, so a ``killed`` item is the last one a launch can run.
* ``resume``: ``fit(ckpt_path=<the killed run's last.ckpt>)`` to ``MAX_STEPS``; run it in a launch after
  the one that was killed (fresh processes).

``straight`` and ``resume`` write OUT_DIR/CASE/PHASE.rank{R}.json: final parameters, balancer state
(buffers and extra state, e.g. FAMO's logits and its private Adam's moments), the model optimizer's state,
the final global step, and each training step seen (global step before it, epoch, batch index, tasks and
a fingerprint of the batch). Strategy "ddp" re-launches this script for rank 1, so the test runs it in a
subprocess (not under pytest) and can time out a hang.
"""

import json
import os
import signal
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import TensorDataset

from lightning_mtl import MultiTaskDataModule
from lightning_mtl.cli import end_process_group
from test_module import make_module, make_tasks

MAX_STEPS, EVERY, KILL_AFTER = 10, 3, 6
BATCH_SIZE = {"cls": 4, "reg": 8}
# (balancer, sampling, strategy, (cls samples, reg samples)); per-task sample order is shuffled, seeded by
# (seed, epoch), and temperature sampling also draws the task of each step: the data position matters.
CASES = {
    # 37 -> 19 per rank -> 5 batches of 4; 45 -> 23 per rank -> 3 batches of 8; zip: 5 steps per epoch, the
    # checkpoint at 6 is at step 1 of epoch 1. Both tasks every step: FAMO's logits and its Adam move every step.
    "famo-zip": ("famo", "zip", "ddp", (37, 45)),
    # 13 -> 2 batches, 29 -> 2 batches: 4 single-task steps per epoch (plain "ddp" refuses the unused head, as it
    # should). The checkpoint at 6 is at step 2 of epoch 1, with DWA's sums of epoch 1 half made; DWA's weights
    # leave 1 after epoch 1 (step 8) and then depend on them. (FAMO compares the tasks of a step: with one task
    # per step it does nothing, and the module refuses it.)
    "dwa-temperature": ("dwa", "temperature", "ddp_find_unused_parameters_true", (13, 29)),
}


def task_data(sizes: tuple[int, int]) -> dict[str, TensorDataset]:
    g = torch.Generator().manual_seed(7)
    xc, xr = torch.randn(sizes[0], 6, generator=g), torch.randn(sizes[1], 6, generator=g)
    return {"cls": TensorDataset(xc, (xc[:, 0] > 0).long()), "reg": TensorDataset(xr, xr[:, 1] * 2 + xr[:, 2])}


def flatten(value, prefix: str, out: dict) -> dict:
    """Every tensor / number in a (nested) state dict, as ``{path: [floats]}``."""
    if torch.is_tensor(value):
        out[prefix] = value.detach().double().flatten().tolist()
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        out[prefix] = value
    elif isinstance(value, (int, float)):
        out[prefix] = [float(value)]
    elif isinstance(value, dict):
        for key, item in value.items():
            flatten(item, f"{prefix}/{key}", out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            flatten(item, f"{prefix}/{index}", out)
    return out


class Record(pl.Callback):
    """Each training step: the global step before it, where the loader stands, and what the batch holds."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.steps.append(
            {
                "global_step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "batch_idx": batch_idx,
                "tasks": sorted(batch),
                "fingerprint": {task: float(x.double().sum()) for task, (x, _) in sorted(batch.items())},
            }
        )


class KillAfterCheckpoint(pl.Callback):
    """After step KILL_AFTER + 1, with the step-KILL_AFTER checkpoint written: SIGKILL on every rank."""

    def __init__(self, dirpath: Path) -> None:
        self.dirpath = dirpath

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != KILL_AFTER + 1:
            return
        written = sorted(p.name for p in self.dirpath.glob(f"*step={KILL_AFTER}.ckpt"))
        if not written or not (self.dirpath / "last.ckpt").is_file():
            raise RuntimeError(f"no step-{KILL_AFTER} checkpoint in {self.dirpath}: {sorted(os.listdir(self.dirpath))}")
        trainer.strategy.barrier("kill")  # every rank is past the checkpoint (its save ends in a barrier too)
        print(f"rank {trainer.global_rank}: SIGKILL after step {trainer.global_step} ({written})", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def run(out_dir: Path, phase: str, case: str) -> None:
    balancer, sampling, strategy, sizes = CASES[case]
    case_dir = out_dir / case
    ckpt_dir = case_dir / f"{phase}-ckpts"
    case_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0, verbose=False)
    module = make_module(
        tasks=make_tasks(metrics=False), balancer=balancer, optimizer=lambda p: torch.optim.Adam(p, lr=0.02)
    )
    datamodule = MultiTaskDataModule(task_data(sizes), batch_size=BATCH_SIZE, sampling=sampling, seed=3)
    record = Record()
    callbacks = [
        record,
        ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=EVERY, save_last=True, save_top_k=-1),
    ]
    if phase == "killed":
        callbacks.append(KillAfterCheckpoint(ckpt_dir))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=MAX_STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    resume_from = case_dir / "killed-ckpts" / "last.ckpt" if phase == "resume" else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    if phase == "killed":
        raise RuntimeError(f"{case}: the killed phase finished its fit (no SIGKILL)")
    result = {
        "global_step": trainer.global_step,
        "steps": record.steps,
        "parameters": torch.cat([p.detach().flatten() for p in module.parameters()]).double().tolist(),
        "balancer": flatten(module.balancer.state_dict(), "balancer", {}),
        "optimizer": flatten(trainer.optimizers[0].state_dict()["state"], "optimizer", {}),
    }
    with open(case_dir / f"{phase}.rank{trainer.global_rank}.json", "w") as f:
        json.dump(result, f)


def main(out_dir: str, *items: str) -> None:
    warnings.filterwarnings("ignore")
    for item in items:
        phase, case = item.split(":")
        assert phase in ("straight", "killed", "resume") and case in CASES, item
        run(Path(out_dir), phase, case)


if __name__ == "__main__":
    main(*sys.argv[1:])
    end_process_group()  # Lightning leaves the group alive; a gloo thread can abort the exit (rc -6)
