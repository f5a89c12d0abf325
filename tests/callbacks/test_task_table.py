"""TaskTable: the per-task (task, metric, value) table printed when fit, validate or test ends."""

import types

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import BinaryAccuracy
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

from conftest import RecordingLogger, quiet_trainer
from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.callbacks import TaskTable
from lightning_mtl.callbacks.task_table import format_rows, task_rows

TASKS = ("depth", "edge", "depth_x")  # 'depth' is a prefix of another task's name


class Samples(Dataset):
    def __init__(self, n=24):
        self.x = torch.randn(n, 6, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        return x, {"depth": x[0], "edge": (x[1] > 0).float(), "depth_x": x[2]}


def module(names=TASKS):
    torch.manual_seed(0)
    metrics = {
        "depth": {"mae": MeanAbsoluteError(), "mse": MeanSquaredError()},
        "edge": BinaryAccuracy(),
        "depth_x": None,
    }
    losses = {"depth": nn.MSELoss(), "edge": nn.BCEWithLogitsLoss(), "depth_x": nn.L1Loss()}
    tasks = [
        Task(name, nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), losses[name], metrics=metrics[name], weight=1.0 + i)
        for i, name in enumerate(names)
    ]
    return MultiTaskModule(nn.Sequential(nn.Linear(6, 8), nn.ReLU()), tasks)


def loader():
    return DataLoader(Samples(), batch_size=8)


def expected_rows(metrics, stage, names=TASKS):
    """The rows written out by hand from the module's logging scheme: loss first, metrics in their order."""
    metric_names = {"depth": ["loss", "mae", "mse"], "edge": ["loss", "binary_accuracy"], "depth_x": ["loss"]}
    rows = [(name, metric, float(metrics[f"{stage}/{name}/{metric}"])) for name in names for metric in metric_names[name]]
    return rows + [(None, "loss", float(metrics[f"{stage}/loss"]))]


def test_rows_after_validate_equal_the_logged_metrics():
    trainer = quiet_trainer(callbacks=[TaskTable()])
    trainer.validate(module(), loader(), verbose=False)
    metrics = trainer.callback_metrics
    rows = TaskTable().rows(trainer, "val")
    assert rows == expected_rows(metrics, "val")
    assert len(rows) == len([key for key in metrics if key.startswith("val/")])  # every logged value has its row
    task_losses = sum((1.0 + i) * float(metrics[f"val/{name}/loss"]) for i, name in enumerate(TASKS))
    assert rows[-1][2] == pytest.approx(task_losses)  # the overall row: Σ Task.weight × task loss


def test_validate_prints_every_task_metric_and_value(capsys):
    trainer = quiet_trainer(callbacks=[TaskTable(digits=5)])
    trainer.validate(module(), loader(), verbose=False)
    out = capsys.readouterr().out
    assert "Per-task val metrics" in out
    for task, metric, value in expected_rows(trainer.callback_metrics, "val"):
        line = next(line for line in out.splitlines() if line.split()[:2] == [task or "(all)", metric])
        assert line.split()[2] == f"{value:#.5g}"


def test_fit_prints_the_last_validation_epoch_and_test_the_test_split(capsys):
    logger = RecordingLogger()
    trainer = quiet_trainer(callbacks=[TaskTable()], max_epochs=2, logger=logger)
    model = module()
    trainer.fit(model, loader(), loader())
    out = capsys.readouterr().out
    assert out.count("Per-task val metrics (last validation epoch)") == 1  # once, at the end, not every epoch
    last_epoch = [metrics for _, metrics in logger.history if "val/loss" in metrics][-1]
    table = TaskTable()
    assert table.rows(trainer, "val") == expected_rows(last_epoch, "val")
    assert table.rows(trainer, "test") == []

    trainer.test(model, loader(), verbose=False)
    out = capsys.readouterr().out
    assert "Per-task test metrics" in out and "val metrics" not in out
    assert table.rows(trainer, "test") == expected_rows(trainer.callback_metrics, "test")
    assert f"{float(trainer.callback_metrics['test/edge/binary_accuracy']):#.4g}" in out


def test_nothing_is_printed_when_the_stage_logged_no_metric(capsys):
    quiet_trainer(callbacks=[TaskTable()], limit_train_batches=2).fit(module(), loader())  # no validation
    assert "Per-task" not in capsys.readouterr().out


