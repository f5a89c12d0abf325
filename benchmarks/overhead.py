"""Overhead of lightning-mtl against hand-written Lightning code doing the same work.

1. Model: ``MultiTaskModule`` with static weights against a hand-written ``LightningModule`` that
   sums the same K losses. MLP backbone 256→512→512→256 (ReLU), K=10 linear heads 256→10 with
   cross-entropy, batch 128. Two baselines: ``bare`` logs only the combined loss; ``logging`` also logs
   every task loss each step, as ``MultiTaskModule`` does.
2. Data: ``MultiTaskDataModule`` (round-robin and temperature sampling over K per-task datasets)
   against one plain ``DataLoader`` over the same tensors, iterated without a model.

Runs are interleaved (A, B, A, B, ...) in one process; each run's median step time is taken, and the
reported figure is the median over rounds of the per-round ratio. Goal: ≤ 1.03×.

    python benchmarks/overhead.py --rounds 7 --steps 150
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl import MultiTaskDataModule, MultiTaskModule, Task


def mlp_backbone() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU())


class HandWritten(L.LightningModule):
    """What a user writes without lightning-mtl: one backbone, K heads, the sum of K cross-entropies."""

    def __init__(self, num_tasks: int, log_tasks: bool) -> None:
        super().__init__()
        self.backbone = mlp_backbone()
        self.heads = nn.ModuleList(nn.Linear(256, 10) for _ in range(num_tasks))
        self.log_tasks = log_tasks

    def training_step(self, batch, batch_idx):
        x, labels = batch
        z = self.backbone(x)
        losses = [nn.functional.cross_entropy(head(z), labels[f"t{k}"]) for k, head in enumerate(self.heads)]
        if self.log_tasks:
            for k, loss in enumerate(losses):
                self.log(f"train/t{k}/loss", loss, prog_bar=True, batch_size=x.shape[0])
        total = torch.stack(losses).sum()
        self.log("train/loss", total, prog_bar=True, batch_size=x.shape[0])
        return total

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def multitask(num_tasks: int) -> MultiTaskModule:
    tasks = [Task(f"t{k}", nn.Linear(256, 10), nn.CrossEntropyLoss()) for k in range(num_tasks)]
    return MultiTaskModule(mlp_backbone(), tasks)


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, *args) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def median_step(model: L.LightningModule, data, steps: int) -> float:
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        log_every_n_steps=50,
    )
    trainer.fit(model, data)
    return statistics.median(timer.times[5:])


def model_overhead(rounds: int, steps: int, num_tasks: int = 10, batch: int = 128) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(16):
        x = torch.randn(batch, 256, generator=g)
        labels = {f"t{k}": torch.randint(0, 10, (batch,), generator=g) for k in range(num_tasks)}
        batches.append((x, labels))

    def data():
        return DataLoader(batches, batch_size=None, shuffle=False)

    ratios: dict[str, list[float]] = {"bare": [], "logging": []}
    for _ in range(rounds):
        torch.manual_seed(0)
        ours = median_step(multitask(num_tasks), data(), steps)
        bare = median_step(HandWritten(num_tasks, log_tasks=False), data(), steps)
        logging = median_step(HandWritten(num_tasks, log_tasks=True), data(), steps)
        ratios["bare"].append(ours / bare)
        ratios["logging"].append(ours / logging)
    return {name: statistics.median(values) for name, values in ratios.items()} | {"ms_per_step_ours": ours * 1e3}


def iterate(loader, steps: int) -> float:
    """Median seconds per batch over ``steps`` batches (cycling the loader)."""
    times, count = [], 0
    while count < steps:
        last = time.perf_counter()
        for _ in loader:
            now = time.perf_counter()
            times.append(now - last)
            last = now
            count += 1
            if count >= steps:
                break
    return statistics.median(times[5:])


def data_overhead(rounds: int, steps: int, num_tasks: int = 10, batch: int = 128) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    sizes = [2000 + 500 * k for k in range(num_tasks)]
    xs = [torch.randn(n, 256, generator=g) for n in sizes]
    ys = [torch.randint(0, 10, (n,), generator=g) for n in sizes]
    per_task = {f"t{k}": TensorDataset(x, y) for k, (x, y) in enumerate(zip(xs, ys))}
    plain = DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=batch, shuffle=True)
    ratios: dict[str, list[float]] = {"round_robin": [], "temperature": []}
    for _ in range(rounds):
        baseline = iterate(plain, steps)
        for mode in ratios:
            datamodule = MultiTaskDataModule(per_task, batch_size=batch, sampling=mode)
            datamodule.setup("fit")
            ratios[mode].append(iterate(datamodule.train_dataloader(), steps) / baseline)
    return {name: statistics.median(values) for name, values in ratios.items()} | {"ms_per_batch_plain": baseline * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(
        f"# {date.today()} | {platform.processor() or platform.machine()} | {torch.get_num_threads()} threads | "
        f"python {platform.python_version()} | torch {torch.__version__} | lightning {L.__version__}"
    )
    model = model_overhead(args.rounds, args.steps)
    print(
        f"model: MultiTaskModule / hand-written (bare) = {model['bare']:.3f}x, "
        f"/ hand-written (same logging) = {model['logging']:.3f}x; ours {model['ms_per_step_ours']:.2f} ms/step"
    )
    data = data_overhead(args.rounds, args.steps * 4)
    print(
        f"data: round_robin / plain DataLoader = {data['round_robin']:.3f}x, temperature / plain = "
        f"{data['temperature']:.3f}x; plain {data['ms_per_batch_plain']:.3f} ms/batch"
    )


if __name__ == "__main__":
    main()
