"""MultiDigits with four multi-task architectures trained on the same budget.

Hard sharing (a SmallCNN shared by all heads), MMoE (Ma et al., 2018; MLP experts on the pixels),
cross-stitch (Misra et al., 2016; one SmallCNN column per task) and MTAN (Liu et al., 2019;
attention modules on a shared SmallCNN) learn the three MultiDigits tasks (left digit, right digit,
standardised sum) with the same data, epochs, batch size and optimizer. Prints test accuracy, sum
MAE, parameter counts (shared / per task, from :func:`lightning_mtl.architectures.parameter_counts`)
and training time; the numbers are recorded in ``docs/architectures.md``.

    python examples/compare_architectures.py --epochs 10
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import MeanAbsoluteError

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.architectures import MMoE, MTAN, CrossStitch, RegressionHead, SmallCNN, parameter_counts
from lightning_mtl.datasets import MultiDigits, MultiDigitsDataModule

TASKS = list(MultiDigits.TASKS)
WIDTH = 128


def cnn() -> SmallCNN:
    return SmallCNN(in_channels=1, channels=(32, 64), out_features=WIDTH, input_size=MultiDigits.IMAGE_SIZE)


ARCHITECTURES = {
    "hard sharing": cnn,
    "MMoE": lambda: MMoE(240, expert_features=WIDTH, num_experts=4, tasks=TASKS),
    "cross-stitch": lambda: CrossStitch(cnn(), TASKS),
    "MTAN": lambda: MTAN(cnn(), TASKS),
}


def build(name: str, lr: float) -> MultiTaskModule:
    classes = [
        Task(side, nn.Linear(WIDTH, 10), nn.CrossEntropyLoss(), {"accuracy": MulticlassAccuracy(10, average="micro")})
        for side in ("left", "right")
    ]
    total = Task("sum", RegressionHead(WIDTH), nn.MSELoss(), {"mae": MeanAbsoluteError()}, weight=0.5)
    return MultiTaskModule(
        ARCHITECTURES[name](), [*classes, total], optimizer=lambda params: torch.optim.Adam(params, lr=lr)
    )


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    L.seed_everything(args.seed, verbose=False)
    module = build(name, args.lr)
    data = MultiDigitsDataModule(
        batch_size=args.batch_size, train_size=args.train_size, val_size=args.test_size, test_size=args.test_size, seed=args.seed
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
        seconds = time.perf_counter() - start
        metrics = trainer.test(module, datamodule=data, verbose=False)[0]
    return {"architecture": name, "seconds": seconds, **metrics, "parameters": parameter_counts(module)}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| architecture | left acc. | right acc. | sum MAE | shared params | per task (left / right / sum) | total | train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        counts = row["parameters"]
        per_task = " / ".join(f"{counts[task]:,}" for task in TASKS)
        lines.append(
            f"| {row['architecture']} | {row['test/left/accuracy']:.3f} | {row['test/right/accuracy']:.3f} | "
            f"{row['test/sum/mae']:.3f} | {counts['shared']:,} | {per_task} | {sum(counts.values()):,} | "
            f"{row['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--test-size", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    rows = [run(name, args) for name in args.architectures]
    print(f"MultiDigits, {args.epochs} epochs of {args.train_size} images, Adam(lr={args.lr}), batch {args.batch_size}")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
