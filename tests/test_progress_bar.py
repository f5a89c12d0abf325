"""What the progress bar shows: current per-task training losses, and per-task validation metrics."""

import lightning as L
import pytest
from torch.utils.data import DataLoader

from conftest import quiet_trainer
from test_module import SharedInput, make_module


class ProgressBarValues(L.Callback):
    """Records, after each training step, the progress bar's per-task losses and the step's own losses."""

    def __init__(self):
        self.shown, self.actual = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = trainer.progress_bar_callback.get_metrics(trainer, pl_module)
        self.shown.append({name: float(bar[f"train/{name}/loss"]) for name in ("cls", "reg")})
        self.actual.append(dict(zip(pl_module.last_step.task_names, pl_module.last_step.losses.tolist())))


def test_per_task_losses_in_the_progress_bar_are_the_current_steps_between_logging_steps():
    recorder = ProgressBarValues()
    trainer = quiet_trainer(enable_progress_bar=True, log_every_n_steps=50, max_steps=8, callbacks=[recorder])
    trainer.fit(make_module(), DataLoader(SharedInput(), batch_size=16))
    assert len(recorder.shown) == 8
    for shown, actual in zip(recorder.shown, recorder.actual):
        assert shown == pytest.approx(actual, rel=1e-3)  # the bar rounds to its display precision
    assert len({tuple(shown.values()) for shown in recorder.shown}) == 8  # they move


def test_per_task_validation_metrics_are_in_the_progress_bar():
    trainer = quiet_trainer(enable_progress_bar=True, limit_train_batches=2, limit_val_batches=2)
    loader = DataLoader(SharedInput(), batch_size=16)
    trainer.fit(make_module(), loader, loader)
    shown = trainer.progress_bar_callback.get_metrics(trainer, trainer.lightning_module)
    assert "val/reg/mse" in shown and "val/loss" in shown
    assert [key for key in shown if key.startswith("val/cls/")]  # the classification task's metric
    assert float(shown["val/reg/mse"]) == pytest.approx(float(trainer.callback_metrics["val/reg/mse"]), rel=1e-3)
