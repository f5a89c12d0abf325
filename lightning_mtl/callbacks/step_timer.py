"""`StepTimer`: the wall time of each training step, for comparing the cost of balancers on the same run."""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning.pytorch as pl


class StepTimer(pl.Callback):
    """Records each training step's wall time, from ``on_train_batch_start`` to ``on_train_batch_end``.

    That covers the forward, the balancing, the backward and the optimizer step of the batch (with gradient
    accumulation, a micro-batch), not data loading. ``skip_first`` steps are left out (warm-up: allocator, lazy
    initialisation). :attr:`seconds` holds the times of this process; :meth:`median` is what ``lightning-mtl compare``
    reports. On a GPU the step's kernels may still run after ``on_train_batch_end`` unless something synchronises
    (``loss.item()`` in logging does): read the times as host-side step times.
    """

    def __init__(self, skip_first: int = 5) -> None:
        if isinstance(skip_first, bool) or not isinstance(skip_first, int) or skip_first < 0:
            raise ValueError(f"StepTimer: `skip_first` must be a non-negative int, got {skip_first!r}.")
        self.skip_first = skip_first
        self.seconds: list[float] = []
        self._started: float | None = None
        self._steps = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._started is None:
            return
        elapsed, self._started = time.perf_counter() - self._started, None
        self._steps += 1
        if self._steps > self.skip_first:
            self.seconds.append(elapsed)

    def median(self) -> float:
        """The median step time in seconds; ``nan`` before any step was timed."""
        return statistics.median(self.seconds) if self.seconds else float("nan")
