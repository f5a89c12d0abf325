"""The seed's Keras program, in lightning-mtl.

The seed program (Keras functional API) was::

    x = Input(shape=(n,)); h = Dense(128, activation="relu")(x); h = Dropout(0.5)(h)
    h = Dense(64, activation="relu")(h); h = Dropout(0.5)(h)
    out1 = Dense(1, activation="sigmoid")(h); out2 = Dense(1, activation="sigmoid")(h)
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])

trained on random labels. Here the same network learns two real binary tasks on scikit-learn's
bundled 8×8 digits (no download): "is it a 0" and "is it a 1".

    python examples/keras_style.py --epochs 20
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import BinaryAccuracy

from lightning_mtl import MultiTaskModule, Task


class DigitIs(Dataset):
    """Digits as 64 features in [0, 1] with the binary labels ``is_0`` and ``is_1`` (float, for BCE)."""

    def __init__(self, indices: torch.Tensor) -> None:
        digits = load_digits()
        self.x = torch.tensor(digits.data, dtype=torch.float32)[indices] / 16.0
        target = torch.tensor(digits.target)[indices]
        self.labels = {"is_0": (target == 0).float(), "is_1": (target == 1).float()}

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], {name: y[i] for name, y in self.labels.items()}


def sigmoid_head(in_features: int) -> nn.Module:
    """``Dense(1, activation="sigmoid")``, squeezed to one probability per sample."""
    return nn.Sequential(nn.Linear(in_features, 1), nn.Sigmoid(), nn.Flatten(0))


def build_model() -> MultiTaskModule:
    shared = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 64), nn.ReLU(), nn.Dropout(0.5)
    )
    tasks = [Task(name, sigmoid_head(64), nn.BCELoss(), {"accuracy": BinaryAccuracy()}) for name in ("is_0", "is_1")]
    return MultiTaskModule(shared, tasks, optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(args.seed))
    train, test = DigitIs(order[:1400]), DigitIs(order[1400:])
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False)
    model = build_model()
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True))
    return trainer.test(model, DataLoader(test, batch_size=256))[0]


if __name__ == "__main__":
    main()
