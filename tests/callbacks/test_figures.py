"""`log_figure`: pictures through the trainer's loggers (W&B, TensorBoard), else PNG + JSON files in the log dir."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.image import imread
from torch.utils.data import DataLoader

from conftest import RecordingLogger, quiet_trainer
from lightning_mtl.callbacks import GradientConflict, TaskAffinity, TaskWeights
from lightning_mtl.callbacks.figures import INSTALL_HINT, heatmap, line_chart, log_figure, require_matplotlib, run_dir
from test_module import SharedInput, make_module, make_tasks
from test_wandb import read_run


def fake_trainer(loggers=(), root=".", zero=True):
    return SimpleNamespace(is_global_zero=zero, loggers=list(loggers), default_root_dir=str(root))


def a_heatmap():
    return heatmap([[1.0, -0.5], [-0.5, float("nan")]], ["a", "b"], "cosine")


def test_heatmap_annotates_every_finite_cell_and_is_symmetric_around_zero_by_default():
    figure = heatmap([[0.2, -0.1], [0.05, float("nan")]], ["a", "b"], "t")
    axes = figure.axes[0]
    assert sorted(text.get_text() for text in axes.texts) == ["-0.1", "0.05", "0.2"]  # the NaN cell is blank
    assert axes.images[0].get_clim() == (-0.2, 0.2)
    assert [label.get_text() for label in axes.get_xticklabels()] == ["a", "b"]


def test_line_chart_draws_one_line_per_series():
    figure = line_chart([0, 10, 20], {"a": [1, 2, 3], "b": [3, 2, 1]}, "weights", "step", "weight")
    lines = figure.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["a", "b"]
    assert lines[1].get_ydata().tolist() == [3, 2, 1]


def test_without_a_logger_png_and_json_go_to_the_root_dir(tmp_path):
    written = log_figure(fake_trainer(root=tmp_path), "train/gradients/cosine", a_heatmap(), step=7, data={"x": [1.0, float("nan")]})
    png = tmp_path / "figures" / "train" / "gradients" / "cosine" / "step_000007.png"
    assert written == [png, png.with_suffix(".json")]
    image = imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert json.loads(png.with_suffix(".json").read_text()) == {"x": [1.0, None], "key": "train/gradients/cosine", "step": 7}


def test_a_csv_logger_gets_the_files_in_its_log_dir(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    written = log_figure(fake_trainer([logger], root=tmp_path / "elsewhere"), "train/w", a_heatmap(), step=0)
    assert written == [Path(logger.log_dir) / "figures" / "train" / "w" / "step_000000.png"]
    assert written[0].is_file() and not (tmp_path / "elsewhere").exists()


def test_other_ranks_draw_nothing(tmp_path):
    assert log_figure(fake_trainer(root=tmp_path, zero=False), "train/w", a_heatmap(), step=0) == []
    assert not any(tmp_path.iterdir())


def test_keys_cannot_leave_the_figures_dir(tmp_path):
    (written,) = log_figure(fake_trainer(root=tmp_path), "../../a b/c", a_heatmap(), step=1)
    assert written == tmp_path / "figures" / "a_b" / "c" / "step_000001.png"


class FakeWriter:
    def __init__(self):
        self.images = []

    def add_image(self, tag, image, global_step=None, dataformats="CHW"):
        self.images.append((tag, image, global_step, dataformats))


def test_tensorboard_gets_the_rendered_figure_and_no_files(tmp_path, monkeypatch):
    import lightning.fabric.loggers.tensorboard as fabric_tensorboard

    monkeypatch.setattr(fabric_tensorboard, "_TENSORBOARD_AVAILABLE", True)  # tensorboard itself is not installed
    logger = TensorBoardLogger(tmp_path)
    logger._experiment = writer = FakeWriter()
    assert log_figure(fake_trainer([logger], root=tmp_path), "train/w", a_heatmap(), step=3, data={"x": 1}) == []
    ((tag, image, step, dataformats),) = writer.images
    assert (tag, step, dataformats) == ("train/w", 3, "HWC")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.std() > 0
    assert not list(tmp_path.rglob("*.png"))


def test_missing_matplotlib_fails_when_the_callback_is_built_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for build in (GradientConflict, TaskWeights, TaskAffinity, require_matplotlib):
        with pytest.raises(ImportError, match=r"pip install lightning-mtl\[plots\]"):
            build()
    assert INSTALL_HINT == "pip install lightning-mtl[plots]"
    GradientConflict(heatmap=False), TaskAffinity(heatmap=False)  # scalars and JSON need no matplotlib


@pytest.mark.slow
def test_an_offline_wandb_run_holds_the_images_tables_and_scalars(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="diagnostics")
    callbacks = [GradientConflict(every_n_steps=2), TaskWeights(every_n_steps=1), TaskAffinity(every_n_steps=3)]
    try:
        trainer = quiet_trainer(max_epochs=1, callbacks=callbacks, logger=logger, log_every_n_steps=1)
        trainer.fit(make_module(tasks=make_tasks(metrics=False), balancer="uw"), DataLoader(SharedInput(64), batch_size=16))
        files = Path(logger.experiment.dir)
        assert run_dir(trainer) == files
    finally:
        wandb.finish()
    run = files.parent
    rows = read_run(run).history  # once W&B has written every record (its exit record)
    images = {row["trainer/global_step"]: row for row in rows if "train/gradients/cosine" in row}
    assert list(images) == [4]  # the epoch's end: 4 steps
    (image_file,) = images[4]["train/gradients/cosine"]["filenames"]
    assert (files / image_file).is_file() and imread(files / image_file).shape[0] > 100
    for key in ("train/task_weights", "train/task_affinity"):
        row = next(row for row in rows if key in row)
        assert (files / row[key]["filenames"][0]).is_file()
        assert row[f"{key}_table"]["_type"] == "table-file" and (files / row[f"{key}_table"]["path"]).is_file()
    table = json.loads((files / next(row for row in rows if "train/task_weights_table" in row)["train/task_weights_table"]["path"]).read_text())
    assert table["columns"] == ["step", "cls", "reg"] and [row[0] for row in table["data"]] == [0, 1, 2, 3]
    sampled = [row["trainer/global_step"] for row in rows if "train/gradients/mean_cosine" in row]
    assert sampled == [0, 2]
    assert all("train/cls/grad_norm" in row and "train/reg/grad_norm" in row for row in rows if "train/gradients/mean_cosine" in row)
    assert json.loads((files / "task_affinity.json").read_text())["samples"] == 2  # steps 0 and 3
    assert not list(tmp_path.rglob("figures"))  # W&B shows the pictures: no PNG files beside the run


def test_recording_logger_without_a_save_dir_gets_files_in_the_root_dir(tmp_path):
    logger = RecordingLogger()
    (written,) = log_figure(fake_trainer([logger], root=tmp_path), "train/w", a_heatmap(), step=2)
    assert written == tmp_path / "figures" / "train" / "w" / "step_000002.png"
