"""`TaskWeights`: what the balancer did to the task weights over training, as one chart with a line per task."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_mtl.callbacks.figures import line_chart, log_figure, require_matplotlib


class TaskWeights(pl.Callback):
    """Collects the effective task weights every ``every_n_steps`` steps and draws them as one line chart.

    The module logs each task's weight as its own scalar series (``train/{task}/weight``); this callback puts
    the K series in one picture, which is how a balancer's behaviour is read (UW's weights drifting apart,
    FAMO's or DWA's oscillating, MGDA's collapsing on one task), and works alike for every balancer: Static
    draws K flat lines at the ``Task`` weights, a gradient-level method its Gramian weighting ``w``. The weights
    are those of ``module.last_step.weights`` (:class:`~lightning_mtl.StepView`): ``∂loss/∂L_k`` for a loss-level
    method. Direction methods (GradDrop, DB-MTL) have no weights: nothing is drawn, with a warning at the end
    of fit; skipped steps are left out.

    The chart (x: the global step, one line per task) is logged under ``train/task_weights`` at the end of every
    ``every_n_epochs``-th training epoch and at the end of fit, each time with the whole history so far, through
    :func:`~lightning_mtl.callbacks.figures.log_figure` (W&B image plus a table of the values, TensorBoard image,
    or PNG + JSON files in the run's log directory). The weights are kept on the device as they are sampled and
    read to the host only when the chart is drawn. The history is in the callback's checkpoint state, so a
    resumed run draws the whole of it. Under DDP the weights are the same on every process; rank zero draws.

    Args:
        every_n_steps: sample the weights every this many optimizer steps (the first micro-batch of a step under
            gradient accumulation).
        every_n_epochs: draw at the end of every this many training epochs (0: only at the end of fit).
    """

    def __init__(self, every_n_steps: int = 10, every_n_epochs: int = 1) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be a non-negative integer, got {every_n_epochs!r}")
        require_matplotlib("TaskWeights")
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.steps: list[int] = []
        self.weights: list[list[float]] = []  # host copy of the history, filled when drawing
        self.task_names: tuple[str, ...] = ()
        self._pending: list[tuple[int, Tensor]] = []  # sampled on the device, not read yet
        self._read: Optional[int] = None
        self._drawn = 0  # number of samples in the last chart drawn

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "last_step"):
            raise ValueError(
                f"TaskWeights reads the task weights of a MultiTaskModule (`last_step`); {type(pl_module).__name__} is not one."
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        view = pl_module.last_step
        if view is None or view.global_step % self.every_n_steps or view.global_step == self._read:
            return
        self._read = view.global_step
        if view.weights is not None:
            self.task_names = view.task_names
            self._pending.append((view.global_step, view.weights.detach().clone()))

    def _flush(self) -> None:
        if self._pending:
            stacked = torch.stack([w.float() for _, w in self._pending]).cpu()  # one host read
            self.steps += [step for step, _ in self._pending]
            self.weights += stacked.tolist()
            self._pending = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._draw(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._flush()
        if not self.steps:
            rank_zero_warn(
                f"TaskWeights: balancer {type(getattr(pl_module, 'balancer', None)).__name__} gave no task weights in the "
                "sampled steps (a direction method such as GradDrop or DB-MTL has none), so there is no chart."
            )
            return
        if len(self.steps) != self._drawn:
            self._draw(trainer)

    def _draw(self, trainer: pl.Trainer) -> None:
        self._flush()
        if not self.steps:
            return
        self._drawn = len(self.steps)
        if not trainer.is_global_zero:
            return
        names = list(self.task_names)
        series = {name: [row[k] for row in self.weights] for k, name in enumerate(names)}
        balancer = type(getattr(trainer.lightning_module, "balancer", None)).__name__
        figure = line_chart(self.steps, series, f"Task weights ({balancer})", "step", "weight")
        data = {"task_names": names, "steps": self.steps, "weights": self.weights, "balancer": balancer}
        rows = [[step, *row] for step, row in zip(self.steps, self.weights)]
        log_figure(trainer, "train/task_weights", figure, data=data, table=(["step", *names], rows))

    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {"steps": list(self.steps), "weights": [list(row) for row in self.weights], "task_names": list(self.task_names)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps, self.weights = list(state_dict["steps"]), [list(row) for row in state_dict["weights"]]
        self.task_names = tuple(state_dict["task_names"])
        self._pending, self._drawn = [], 0
