"""DeltaM: Δm against single-task baselines, its baseline file, its errors and its table."""

import json
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, PearsonCorrCoef

from conftest import RecordingLogger, quiet_trainer, run_script
from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.baselines import (
    Baselines,
    logged_task_metrics,
    read_baselines,
    task_directions,
    write_baselines,
)
from lightning_mtl.callbacks import DeltaM
from lightning_mtl.callbacks.delta_m import delta_m, delta_m_table, relative_gain
from test_module import SharedInput

# Baselines of the tiny module below: two metrics per task, one task's lower-is-better.
BASE = {"cls": {"acc": 0.8, "f1": 0.75}, "reg": {"mae": 1.2, "mse": 2.0}}


def module(reg_metrics=None):
    torch.manual_seed(0)
    tasks = [
        Task("cls", nn.Linear(8, 2), nn.CrossEntropyLoss(),
             {"acc": MulticlassAccuracy(2, average="micro"), "f1": MulticlassF1Score(2, average="macro")}),
        Task("reg", nn.Sequential(nn.Linear(8, 1), nn.Flatten(0)), nn.MSELoss(),
             reg_metrics if reg_metrics is not None else {"mae": MeanAbsoluteError(), "mse": MeanSquaredError()}),
    ]
    return MultiTaskModule(nn.Sequential(nn.Linear(6, 8), nn.Tanh()), tasks, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def loader(n=48, seed=1, **kwargs):
    return DataLoader(SharedInput(n, seed=seed, **kwargs), batch_size=16)


def single_task_loader(task, seed=1):
    data = SharedInput(48, seed=seed)
    return DataLoader([(x, {task: y[task]}) for x, y in data], batch_size=16)


def baselines(val=BASE, test=BASE, directions=None):
    metrics = {split: tasks for split, tasks in (("val", val), ("test", test)) if tasks is not None}
    return Baselines({s: {t: dict(m) for t, m in tasks.items()} for s, tasks in metrics.items()}, directions or {})


def by_hand(logged, split, base=BASE, lower=("reg/mae", "reg/mse")):
    """Δm written out: each task's mean signed relative change, then the mean over tasks, in %."""
    per_task = []
    for task, metrics in base.items():
        changes = []
        for metric, b in metrics.items():
            m = float(logged[f"{split}/{task}/{metric}"])
            sign = -1.0 if f"{task}/{metric}" in lower else 1.0
            changes.append(sign * (m - b) / b * 100)
        per_task.append(sum(changes) / len(changes))
    return sum(per_task) / len(per_task)


# -- the formula --------------------------------------------------------------------------------------------


def test_delta_m_by_hand_several_metrics_per_task_and_lower_is_better():
    values = {"seg": {"miou": 0.55, "pix_acc": 0.76}, "depth": {"abs_err": 0.30, "rel_err": 0.22}, "normal": {"angle": 21.0}}
    base = {"seg": {"miou": 0.50, "pix_acc": 0.80}, "depth": {"abs_err": 0.40, "rel_err": 0.20}, "normal": {"angle": 20.0}}
    directions = {"seg/miou": "max", "seg/pix_acc": "max", "depth/abs_err": "min", "depth/rel_err": "min", "normal/angle": "min"}
    # seg: (+10 − 5)/2 = 2.5; depth: (+25 − 10)/2 = 7.5; normal: −5
    assert delta_m(values, base, directions) == pytest.approx((2.5 + 7.5 - 5.0) / 3)
    assert delta_m(values, base, directions, average="metrics") == pytest.approx((10 - 5 + 25 - 10 - 5) / 5)
    assert delta_m(base, base, directions) == 0.0


def test_relative_gain_signs():
    assert relative_gain(0.9, 0.8, "max") == pytest.approx(12.5)
    assert relative_gain(0.9, 0.8, "min") == pytest.approx(-12.5)
    assert relative_gain(-0.25, -0.5, "max") == pytest.approx(50.0)  # an R² below zero improving is a gain
    with pytest.raises(ValueError, match="baseline is 0"):
        relative_gain(0.3, 0.0, "max")
    with pytest.raises(ValueError, match="delta_m: a/b: the baseline is 0"):
        delta_m({"a": {"b": 1.0}}, {"a": {"b": 0.0}}, {"a/b": "max"})
    with pytest.raises(ValueError, match="direction of 'a/b'"):
        delta_m({"a": {"b": 1.0}}, {"a": {"b": 2.0}}, {})


# -- the callback in runs -----------------------------------------------------------------------------------


def test_validate_and_test_log_delta_m_equal_to_the_hand_computed_value():
    trainer = quiet_trainer(callbacks=[DeltaM(baselines())])
    model = module()
    trainer.validate(model, loader(), verbose=False)
    logged = dict(trainer.callback_metrics)
    assert float(logged["val/delta_m"]) == pytest.approx(by_hand(logged, "val"), rel=1e-5)
    trainer.test(model, loader(seed=2), verbose=False)
    logged = dict(trainer.callback_metrics)
    assert float(logged["test/delta_m"]) == pytest.approx(by_hand(logged, "test"), rel=1e-5)
    # average over all pairs instead
    trainer = quiet_trainer(callbacks=[DeltaM(baselines(), average="metrics")])
    trainer.validate(model, loader(), verbose=False)
    logged = trainer.callback_metrics
    pairs = [(1, "cls", "acc"), (1, "cls", "f1"), (-1, "reg", "mae"), (-1, "reg", "mse")]
    expected = sum(s * (float(logged[f"val/{t}/{m}"]) - BASE[t][m]) / BASE[t][m] * 100 for s, t, m in pairs) / 4
    assert float(logged["val/delta_m"]) == pytest.approx(expected, rel=1e-5)


def test_reading_the_metrics_first_leaves_the_module_logged_values_unchanged():
    plain = quiet_trainer()
    plain.validate(module(), loader(), verbose=False)
    with_delta = quiet_trainer(callbacks=[DeltaM(baselines())])
    with_delta.validate(module(), loader(), verbose=False)
    expected = {k: float(v) for k, v in plain.callback_metrics.items()}
    got = {k: float(v) for k, v in with_delta.callback_metrics.items() if k != "val/delta_m"}
    assert got == expected


def test_model_checkpoint_selects_the_epoch_with_the_highest_delta_m(tmp_path):
    logger = RecordingLogger()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/delta_m", mode="max", filename="{epoch}", save_top_k=1)
    stopping = EarlyStopping(monitor="val/delta_m", mode="max", patience=10)
    # DeltaM last in the list: the key is logged in on_validation_epoch_end, before any callback's on_validation_end
    trainer = quiet_trainer(
        callbacks=[stopping, checkpoint, DeltaM(baselines())], logger=logger, enable_checkpointing=True, max_epochs=4,
        num_sanity_val_steps=0,
    )
    trainer.fit(module(), loader(128, seed=0), loader())
    epochs = [metrics for _, metrics in logger.history if "val/delta_m" in metrics]
    assert len(epochs) == 4
    values = [metrics["val/delta_m"] for metrics in epochs]
    for metrics in epochs:
        assert metrics["val/delta_m"] == pytest.approx(by_hand(metrics, "val"), rel=1e-5)
    best = max(range(4), key=lambda i: values[i])
    assert float(checkpoint.best_model_score) == pytest.approx(values[best])
    assert Path(checkpoint.best_model_path).name == f"epoch={best}.ckpt"
    assert float(stopping.best_score) == pytest.approx(values[best])
    assert len(set(values)) == 4


def test_fit_then_test_print_the_table(capsys):
    callback = DeltaM(baselines(), digits=5)
    trainer = quiet_trainer(callbacks=[callback], max_epochs=1)
    model = module()
    trainer.fit(model, loader(64, seed=0), loader())
    out = capsys.readouterr().out
    logged = trainer.callback_metrics
    value = float(logged["val/delta_m"])
    assert f"Δm against single-task baselines (val, last validation epoch): {value:+.2f} %" in out
    lines = out.splitlines()
    assert lines[lines.index(next(l for l in lines if l.startswith("Δm against"))) + 1].split() == [
        "task", "metric", "better", "baseline", "multi-task", "change", "gain"
    ]
    for task, metric, better in [("cls", "acc", "higher"), ("cls", "f1", "higher"), ("reg", "mae", "lower"), ("reg", "mse", "lower")]:
        b, m = BASE[task][metric], float(logged[f"val/{task}/{metric}"])
        change = (m - b) / b * 100
        gain = change if better == "higher" else -change
        line = next(line for line in lines if line.split()[:2] == [task, metric])
        assert line.split() == [task, metric, better, f"{b:#.5g}", f"{m:#.5g}", f"{change:+.2f}", "%", f"{gain:+.2f}", "%"]
    assert f"Δm = {value:+.2f} % (mean over tasks of each task's mean gain" in out
    rows = callback.rows("val")
    assert [(row.task, row.metric, row.direction) for row in rows] == [
        ("cls", "acc", "max"), ("cls", "f1", "max"), ("reg", "mae", "min"), ("reg", "mse", "min")
    ]
    assert [row.value for row in rows] == pytest.approx([float(logged[f"val/{r.task}/{r.metric}"]) for r in rows])
    trainer.test(model, loader(seed=2), verbose=False)
    out = capsys.readouterr().out
    assert f"Δm against single-task baselines (test): {float(trainer.callback_metrics['test/delta_m']):+.2f} %" in out


class TableLogger(RecordingLogger):
    """A logger that can hold a table (as ``WandbLogger.log_table``): keeps ``(key, columns, data)``."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list = []

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None) -> None:
        self.tables.append((key, columns, data))


def test_the_table_goes_to_every_logger_that_can_hold_one_by_default():
    callback = DeltaM(baselines())
    tables, plain = TableLogger(), RecordingLogger()
    trainer = quiet_trainer(callbacks=[callback], logger=[tables, plain], max_epochs=1)
    model = module()
    trainer.fit(model, loader(64, seed=0), loader())
    logged = {key: float(value) for key, value in trainer.callback_metrics.items()}
    trainer.test(model, loader(seed=2), verbose=False)
    logged |= {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("test/")}
    assert [key for key, _, _ in tables.tables] == ["val/delta_m_table", "test/delta_m_table"]
    columns = ["task", "metric", "better", "baseline", "multi-task", "change", "gain"]
    for (key, got_columns, data), split in zip(tables.tables, ("val", "test")):
        assert got_columns == columns
        rows = callback.rows(split)
        assert data[:-1] == [[r.task, r.metric, "higher" if r.direction == "max" else "lower", r.baseline, r.value, r.change, r.gain] for r in rows]
        assert [row[:3] for row in data[:-1]] == [["cls", "acc", "higher"], ["cls", "f1", "higher"], ["reg", "mae", "lower"], ["reg", "mse", "lower"]]
        assert [row[4] for row in data[:-1]] == pytest.approx([logged[f"{split}/{r[0]}/{r[1]}"] for r in data[:-1]])
        assert data[-1][:3] == ["Δm", "mean over tasks", "higher"] and data[-1][3:6] == [None, None, None]
        assert data[-1][6] == pytest.approx(logged[f"{split}/delta_m"], rel=1e-6)
        assert data[-1][6] == pytest.approx(by_hand(logged, split), rel=1e-5)
    assert delta_m_table(rows, 1.5, "metrics")[1][-1] == ["Δm", "mean over metrics", "higher", None, None, None, 1.5]


def test_log_table_false_logs_none_and_true_needs_a_logger_that_can():
    tables = TableLogger()
    trainer = quiet_trainer(callbacks=[DeltaM(baselines(), log_table=False)], logger=tables)
    trainer.validate(module(), loader(), verbose=False)
    assert tables.tables == [] and "val/delta_m" in tables.keys
    trainer = quiet_trainer(callbacks=[DeltaM(baselines(), log_table=True)], logger=RecordingLogger())
    with pytest.raises(ValueError, match=r"DeltaM\(log_table=True\): no logger of the trainer can log a table \(loggers: \['RecordingLogger'\]\)"):
        trainer.validate(module(), loader(), verbose=False)


def test_a_run_without_evaluation_logs_no_table():
    tables = TableLogger()
    callback = DeltaM(baselines(), log_table=True)
    trainer = quiet_trainer(callbacks=[callback], logger=tables, max_epochs=1)
    trainer.validate(module(), loader(), verbose=False)
    trainer = quiet_trainer(callbacks=[callback], logger=tables, max_epochs=1, limit_val_batches=0)
    trainer.fit(module(), loader(64, seed=0), loader())
    assert [key for key, _, _ in tables.tables] == ["val/delta_m_table"]  # the validate's, not the fit's


def test_include_loss_compares_the_task_losses_too():
    base = {"cls": {"loss": 0.5, "acc": 0.8}, "reg": {"loss": 2.0, "mae": 1.2}}
    trainer = quiet_trainer(callbacks=[DeltaM(baselines(base, base), include_loss=True, partial=True)])
    with pytest.warns(UserWarning, match=r"left out: metrics \['cls/f1', 'reg/mse'\] of the run have no baseline"):
        trainer.validate(module(), loader(), verbose=False)
    logged = trainer.callback_metrics
    expected = by_hand(logged, "val", base, lower=("cls/loss", "reg/loss", "reg/mae"))
    assert float(logged["val/delta_m"]) == pytest.approx(expected, rel=1e-5)


# -- baselines that do not match the run --------------------------------------------------------------------


@pytest.mark.parametrize(
    "base, message",
    [
        ({**BASE, "depth": {"mae": 1.0}}, r"tasks \['depth'\] are in the baselines but not in the run"),
        ({"cls": BASE["cls"]}, r"tasks \['reg'\] of the run have no baseline"),
        ({"cls": {"acc": 0.8}, "reg": BASE["reg"]}, r"metrics \['cls/f1'\] of the run have no baseline"),
        ({"cls": {**BASE["cls"], "auroc": 0.9}, "reg": BASE["reg"]}, r"metrics \['cls/auroc'\] are in the baselines"),
    ],
)
def test_mismatched_baselines_are_an_error_naming_them(base, message):
    trainer = quiet_trainer(callbacks=[DeltaM(baselines(base, base))])
    with pytest.raises(ValueError, match=message) as error:
        trainer.validate(module(), loader(), verbose=False)
    assert "DeltaM(partial=True)" in str(error.value)


def test_partial_compares_the_shared_pairs_with_a_warning():
    base = {"cls": {"acc": 0.8}, "depth": {"mae": 1.0}}
    trainer = quiet_trainer(callbacks=[DeltaM(baselines(base, base), partial=True)])
    with pytest.warns(UserWarning, match=r"compares 1 task-metric pairs; left out: tasks \['depth'\] are in the baselines") as record:
        trainer.validate(module(), loader(), verbose=False)
    message = str(next(w.message for w in record if "left out" in str(w.message)))
    assert "tasks ['reg'] of the run have no baseline" in message and "metrics ['cls/f1'] of the run" in message
    acc = float(trainer.callback_metrics["val/cls/acc"])
    assert float(trainer.callback_metrics["val/delta_m"]) == pytest.approx((acc - 0.8) / 0.8 * 100, rel=1e-5)


def test_nothing_in_common_is_an_error_even_when_partial():
    base = {"depth": {"mae": 1.0}}
    trainer = quiet_trainer(callbacks=[DeltaM(baselines(base, base), partial=True)])
    with pytest.raises(ValueError, match="no task metric in common"):
        trainer.validate(module(), loader(), verbose=False)


def test_a_task_without_metrics_is_named():
    trainer = quiet_trainer(callbacks=[DeltaM(baselines({"cls": BASE["cls"], "reg": {"loss": 1.0}}, None))])
    with pytest.raises(ValueError, match=r"tasks \['reg'\] of the run have no metric .*include_loss=True"):
        trainer.validate(module(reg_metrics={}), loader(), verbose=False)


def test_zero_baseline_is_an_error_naming_task_and_metric():
    base = {"cls": BASE["cls"], "reg": {"mae": 0.0, "mse": 2.0}}
    trainer = quiet_trainer(callbacks=[DeltaM(baselines(base, base))])
    with pytest.raises(ValueError, match=r"the val baseline of reg/mae \(baselines\) is 0"):
        trainer.validate(module(), loader(), verbose=False)


def test_missing_split_in_the_baselines_is_an_error():
    trainer = quiet_trainer(callbacks=[DeltaM(baselines(val=None))])
    with pytest.raises(ValueError, match=r"hold no 'val' metrics \(only \['test'\]\)"):
        trainer.validate(module(), loader(), verbose=False)


def test_a_task_without_labels_in_the_epoch_gives_nan_or_is_left_out_when_partial():
    unlabelled = loader(missing_reg=range(48))
    trainer = quiet_trainer(callbacks=[DeltaM(baselines())])
    with pytest.warns(UserWarning, match=r"no labelled sample of task\(s\) \['reg'\] in this val epoch: val/delta_m is NaN"):
        trainer.validate(module(), unlabelled, verbose=False)
    assert math.isnan(float(trainer.callback_metrics["val/delta_m"]))
    trainer = quiet_trainer(callbacks=[DeltaM(baselines(), partial=True)])
    with pytest.warns(UserWarning, match="Δm leaves them out"):
        trainer.validate(module(), unlabelled, verbose=False)
    logged = trainer.callback_metrics
    assert float(logged["val/delta_m"]) == pytest.approx(by_hand(logged, "val", {"cls": BASE["cls"]}), rel=1e-5)



@pytest.mark.parametrize("partial", [False, True])
def test_a_diverged_task_makes_delta_m_not_finite_and_is_never_left_out(partial):
    # 'reg' is labelled but its head diverged (MSE overflows to inf): not a task without labels to leave out
    model = module()
    with torch.no_grad():
        model.tasks["reg"].head[0].weight.fill_(1e30)
    trainer = quiet_trainer(callbacks=[DeltaM(baselines(), partial=partial)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(model, loader(), verbose=False)
    messages = [str(w.message) for w in caught if "DeltaM" in str(w.message)]
    assert float(trainer.callback_metrics["val/delta_m"]) == -math.inf
    assert not any("no labelled sample" in message for message in messages)
    assert any("['reg/mse'] are not finite" in message for message in messages)


def test_the_sanity_check_does_not_warn_about_tasks_its_few_batches_miss():
    # the sanity check runs 1 batch (16 samples) of a loader whose first 16 samples have no label of 'reg': no warning
    trainer = quiet_trainer(callbacks=[DeltaM(baselines())], max_epochs=1, num_sanity_val_steps=1, limit_train_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module(), loader(64, seed=0), loader(64, missing_reg=range(16)))
    sanity = [w for w in caught if "no labelled sample" in str(w.message)]
    # the full val epoch (after the training batch) has 'reg' labels after sample 16: no warning either
    assert sanity == []
    assert math.isfinite(float(trainer.callback_metrics["val/delta_m"]))

# -- directions ---------------------------------------------------------------------------------------------


def pearson_module():
    return module(reg_metrics={"mae": MeanAbsoluteError(), "pearson": PearsonCorrCoef()})


PEARSON = {"cls": BASE["cls"], "reg": {"mae": 1.2, "pearson": 0.5}}


def test_a_metric_without_direction_is_an_error_with_the_override():
    trainer = quiet_trainer(callbacks=[DeltaM(baselines(PEARSON, PEARSON))])
    with pytest.raises(ValueError, match=r"'pearson' \(PearsonCorrCoef\) declares no direction.*directions=\{'reg/pearson': 'max'\}"):
        trainer.validate(pearson_module(), loader(), verbose=False)


@pytest.mark.parametrize("where", ["override", "file"])
def test_direction_from_the_override_or_the_baseline_file(where):
    override = {"reg/pearson": "max"}
    callback = DeltaM(baselines(PEARSON, PEARSON, override if where == "file" else None),
                      directions=override if where == "override" else None)
    trainer = quiet_trainer(callbacks=[callback])
    trainer.validate(pearson_module(), loader(), verbose=False)
    logged = trainer.callback_metrics
    assert float(logged["val/delta_m"]) == pytest.approx(by_hand(logged, "val", PEARSON, lower=("reg/mae",)), rel=1e-5)


def test_the_override_wins_over_the_metric_class():
    trainer = quiet_trainer(callbacks=[DeltaM(baselines(), directions={"reg/mse": "max"})])
    trainer.validate(module(), loader(), verbose=False)
    logged = trainer.callback_metrics
    assert float(logged["val/delta_m"]) == pytest.approx(by_hand(logged, "val", lower=("reg/mae",)), rel=1e-5)


def test_a_file_direction_contradicting_the_metric_class_is_an_error():
    trainer = quiet_trainer(callbacks=[DeltaM(baselines(directions={"reg/mae": "max"}))])
    with pytest.raises(ValueError, match=r"say 'reg/mae' is best at 'max', but MeanAbsoluteError.higher_is_better says 'min'"):
        trainer.validate(module(), loader(), verbose=False)


def test_an_override_for_a_metric_the_run_lacks_is_an_error():
    trainer = quiet_trainer(callbacks=[DeltaM(baselines(), directions={"reg/rmse": "min"})])
    with pytest.raises(ValueError, match=r"directions names \['reg/rmse'\], which the run does not log"):
        trainer.validate(module(), loader(), verbose=False)


# -- other misuse -------------------------------------------------------------------------------------------


def test_a_metric_that_is_not_one_number_is_an_error():
    model = module(reg_metrics={"mae": MeanAbsoluteError()})
    model.val_metrics["cls"]["acc"] = MulticlassAccuracy(2, average=None)  # one value per class
    trainer = quiet_trainer(callbacks=[DeltaM(baselines({"cls": {"acc": 0.8}, "reg": {"mae": 1.0}}, None), partial=True)])
    with pytest.raises(ValueError, match=r"val/cls/acc is not one number \(\(2,\)\)"):
        trainer.validate(model, loader(), verbose=False)


def test_several_dataloaders_are_refused():
    trainer = quiet_trainer(callbacks=[DeltaM(baselines())])
    with pytest.raises(ValueError, match="the run has 2 val dataloaders"):
        trainer.validate(module(), [loader(), loader(seed=3)], verbose=False)


def test_a_model_without_task_registry_is_refused():
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(6, 1)

        def validation_step(self, batch, batch_idx):
            pass

    with pytest.raises(ValueError, match="use it with a MultiTaskModule"):
        quiet_trainer(callbacks=[DeltaM(baselines())]).validate(Plain(), loader(), verbose=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"directions": {"mae": "min"}}, "must read 'task/metric'"),
        ({"directions": {"reg/mae": "lower"}}, "must be 'max' .* or 'min'"),
        ({"average": "pairs"}, "average must be 'tasks' or 'metrics'"),
        ({"digits": 0}, "digits must be a positive int"),
        ({"log_table": "yes"}, "log_table must be None"),
    ],
)
def test_constructor_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeltaM("baselines.json", **kwargs)
    with pytest.raises(TypeError, match="baselines must be a file path or Baselines"):
        DeltaM({"val": {}})


def test_configurable_from_yaml_as_a_trainer_callback(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callback", type=pl.Callback)
    config = parser.parse_object({"callback": {
        "class_path": "lightning_mtl.callbacks.DeltaM",
        "init_args": {"baselines": str(tmp_path / "b.json"), "directions": {"reg/pearson": "max"}, "average": "metrics"},
    }})
    callback = parser.instantiate_classes(config).callback
    assert isinstance(callback, DeltaM)  # the file is read at set-up, so it need not exist yet
    assert callback.directions == {"reg/pearson": "max"} and callback.average == "metrics"


# -- the baseline file --------------------------------------------------------------------------------------


def test_baselines_written_from_single_task_runs_are_read_by_delta_m(tmp_path):
    """What the `baselines` command does: one single-task run per task, its logged metrics merged, one file."""
    full = module()
    metrics = {"val": {}, "test": {}}
    for name in full.task_names:
        single = MultiTaskModule(full.backbone, [full.tasks[name]])  # the same weights as module(): Δm = 0
        trainer = quiet_trainer()
        trainer.validate(single, single_task_loader(name), verbose=False)
        metrics["val"].update(logged_task_metrics(trainer.callback_metrics, [name], "val"))
        trainer.test(single, single_task_loader(name, seed=2), verbose=False)
        metrics["test"].update(logged_task_metrics(trainer.callback_metrics, [name], "test"))
    path = write_baselines(tmp_path / "runs" / "baselines.json", metrics, task_directions(full.tasks), {"seed": 0})
    document = json.loads(path.read_text())
    assert document["format"] == 1 and document["config"] == {"seed": 0}
    assert set(document["metrics"]["val"]["cls"]) == {"loss", "acc", "f1"}
    assert document["directions"] == {
        "cls/loss": "min", "cls/acc": "max", "cls/f1": "max", "reg/loss": "min", "reg/mae": "min", "reg/mse": "min"
    }
    read = read_baselines(path)
    assert read.metrics == metrics and read.source == str(path)
    trainer = quiet_trainer(callbacks=[DeltaM(str(path))])
    model = module()
    trainer.validate(model, loader(), verbose=False)
    assert float(trainer.callback_metrics["val/delta_m"]) == pytest.approx(0.0, abs=1e-4)
    trainer.test(model, loader(seed=2), verbose=False)
    assert float(trainer.callback_metrics["test/delta_m"]) == pytest.approx(0.0, abs=1e-4)


def test_logged_task_metrics_refuses_several_dataloaders():
    with pytest.raises(ValueError, match="several val dataloaders"):
        logged_task_metrics({"val/a/acc/dataloader_idx_0": 1.0}, ["a"], "val")
    assert logged_task_metrics({"val/a/acc": 1.0, "val/b/acc": 2.0, "val/loss": 3.0, "test/a/acc": 4.0}, ["a"], "val") == {
        "a": {"acc": 1.0}
    }


@pytest.mark.parametrize(
    "metrics, directions, message",
    [
        ({"train": {"a": {"acc": 1.0}}}, None, "unknown split 'train'"),
        ({"val": {"a": {"acc": float("nan")}}}, None, "val/a/acc must be a finite number"),
        ({"val": {"a/b": {"acc": 1.0}}}, None, "contains '/'"),
        ({"val": {"a": {}}}, None, r"metrics\['val'\]\['a'\] must be a non-empty object"),
        ({"val": {"a": {"acc": 1.0}}}, {"a/acc": "up"}, "must be 'max' or 'min'"),
        ({}, None, "'metrics' must be a non-empty object"),
    ],
)
def test_write_checks_its_input(tmp_path, metrics, directions, message):
    with pytest.raises(ValueError, match=message):
        write_baselines(tmp_path / "b.json", metrics, directions)
    assert not (tmp_path / "b.json").exists()


def test_read_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="lightning-mtl baselines"):
        read_baselines(tmp_path / "none.json")
    path = tmp_path / "b.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_baselines(path)
    path.write_text(json.dumps({"format": 2, "metrics": {}}))
    with pytest.raises(ValueError, match="unknown format 2"):
        read_baselines(path)
    path.write_text(json.dumps({"format": 1, "metrics": {"val": {"a": {"acc": 1}}}, "extra": 1}))
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        read_baselines(path)
    with pytest.raises(FileNotFoundError, match="none.json"):
        quiet_trainer(callbacks=[DeltaM(tmp_path / "none.json")]).validate(module(), loader(), verbose=False)


# -- DDP ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_delta_m_is_identical_on_every_rank_and_from_the_synchronised_metrics(tmp_path):
    returncode, output = run_script(Path(__file__).with_name("_ddp_delta_m_fit.py"), tmp_path)
    assert returncode == 0, output[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(rank0["epochs"]) == 2
    assert rank0["epochs"] == rank1["epochs"]  # every logged value, Δm included, bit for bit
    assert rank0["best"] == rank1["best"]
    for logged in rank0["epochs"]:
        assert logged["val/delta_m"] == pytest.approx(by_hand(logged, "val"), rel=1e-5)
    # the ranks saw different halves of the data, so a rank-local Δm would have differed
    assert rank0["local"] != rank1["local"]
    assert rank0["best"] == pytest.approx(max(logged["val/delta_m"] for logged in rank0["epochs"]))


def test_no_warning_on_a_matching_run():
    trainer = quiet_trainer(callbacks=[DeltaM(baselines())])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="DeltaM.*")
        trainer.validate(module(), loader(), verbose=False)
