"""`TaskWeights`: the task weights of every sampled step in one chart, for every kind of balancer."""

import copy
import json
from pathlib import Path

import lightning as L
import pytest
from torch.utils.data import DataLoader

from conftest import RecordingLogger, quiet_trainer
from lightning_mtl.callbacks import TaskWeights
from test_module import SharedInput, make_module, make_tasks


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pictures of runs without a logger go to the working directory


class WeightRecorder(L.Callback):
    def __init__(self):
        self.weights = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.last_step
        self.weights[step.global_step] = None if step.weights is None else step.weights.tolist()


def fit(balancer, tmp_path, epochs=2, **kwargs):
    """Two epochs of 6 steps; (callback, recorded weights of every step, files dir)."""
    weights, recorder = TaskWeights(**kwargs), WeightRecorder()
    module = make_module(tasks=make_tasks(metrics=False, cls_weight=0.5, reg_weight=2.0), balancer=balancer)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[weights, recorder], default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(SharedInput(96), batch_size=16))
    return weights, recorder.weights, Path(tmp_path) / "figures" / "train" / "task_weights"


@pytest.mark.parametrize("balancer", ["static", "uw", "dwa", "upgrad", "mgda"])
def test_chart_holds_the_weights_of_every_sampled_step(tmp_path, balancer):
    weights, recorded, folder = fit(balancer, tmp_path, every_n_steps=3)
    assert weights.steps == [0, 3, 6, 9]
    for step, row in zip(weights.steps, weights.weights):
        assert row == pytest.approx(recorded[step], abs=1e-7)
    if balancer == "static":  # flat lines at the Task weights
        assert weights.weights == [[0.5, 2.0]] * 4
    # drawn at each epoch's end with the history so far; not again at the end of fit (nothing new)
    assert sorted(p.name for p in folder.iterdir()) == ["step_000006.json", "step_000006.png", "step_000012.json", "step_000012.png"]
    first, last = (json.loads((folder / f"step_{s:06d}.json").read_text()) for s in (6, 12))
    assert first["steps"] == [0, 3] and last["steps"] == [0, 3, 6, 9]
    assert last["task_names"] == ["cls", "reg"] and last["weights"] == weights.weights
    assert last["balancer"] == type(make_module(balancer=balancer).balancer).__name__


def test_every_n_epochs_zero_draws_at_the_end_of_fit_only(tmp_path):
    _, _, folder = fit("uw", tmp_path, every_n_steps=1, every_n_epochs=0)
    assert sorted(p.name for p in folder.iterdir()) == ["step_000012.json", "step_000012.png"]
    assert json.loads((folder / "step_000012.json").read_text())["steps"] == list(range(12))


def test_a_fit_stopped_mid_epoch_draws_its_last_points(tmp_path):
    weights = TaskWeights(every_n_steps=2, every_n_epochs=5)
    quiet_trainer(max_steps=5, callbacks=[weights], default_root_dir=tmp_path).fit(
        make_module(tasks=make_tasks(metrics=False), balancer="uw"), DataLoader(SharedInput(96), batch_size=16)
    )
    (json_file,) = (Path(tmp_path) / "figures" / "train" / "task_weights").glob("*.json")
    assert json.loads(json_file.read_text())["steps"] == [0, 2, 4]


def test_a_direction_method_has_no_weights_and_is_told(tmp_path):
    with pytest.warns(UserWarning, match="GradDrop gave no task weights"):
        _, recorded, folder = fit("graddrop", tmp_path, epochs=1)
    assert set(recorded.values()) == {None} and not folder.exists()


def test_under_accumulation_each_step_is_sampled_once():
    weights = TaskWeights(every_n_steps=1)
    quiet_trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[weights]).fit(
        make_module(tasks=make_tasks(metrics=False), balancer="uw"), DataLoader(SharedInput(96), batch_size=16)
    )
    assert weights.steps == [0, 1, 2]


def test_the_history_survives_a_checkpoint(tmp_path):
    weights, _, _ = fit("uw", tmp_path, epochs=1, every_n_steps=2)
    restored = TaskWeights()
    restored.load_state_dict(copy.deepcopy(weights.state_dict()))
    assert restored.steps == [0, 2, 4] and restored.weights == weights.weights and restored.task_names == ("cls", "reg")


def test_under_a_wandb_like_logger_the_table_has_a_row_per_sample(tmp_path, monkeypatch):
    import lightning_mtl.callbacks.figures as figures

    logged = []
    monkeypatch.setattr(figures, "WandbLogger", RecordingLogger)  # route this logger the W&B way
    monkeypatch.setattr(figures, "_log_wandb", lambda logger, key, image, step, table: logged.append((key, step, table)))
    weights = TaskWeights(every_n_steps=2)
    quiet_trainer(max_epochs=1, callbacks=[weights], logger=RecordingLogger()).fit(
        make_module(tasks=make_tasks(metrics=False), balancer="uw"), DataLoader(SharedInput(96), batch_size=16)
    )
    ((key, step, (columns, rows)),) = logged
    assert (key, step, columns) == ("train/task_weights", 6, ["step", "cls", "reg"])
    assert rows == [[s, *w] for s, w in zip([0, 2, 4], weights.weights)]


def test_arguments_and_model_are_checked():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every_n_steps"):
            TaskWeights(every_n_steps=bad)
    with pytest.raises(ValueError, match="every_n_epochs"):
        TaskWeights(every_n_epochs=-1)

    class Plain(L.LightningModule):
        pass

    with pytest.raises(ValueError, match="MultiTaskModule"):
        TaskWeights().setup(quiet_trainer(), Plain(), "fit")


def test_weights_stay_on_the_device_until_the_chart_is_drawn():
    weights = TaskWeights(every_n_steps=1)
    seen = []

    class Peek(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((len(weights._pending), len(weights.weights)))

    quiet_trainer(max_steps=3, callbacks=[weights, Peek()]).fit(
        make_module(tasks=make_tasks(metrics=False), balancer="uw"), DataLoader(SharedInput(96), batch_size=16)
    )
    assert seen == [(1, 0), (2, 0), (3, 0)]  # sampled, not read
    assert weights._pending == [] and len(weights.weights) == 3  # read once, for the end-of-fit chart
