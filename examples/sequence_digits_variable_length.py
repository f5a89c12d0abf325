"""MultiDigits as variable-length sequences: an LSTM over packed, padded batches.

Each 12x20 MultiDigits image is read as a sequence of pixel columns (12 features per step), and its
trailing blank columns are cut off, so sequences have 12 to 20 steps depending on where the right
digit ends. Batches are padded to their longest sequence and carry the lengths,
``((padded, lengths), {task: y})``; :class:`~lightning_mtl.architectures.RNNEncoder` packs them, so
padding never reaches the LSTM. The fixed-length version of this job is
``examples/configs/sequence_digits.yaml``.

    python examples/sequence_digits_variable_length.py --epochs 10
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import MeanAbsoluteError

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.architectures import RegressionHead, RNNEncoder
from lightning_mtl.datasets import MultiDigits


class ColumnSequences(Dataset):
    """MultiDigits items as ``(columns (length, 12), {task: y})`` without the trailing blank columns."""

    def __init__(self, digits: MultiDigits) -> None:
        columns = digits.images[:, 0].transpose(1, 2)  # (N, 20, 12)
        filled = columns.abs().sum(dim=2) > 0  # (N, 20)
        steps = torch.arange(columns.shape[1]).expand_as(filled)
        self.lengths = torch.where(filled, steps + 1, 0).amax(dim=1).clamp_min(1)
        self.columns = columns
        self.targets = digits.targets

    def __len__(self) -> int:
        return len(self.columns)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.columns[index, : self.lengths[index]], {task: y[index] for task, y in self.targets.items()}


def collate(items: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[tuple[Tensor, Tensor], dict[str, Tensor]]:
    """Pad to the longest sequence of the batch and keep the lengths: ``((padded, lengths), {task: y})``."""
    sequences = [sequence for sequence, _ in items]
    lengths = torch.tensor([len(sequence) for sequence in sequences])
    labels = {task: torch.stack([targets[task] for _, targets in items]) for task in items[0][1]}
    return (pad_sequence(sequences, batch_first=True), lengths), labels


def build(hidden_size: int, lr: float) -> MultiTaskModule:
    backbone = RNNEncoder(12, hidden_size, cell="lstm", bidirectional=True, pooling="last")
    width = backbone.out_features
    tasks = [
        Task(side, nn.Linear(width, 10), nn.CrossEntropyLoss(), {"accuracy": MulticlassAccuracy(10, average="micro")})
        for side in ("left", "right")
    ]
    tasks.append(Task("sum", RegressionHead(width), nn.MSELoss(), {"mae": MeanAbsoluteError()}, weight=0.5))
    return MultiTaskModule(backbone, tasks, optimizer=lambda params: torch.optim.Adam(params, lr=lr))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--test-size", type=int, default=2_000)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    L.seed_everything(args.seed, verbose=False)
    train = ColumnSequences(MultiDigits("train", size=args.train_size, seed=args.seed))
    test = ColumnSequences(MultiDigits("test", size=args.test_size, seed=args.seed))
    generator = torch.Generator().manual_seed(args.seed)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = build(args.hidden_size, args.lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(train, batch_size=64, shuffle=True, collate_fn=collate, generator=generator))
        metrics = trainer.test(module, DataLoader(test, batch_size=256, collate_fn=collate), verbose=False)[0]
    lengths = train.lengths.float()
    print(f"sequence lengths: {int(lengths.min())}..{int(lengths.max())} steps (mean {lengths.mean():.1f})")
    print({key: round(value, 4) for key, value in metrics.items()})
    return metrics


if __name__ == "__main__":
    main()
