"""``predict`` writes each task's predictions to files (``TaskPredictionWriter``), by default from the CLI."""

import atexit
import csv
import logging
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from conftest import quiet_trainer
from lightning_mtl import MultiTaskDataModule, MultiTaskModule, Task
from lightning_mtl.architectures import MLP
from lightning_mtl.callbacks import TaskPredictionWriter
from lightning_mtl.cli import end_process_group, run
from test_cli import short


def direct_predictions(model, dataloader) -> dict[str, torch.Tensor]:
    """``model(x)`` over a shared-input loader, task by task, computed without the Trainer."""
    model.eval()
    outputs: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for x, _ in dataloader:
            for task, value in model(x).items():
                outputs.setdefault(task, []).append(value)
    return {task: torch.cat(values) for task, values in outputs.items()}


def test_cli_predict_writes_every_tasks_predictions_into_the_runs_folder(tmp_path, caplog, monkeypatch):
    for name in ("lightning.pytorch", "lightning.fabric"):  # Lightning's loggers print; caplog reads the root's
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    caplog.set_level(logging.INFO)
    trained = run(["fit", *short(tmp_path)])
    checkpoint = trained.trainer.checkpoint_callback.best_model_path
    predicted = run(["predict", *short(tmp_path), "--ckpt_path", checkpoint])
    folder = Path(predicted.trainer.log_dir) / "predictions"
    assert (folder.parent / "config.yaml").is_file()  # the predict run's own folder, beside its config
    assert sorted(os.listdir(folder)) == ["left.pt", "right.pt", "sum.pt"]
    expected = direct_predictions(predicted.model, predicted.datamodule.predict_dataloader())
    assert expected["left"].shape == (64, 10) and expected["sum"].shape == (64,)  # the whole predict split
    for task, values in expected.items():
        torch.testing.assert_close(torch.load(folder / f"{task}.pt"), values, rtol=0, atol=0)
    assert f"Predictions written to {folder}: left.pt, right.pt, sum.pt" in caplog.text


def test_a_prediction_writer_given_on_the_command_line_replaces_the_default(tmp_path):
    checkpoint = run(["fit", *short(tmp_path)]).trainer.checkpoint_callback.best_model_path
    mine = tmp_path / "mine"
    init_args = f'{{"output_dir": "{mine}", "format": "csv"}}'
    writer = f'{{"class_path": "lightning_mtl.callbacks.TaskPredictionWriter", "init_args": {init_args}}}'
    predicted = run(["predict", *short(tmp_path), "--ckpt_path", checkpoint, "--trainer.callbacks+", writer])
    assert not (Path(predicted.trainer.log_dir) / "predictions").exists()
    assert sorted(os.listdir(mine)) == ["left.csv", "right.csv", "sum.csv"]
    expected = direct_predictions(predicted.model, predicted.datamodule.predict_dataloader())
    with open(mine / "left.csv") as file:
        rows = list(csv.reader(file))
    assert rows[0] == [f"left_{j}" for j in range(10)]
    torch.testing.assert_close(torch.tensor([[float(v) for v in row] for row in rows[1:]]), expected["left"])
    with open(mine / "sum.csv") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["sum"]
    torch.testing.assert_close(torch.tensor([float(row[0]) for row in rows[1:]]), expected["sum"])


