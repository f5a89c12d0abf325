"""`GradientConflict`: cosine similarity and norms of the task gradients, every N training steps."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_mtl.callbacks.figures import heatmap, log_figure, logger_step, require_matplotlib
from lightning_mtl.checks import _one_task_per_step


def gradient_cosines(gramian: Tensor) -> tuple[Tensor, Tensor]:
    """``(cosines, norms)`` of the task gradients whose Gramian is ``gramian`` (K × K).

    ``cos_ij = G_ij / sqrt(G_ii G_jj)`` and ``norm_i = sqrt(G_ii)``; a task with a zero (or non-finite) gradient,
    such as a task without a labelled sample in the step, has NaN cosines (undefined), its norm is kept.
    """
    gramian = gramian.detach().double()
    norms = gramian.diagonal().clamp_min(0).sqrt()
    valid = torch.isfinite(norms) & (norms > 0)
    cosines = gramian / (norms.unsqueeze(1) * norms.unsqueeze(0))
    cosines = cosines.clamp(-1.0, 1.0)
    cosines[~(valid.unsqueeze(1) & valid.unsqueeze(0))] = float("nan")
    return cosines, norms


def conflict_statistics(cosines: Tensor, norms: Tensor) -> dict[str, float]:
    """The scalars :class:`GradientConflict` logs, from one step's cosines and norms (tasks with a gradient only).

    ``conflict_fraction``: the share of task pairs whose gradients point against each other (cosine < 0);
    ``mean_cosine``: the mean cosine over pairs; ``norm_ratio``: the largest gradient norm over the smallest.
    Pairs or norms that are undefined (fewer than two tasks with a gradient) are left out.
    """
    rows, cols = torch.triu_indices(cosines.shape[0], cosines.shape[0], offset=1)
    pairs = cosines[rows, cols]
    pairs = pairs[torch.isfinite(pairs)]
    out: dict[str, float] = {}
    if pairs.numel():
        out["conflict_fraction"] = float((pairs < 0).double().mean())
        out["mean_cosine"] = float(pairs.mean())
    positive = norms[torch.isfinite(norms) & (norms > 0)]
    if positive.numel() >= 2:
        out["norm_ratio"] = float(positive.max() / positive.min())
    return out


class GradientConflict(pl.Callback):
    """How much the tasks' gradients agree: the K × K cosine similarity of the task gradients, and their norms.

    Every ``every_n_steps`` training steps it reads the Gramian ``G`` of the step's task gradients from
    ``module.last_step`` (:class:`~lightning_mtl.StepView`) and logs, at that step, through every logger of the
    trainer (as ``LearningRateMonitor`` does, so that the values do not wait for ``log_every_n_steps``):

    - ``train/gradients/conflict_fraction``: the share of task pairs with a negative cosine (conflicting);
    - ``train/gradients/mean_cosine``: the mean cosine over the pairs;
    - ``train/gradients/norm_ratio``: the largest task-gradient norm over the smallest;
    - ``train/{task}/grad_norm``: each task's gradient norm ``sqrt(G_kk)``.

    ``cos_ij = G_ij / sqrt(G_ii G_jj)``, with the gradients the module balances: of the shared parameters with
    ``gradients="parameters"``, of the backbone output with ``gradients="representation"`` (in the units of the
    task losses; for DB-MTL, of the log-losses it balances). A gradient-level balancer forms the Gramian at every
    step, so reading it costs nothing; for a loss-level balancer (static weights included) the callback calls
    ``module.request_gramian()`` before each sampled step, which costs that step one batched backward of the K task
    losses and leaves the update unchanged.

    With ``heatmap=True`` it also logs, at the end of every ``every_n_epochs``-th training epoch and at the end of
    fit (for samples not drawn yet), the mean cosine matrix over the sampled steps since the last picture as a
    heatmap under ``train/gradients/cosine`` (:func:`~lightning_mtl.callbacks.figures.log_figure`: a W&B image, a
    TensorBoard image, or PNG + JSON files in the run's log directory). Per epoch, not per sample: drawing a
    picture costs 50–200 ms (K = 2 to 10), many training steps of a small model.

    Under DDP the Gramian is that of the global batch's task gradients, identical on every process (the
    balancing paths reduce it), so the values are exact, not a rank's local view; every process asks for it on
    the same steps (decided by ``trainer.global_step``), and rank zero logs. Under gradient accumulation the first
    micro-batch of a sampled step is read. A task without a labelled sample in the step has no cosine then. Data
    that holds one task per step (round-robin, proportional, temperature, sequential sampling) is refused: there
    is never a pair of tasks in a step. The last sample's matrix and norms are also kept as :attr:`cosines` and
    :attr:`norms`.

    Args:
        every_n_steps: sample every this many optimizer steps (steps 0, N, 2N, ...). A sample of a loss-level
            balancer costs about 1 (K = 2) to 3 (K = 10) training steps of a W-MLP; the default keeps that under 5 %
            of the run (``benchmarks/RESULTS.md``).
        heatmap: log the heatmap (needs matplotlib: ``pip install lightning-mtl[plots]``).
        every_n_epochs: draw the heatmap at the end of every this many training epochs (0: only at the end of fit).
    """

    def __init__(self, every_n_steps: int = 100, heatmap: bool = True, every_n_epochs: int = 1) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be a non-negative integer, got {every_n_epochs!r}")
        if heatmap:
            require_matplotlib("GradientConflict(heatmap=True)")
        self.every_n_steps = every_n_steps
        self.heatmap = heatmap
        self.every_n_epochs = every_n_epochs
        self._asked: Optional[int] = None  # the global step whose Gramian was asked for
        self._read: Optional[int] = None  # the last global step read
        self._warned = False
        self._task_names: tuple[str, ...] = ()
        #: the last sample's cosine matrix (K x K, float64, CPU; NaN for a task without gradient) and gradient norms
        self.cosines: Optional[Tensor] = None
        self.norms: Optional[Tensor] = None
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self._sum: Optional[Tensor] = None
        self._count: Optional[Tensor] = None
        self._steps: list[int] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not (hasattr(pl_module, "last_step") and hasattr(pl_module, "request_gramian")):
            raise ValueError(
                f"GradientConflict reads the task gradients of a MultiTaskModule (`last_step`, `request_gramian`); "
                f"{type(pl_module).__name__} is not one."
            )
        sampling = _one_task_per_step(getattr(trainer, "datamodule", None))
        if stage == "fit" and sampling is not None:
            raise ValueError(
                f"GradientConflict compares the gradients of the tasks of one step; sampling={sampling!r} holds one task "
                "per step, so there is never a pair to compare. Use sampling='zip' or 'zip_shortest'."
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._asked:
            self._asked = step
            pl_module.request_gramian()  # ignored by a gradient-level balancer, which forms the Gramian anyway

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        view = pl_module.last_step
        if view is None or view.global_step != self._asked or view.global_step == self._read:
            return
        self._read = view.global_step
        if view.gramian is None:
            if not view.skipped and not self._warned:
                self._warned = True
                rank_zero_warn(
                    f"GradientConflict: step {view.global_step} formed no task gradients of shared parameters (a frozen "
                    "backbone?), so there is nothing to compare; steps without them are left out."
                )
            return
        cosines, norms = gradient_cosines(view.gramian)
        self.cosines, self.norms = cosines, norms = cosines.cpu(), norms.cpu()  # one host read every N steps
        self._task_names = view.task_names
        metrics = {f"train/gradients/{name}": value for name, value in conflict_statistics(cosines, norms).items()}
        metrics.update({f"train/{task}/grad_norm": float(norm) for task, norm in zip(view.task_names, norms)})
        if trainer.is_global_zero:
            step = logger_step(trainer)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        if self.heatmap:
            finite = torch.isfinite(cosines)
            if self._sum is None:
                self._sum, self._count = torch.zeros_like(cosines), torch.zeros_like(cosines)
            self._sum += torch.where(finite, cosines, 0.0)
            self._count += finite.double()
            self._steps.append(view.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._draw(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer)  # samples not drawn yet (every_n_epochs, an unfinished last epoch)

    def _draw(self, trainer: pl.Trainer) -> None:
        if self._sum is None or not self._steps:
            return
        mean = self._sum / self._count  # NaN where no sample had the pair
        names, steps, count = list(self._task_names), self._steps, len(self._steps)
        self._reset_epoch()
        if not trainer.is_global_zero:
            return
        span = f"step {steps[0]}" if count == 1 else f"steps {steps[0]}–{steps[-1]}"
        figure = heatmap(
            mean.tolist(),
            names,
            f"Task-gradient cosine, mean of {count} sample{'s' if count > 1 else ''} ({span})",
            vmin=-1.0,
            vmax=1.0,
            colorbar="cosine similarity",
        )
        data = {"task_names": names, "cosine": mean.tolist(), "samples": count, "steps": steps}
        rows = [[name, *row] for name, row in zip(names, mean.tolist())]
        log_figure(trainer, "train/gradients/cosine", figure, data=data, table=(["task", *names], rows))

    def state_dict(self) -> dict[str, Any]:
        """The samples not drawn yet, so that a resumed run draws the same heatmap."""
        return {"sum": self._sum, "count": self._count, "steps": list(self._steps), "task_names": list(self._task_names)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._sum, self._count = state_dict["sum"], state_dict["count"]
        self._steps, self._task_names = list(state_dict["steps"]), tuple(state_dict["task_names"])