def test_keys_are_split_at_the_registered_task_names():
    metrics = {
        "val/edge/loss": torch.tensor(0.5),
        "val/depth_x/loss": 1.0,
        "val/depth/loss": 2.0,
        "val/depth/acc/dataloader_idx_1": 0.25,  # a '/' after the task stays in the metric
        "val/loss/dataloader_idx_1": 3.0,
        "val/loss": 4.0,
        "val/other/loss": 9.0,  # not a task of the module
        "val/depth": 9.0,  # no metric
        "train/depth/loss": 9.0,  # another stage
        "validation/depth/loss": 9.0,
    }
    assert task_rows(metrics, ["depth", "edge", "depth_x"], "val") == [
        ("depth", "loss", 2.0),
        ("depth", "acc/dataloader_idx_1", 0.25),
        ("edge", "loss", 0.5),
        ("depth_x", "loss", 1.0),
        (None, "loss/dataloader_idx_1", 3.0),
        (None, "loss", 4.0),
    ]
    assert task_rows({}, ["depth"], "val") == []


@pytest.mark.parametrize("count", [1, 12])
def test_any_number_of_tasks_gives_aligned_columns(count):
    names = [f"task_{i}" for i in range(count)]
    metrics = {f"test/{name}/{metric}": i * 10.0 ** -i for i, name in enumerate(names) for metric in ("loss", "r2")}
    rows = task_rows({**metrics, "test/loss": 1.0}, names, "test")
    assert [row[0] for row in rows] == [name for name in names for _ in range(2)] + [None]
    lines = format_rows(rows, "title").splitlines()
    assert lines[0] == "title" and lines[1].split() == ["task", "metric", "value"]
    assert len({len(line) for line in lines[1:]}) == 1  # fixed width: values right-aligned in one column
    assert len(lines) == 3 + len(rows)


def test_prints_on_global_rank_zero_only(capsys):
    trainer = quiet_trainer()
    model = module()
    trainer.validate(model, loader(), verbose=False)
    capsys.readouterr()
    table = TaskTable()
    other_rank = types.SimpleNamespace(is_global_zero=False, callback_metrics=trainer.callback_metrics, lightning_module=model)
    table.teardown(other_rank, model, "validate")
    assert capsys.readouterr().out == ""
    table.teardown(trainer, model, "validate")
    assert "Per-task val metrics" in capsys.readouterr().out
    table.teardown(trainer, model, "predict")
    assert capsys.readouterr().out == ""


class TableLogger(RecordingLogger):
    def __init__(self):
        super().__init__()
        self.tables = []

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables.append((key, columns, data))


def test_log_table_logs_the_rows_to_a_logger_that_holds_tables():
    logger = TableLogger()
    trainer = quiet_trainer(callbacks=[TaskTable(log_table=True)], logger=logger)
    trainer.test(module(), loader(), verbose=False)
    rows = expected_rows(trainer.callback_metrics, "test")
    assert logger.tables == [("test/task_table", ["task", "metric", "value"], [[t or "(all)", m, v] for t, m, v in rows])]


def test_log_table_without_a_logger_that_holds_tables_is_refused():
    class Plain(Logger):
        name, version = "plain", "0"

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, *args, **kwargs):
            pass

    for logger in (False, Plain()):
        with pytest.raises(ValueError, match="no logger of the trainer can log a table.*WandbLogger"):
            quiet_trainer(callbacks=[TaskTable(log_table=True)], logger=logger).validate(module(), loader())


def test_log_table_to_wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="task-table")
    try:
        quiet_trainer(callbacks=[TaskTable(log_table=True)], logger=logger).validate(module(), loader(), verbose=False)
        run_dir = logger.experiment.dir
    finally:
        wandb.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*/files/media/table/val/task_table_*.table.json")), run_dir


def test_arguments_and_model_are_checked():
    for digits in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="digits"):
            TaskTable(digits=digits)

    class Plain(L.LightningModule):
        def validation_step(self, batch, batch_idx):
            pass

    with pytest.raises(ValueError, match="no task registry.*MultiTaskModule"):
        quiet_trainer(callbacks=[TaskTable()]).validate(Plain(), loader())


def test_several_dataloaders_keep_their_suffix_and_each_has_an_overall_row():
    trainer = quiet_trainer()
    trainer.validate(module(), [loader(), loader()], verbose=False)
    rows = TaskTable().rows(trainer, "val")
    assert [row[:2] for row in rows[:6]] == [
        ("depth", "loss/dataloader_idx_0"), ("depth", "mae/dataloader_idx_0"), ("depth", "mse/dataloader_idx_0"),
        ("depth", "loss/dataloader_idx_1"), ("depth", "mae/dataloader_idx_1"), ("depth", "mse/dataloader_idx_1"),
    ]
    by_key = {(task, metric): value for task, metric, value in rows}
    assert by_key[("depth", "mae/dataloader_idx_1")] == float(trainer.callback_metrics["val/depth/mae/dataloader_idx_1"])
    assert [metric for task, metric, _ in rows if task is None] == [
        "loss/dataloader_idx_0", "loss", "loss/dataloader_idx_1"  # the plain one (the first's), as logged
    ]
    assert len(rows) == len([key for key in trainer.callback_metrics if key.startswith("val/")])