class SharedInput(Dataset):
    """``(x, {task: y})`` items: every sample carries both tasks' labels."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], {"a": torch.tensor(0.0), "b": torch.tensor(0)}


def small_model() -> MultiTaskModule:
    torch.manual_seed(0)
    return MultiTaskModule(
        MLP(4, [8]),
        [Task("a", nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), nn.MSELoss()),
         Task("b", nn.Linear(8, 3), nn.CrossEntropyLoss())],
    )  # fmt: skip


def per_task_data() -> tuple[MultiTaskDataModule, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    inputs = {"a": torch.randn(23, 4, generator=generator), "b": torch.randn(11, 4, generator=generator)}
    train = {task: TensorDataset(x, torch.zeros(len(x))) for task, x in inputs.items()}
    predict = {task: TensorDataset(x) for task, x in inputs.items()}  # inputs only
    return MultiTaskDataModule(train, predict=predict, batch_size=5), inputs


def test_per_task_batches_give_each_task_its_own_file_in_dataset_order(tmp_path):
    model = small_model()
    data, inputs = per_task_data()
    writer = TaskPredictionWriter(output_dir=str(tmp_path / "out"))
    quiet_trainer(callbacks=[writer]).predict(model, datamodule=data, return_predictions=False)
    assert writer.written == [str(tmp_path / "out" / "a.pt"), str(tmp_path / "out" / "b.pt")]
    with torch.no_grad():
        for task, x in inputs.items():
            expected = model.heads[task](model.backbone(x))
            torch.testing.assert_close(torch.load(tmp_path / "out" / f"{task}.pt"), expected)


def test_predictions_of_different_trailing_shapes_are_kept_per_sample(tmp_path):
    writer = TaskPredictionWriter(output_dir=str(tmp_path))
    writer.setup(quiet_trainer(), None, "predict")
    writer.on_predict_epoch_start(None, None)
    batches = [torch.ones(2, 3), torch.zeros(1, 5)]  # e.g. sequences padded per batch
    for i, batch in enumerate(batches):
        writer.write_on_batch_end(None, None, {"seq": batch}, None, None, i, 0)
    writer.on_predict_epoch_end(quiet_trainer(), None)
    saved = torch.load(tmp_path / "seq.pt")
    assert [row.shape for row in saved] == [(3,), (3,), (5,)]


def test_the_writer_never_overwrites_and_refuses_what_it_cannot_write(tmp_path):
    (tmp_path / "old.pt").write_bytes(b"earlier predictions")
    with pytest.raises(FileExistsError, match=rf"{tmp_path} already holds files.*never overwrites"):
        TaskPredictionWriter(output_dir=str(tmp_path)).setup(quiet_trainer(), None, "predict")
    with pytest.raises(ValueError, match="format must be 'pt' or 'csv'"):
        TaskPredictionWriter(format="npy")
    writer = TaskPredictionWriter(output_dir=str(tmp_path / "new"), format="csv")
    writer.on_predict_epoch_start(None, None)
    refused = r"task 'mask': format='csv' writes 1-D or 2-D predictions, got shape \(2, 3, 4\)"
    with pytest.raises(ValueError, match=refused):
        writer.write_on_batch_end(None, None, {"mask": torch.zeros(2, 3, 4)}, None, None, 0, 0)


class EndProcessGroupAtExit(Callback):
    """In each process ``ddp_spawn`` starts: destroy its gloo group before the interpreter shuts down.

    Lightning leaves the group alive; a spawned process that exits with it alive can be aborted (SIGABRT) by a gloo
    thread, and the parent then raises ``ProcessExitedException`` after the work finished (seen once in a full run).
    """

    def setup(self, trainer, pl_module, stage):
        if torch.distributed.is_initialized():
            atexit.register(end_process_group)


@pytest.mark.slow
def test_under_two_processes_the_files_equal_a_one_process_run(tmp_path):
    model = small_model()
    x = torch.randn(37, 4, generator=torch.Generator().manual_seed(2))
    shared = MultiTaskDataModule(SharedInput(x), predict=SharedInput(x), batch_size=4)
    quiet_trainer(callbacks=[TaskPredictionWriter(str(tmp_path / "one"))]).predict(model, datamodule=shared)
    ddp = dict(accelerator="cpu", devices=2, strategy="ddp_spawn")
    quiet_trainer(callbacks=[TaskPredictionWriter(str(tmp_path / "two")), EndProcessGroupAtExit()], **ddp).predict(
        model, datamodule=shared, return_predictions=False
    )
    for task in ("a", "b"):  # Lightning knew every sample's index: rows back in dataset order
        two, one = (torch.load(tmp_path / run / f"{task}.pt") for run in ("two", "one"))
        torch.testing.assert_close(two, one)
    per_task, inputs = per_task_data()
    quiet_trainer(callbacks=[TaskPredictionWriter(str(tmp_path / "per-task")), EndProcessGroupAtExit()], **ddp).predict(
        model, datamodule=per_task, return_predictions=False
    )
    assert sorted(os.listdir(tmp_path / "per-task")) == ["a-rank0.pt", "a-rank1.pt", "b-rank0.pt", "b-rank1.pt"]
    with torch.no_grad():  # each process's share, in its own order: every world_size-th sample from its rank
        for task, values in inputs.items():
            expected = model.heads[task](model.backbone(values))
            for rank in (0, 1):
                share = torch.load(tmp_path / "per-task" / f"{task}-rank{rank}.pt")
                torch.testing.assert_close(share, expected[rank::2])


def test_processes_that_cannot_gather_each_write_their_own_share():
    from lightning_mtl.callbacks.prediction_writer import _merge

    share = {(0, "a"): ([torch.ones(2)], [[1, 3]])}  # process 1 of 2 (e.g. no torch.distributed): only its own
    ((rank, value),) = _merge({1: share}, world_size=2)[(0, "a")]
    assert rank == 1 and value.tolist() == [1.0, 1.0]  # written as a-rank1.pt, never as a complete a.pt
