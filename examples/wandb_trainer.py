"""The main job (MultiDigits: left digit, right digit, their sum) with a plain ``Trainer`` logging to W&B.

The same model as ``examples/configs/multidigits.yaml``, built in Python, trained by Lightning's ``Trainer``
with a ``WandbLogger``. What the run gets, without any code here for it:

- its config: the model's description under ``multitask`` (tasks with heads, losses, metrics and weights;
  balancer and its arguments; gradient mode; optimizer; shared and per-task parameter counts) and the data
  module's hyper-parameters;
- every per-task key: ``train/{task}/loss`` every logged step, ``train/{task}/weight`` for a balancer that sets
  weights, ``{train,val,test}/{task}/{metric}`` and ``{val,test}/{task}/loss`` every epoch;
- the per-task table of the last validation and of the test (``TaskTable(log_table=True)``) as W&B Tables;
- with ``--diagnostics`` (needs ``lightning-mtl[plots]``): the gradient-conflict heatmap and scalars, and the
  task weights over the steps as one chart.

    pip install lightning-mtl[wandb]
    python examples/wandb_trainer.py --balancer upgrad --epochs 5               # online (run `wandb login` first)
    python examples/wandb_trainer.py --offline --train-size 2000 --epochs 1     # offline; `wandb sync` it later
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import MeanAbsoluteError

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.architectures import RegressionHead, SmallCNN
from lightning_mtl.callbacks import MultiTaskModelSummary, TaskTable
from lightning_mtl.datasets import MultiDigitsDataModule
from lightning_mtl.run_config import require_wandb


def build_model(balancer: str, lr: float) -> MultiTaskModule:
    """``examples/configs/multidigits.yaml``'s model: a small CNN shared by three tasks."""
    backbone = SmallCNN(in_channels=1, channels=(32, 64), out_features=128, input_size=(12, 20))
    tasks = [
        Task(side, nn.Linear(128, 10), nn.CrossEntropyLoss(), {"accuracy": MulticlassAccuracy(10, average="micro")})
        for side in ("left", "right")
    ]
    tasks.append(Task("sum", RegressionHead(128), nn.MSELoss(), {"mae": MeanAbsoluteError()}, weight=0.5))
    return MultiTaskModule(backbone, tasks, balancer=balancer, optimizer=partial(torch.optim.Adam, lr=lr))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train and test; returns ``{"run_dir": the W&B run's folder, "test": the test metrics}``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--balancer", default="static", help="a registered balancer name (default: static)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-size", type=int, default=10_000, help="training images (val and test: a fifth each)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10, help="log the step values every N training steps")
    parser.add_argument("--project", default="lightning-mtl", help="the W&B project")
    parser.add_argument("--save-dir", default="runs/wandb", help="where the run's files and checkpoints go")
    parser.add_argument("--offline", action="store_true", help="log offline (no network); upload later with wandb sync")
    parser.add_argument("--diagnostics", action="store_true", help="also log GradientConflict and TaskWeights pictures")
    args = parser.parse_args(argv)
    require_wandb("examples/wandb_trainer.py")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    L.seed_everything(args.seed, verbose=False)
    evaluation_size = max(args.train_size // 5, args.batch_size)
    data = MultiDigitsDataModule(
        batch_size=args.batch_size, train_size=args.train_size, val_size=evaluation_size, test_size=evaluation_size
    )
    Path(args.save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(project=args.project, save_dir=args.save_dir, offline=args.offline)
    callbacks: list[Callback] = [MultiTaskModelSummary(), TaskTable(log_table=True)]
    if args.diagnostics:
        from lightning_mtl.callbacks import GradientConflict, TaskWeights

        callbacks += [GradientConflict(every_n_steps=10), TaskWeights(every_n_steps=1)]
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="auto", devices=1, logger=logger, callbacks=callbacks, log_every_n_steps=args.log_every
    )
    try:
        model = build_model(args.balancer, args.lr)
        trainer.fit(model, datamodule=data)
        results = trainer.test(model, datamodule=data)[0]
        run_dir = Path(logger.experiment.dir).parent
    finally:
        wandb.finish()
    return {"run_dir": run_dir, "test": results}


if __name__ == "__main__":
    main()
