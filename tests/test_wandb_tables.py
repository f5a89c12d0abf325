"""W&B Tables: DeltaM's Δm table and the leaderboard of ``lightning-mtl compare``, read back from offline runs."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from callbacks.test_delta_m import BASE, baselines, by_hand, loader, module
from conftest import quiet_trainer
from lightning_mtl.baselines import write_baselines
from lightning_mtl.callbacks import DeltaM
from lightning_mtl.commands import CommandError, compare_balancers, leaderboard_table, main
from lightning_mtl.run_config import WANDB_INSTALL_HINT
from test_cli_baselines import CONFIG, reduced
from test_wandb import read_run

DELTA_M_COLUMNS = ["task", "metric", "better", "baseline", "multi-task", "change", "gain"]


def logged_table(recorded, key: str) -> dict:
    """The ``{"columns", "data"}`` of the table logged under ``key`` (a file of the run, named by its history row)."""
    (row,) = [row for row in recorded.history if key in row]
    assert row[key]["_type"] == "table-file"
    return json.loads((recorded.folder / "files" / row[key]["path"]).read_text())


def run_record(folder: Path):
    """The ``run`` record of an offline run's ``.wandb`` file (its project, job type, ...)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = folder.glob("run-*.wandb")
    data, position, pending = path.read_bytes(), 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind in (2, 3):
            pending += chunk
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending + chunk)
        pending = b""
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise AssertionError(f"{path}: no run record")


# ---------------------------------------------------------------------------------------- DeltaM


def test_delta_m_table_is_in_the_offline_wandb_run_with_the_printed_rows(offline, capsys):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    callback = DeltaM(baselines())  # log_table=None: on, since a WandbLogger can hold a table
    logger = WandbLogger(offline=True, save_dir=str(offline / "logs"), project="delta")
    trainer = quiet_trainer(callbacks=[callback], logger=logger, max_epochs=1)
    model = module()
    trainer.fit(model, loader(64, seed=0), loader())
    logged = {key: float(value) for key, value in trainer.callback_metrics.items()}
    trainer.test(model, loader(seed=2), verbose=False)
    logged |= {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("test/")}
    printed = capsys.readouterr().out.splitlines()
    folder = Path(logger.experiment.dir).parent
    wandb.finish()
    recorded = read_run(folder)
    for split in ("val", "test"):
        table = logged_table(recorded, f"{split}/delta_m_table")
        assert table["columns"] == DELTA_M_COLUMNS
        *rows, last = table["data"]
        title = next(i for i, line in enumerate(printed) if line.startswith(f"Δm against single-task baselines ({split}"))
        assert f"{last[6]:+.2f} %" in printed[title] and printed[title + 1].split() == DELTA_M_COLUMNS
        assert [row[:3] for row in rows] == [["cls", "acc", "higher"], ["cls", "f1", "higher"], ["reg", "mae", "lower"], ["reg", "mse", "lower"]]
        for task, metric, better, baseline, value, change, gain in rows:
            assert baseline == BASE[task][metric]
            assert value == pytest.approx(logged[f"{split}/{task}/{metric}"], rel=1e-6)
            assert change == pytest.approx((value - baseline) / baseline * 100, rel=1e-9)
            assert gain == pytest.approx(change if better == "higher" else -change, rel=1e-9)
        # the rows printed at the end of the run, with the digits they show
        for row, line in zip(rows, printed[title + 3 : title + 3 + len(rows)]):
            task, metric, better, baseline, value, change, gain = row
            assert line.split() == [task, metric, better, f"{baseline:#.4g}", f"{value:#.4g}", f"{change:+.2f}", "%", f"{gain:+.2f}", "%"]
        assert last[:6] == ["Δm", "mean over tasks", "higher", None, None, None]
        assert last[6] == pytest.approx(by_hand(logged, split), rel=1e-5)
        assert last[6] == pytest.approx(logged[f"{split}/delta_m"], rel=1e-6)


# ---------------------------------------------------------------------------------------- lightning-mtl compare


def test_the_leaderboard_table_has_a_mean_and_a_std_column_per_metric():
    board = {
        "reference": "static",
        "rows": {
            "static": {"metrics": {"test/a/acc": {"mean": 0.5, "std": 0.1, "n": 2}, "test/delta_m": {"mean": 0.0, "std": 1.0, "n": 2}},
                       "median_step_seconds": 0.02, "step_time_ratio": 1.0},
            "uw": {"metrics": {"test/a/acc": {"mean": 0.6, "std": 0.2, "n": 2}}, "median_step_seconds": 0.03, "step_time_ratio": 1.5},
        },
    }  # fmt: skip
    columns, data = leaderboard_table(board)
    assert columns == ["balancer", "delta_m mean", "delta_m std", "a/acc mean", "a/acc std", "step time (× static)"]
    assert data == [["static", 0.0, 1.0, 0.5, 0.1, 1.0], ["uw", None, None, 0.6, 0.2, 1.5]]


@pytest.mark.slow
def test_compare_logs_the_leaderboard_as_a_wandb_table_and_each_fit_its_own_run(offline):
    file = offline / "baselines.json"
    base = {"left": {"accuracy": 0.5}, "right": {"accuracy": 0.5}, "sum": {"mae": 3.0}}
    write_baselines(file, {"val": base, "test": base})
    fits_logger = {"class_path": "lightning.pytorch.loggers.WandbLogger",
                   "init_args": {"offline": True, "project": "fits", "save_dir": str(offline / "fits")}}  # fmt: skip
    args = [*reduced(offline), "--trainer.limit_train_batches", "2", "--trainer.logger", json.dumps(fits_logger),
            "--trainer.callbacks+=lightning_mtl.callbacks.DeltaM", f"--trainer.callbacks.baselines={file}"]  # fmt: skip
    main(["compare", *args, "--balancers", "static,uw", "--seeds", "2", "--output", str(offline / "board"),
          "--wandb_project", "board", "--wandb_dir", str(offline / "wb")])  # fmt: skip
    board = json.loads((offline / "board" / "leaderboard.json").read_text())
    (folder,) = (offline / "wb" / "wandb").glob("offline-run-*")
    recorded = read_run(folder)
    record = run_record(folder)
    assert (record.project, record.job_type) == ("board", "leaderboard")
    assert {key: value for key, value in recorded.config.items() if key != "_wandb"} == {"balancers": ["static", "uw"], "seeds": [0, 1], "config": [str(CONFIG)]}
    table = logged_table(recorded, "leaderboard")
    metrics = ["delta_m", "left/accuracy", "left/loss", "right/accuracy", "right/loss", "sum/loss", "sum/mae"]
    assert table["columns"] == ["balancer", *(f"{m} {part}" for m in metrics for part in ("mean", "std")), "step time (× static)"]
    assert [row[0] for row in table["data"]] == ["static", "uw"]
    markdown = (offline / "board" / "leaderboard.md").read_text().splitlines()
    assert markdown[0] == "| balancer | " + " | ".join(metrics) + " | step time (× static) |"
    for row, line in zip(table["data"], markdown[2:]):
        entry = board["rows"][row[0]]
        for index, metric in enumerate(metrics):
            value = entry["metrics"][f"test/{metric}"]
            assert row[1 + 2 * index : 3 + 2 * index] == pytest.approx([value["mean"], value["std"]], rel=1e-9)
        assert row[-1] == pytest.approx(entry["step_time_ratio"], nan_ok=True)  # NaN: 2 steps, all warm-up
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells == [row[0], *(f"{row[1 + 2 * i]:.4g} ± {row[2 + 2 * i]:.2g}" for i in range(len(metrics))), f"{row[-1]:.2f}"]
    assert any(row[2] > 0 for row in table["data"])  # two seeds: a real spread
    # each fit's WandbLogger got a run of its own (an active run would have been reused by the next fit)
    assert len(list((offline / "fits" / "wandb").glob("offline-run-*"))) == 4


@pytest.mark.slow  # a fresh interpreter importing Lightning: 10-30 s on a busy machine
def test_compare_without_wandb_fails_with_the_install_hint_before_any_run(tmp_path):
    script = (
        "import sys; sys.modules['wandb'] = None\n"
        "from lightning_mtl.commands import main\n"
        "main(sys.argv[1:])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "compare", "--config", str(CONFIG), "--balancers", "static",
         "--trainer.default_root_dir", str(tmp_path / "runs"), "--wandb_project", "board"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "offline"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        "lightning-mtl compare --wandb_project needs Weights & Biases (wandb), which is not installed: "
        f"{WANDB_INSTALL_HINT}" in result.stderr
    )
    assert "Traceback" not in result.stderr and "[1/" not in result.stdout and not (tmp_path / "runs").exists()


def test_compare_wandb_dir_without_a_project_is_refused():
    with pytest.raises(CommandError, match="--wandb_dir is the folder of the W&B run that --wandb_project makes"):
        compare_balancers(["--config", str(CONFIG)], ["static"], [0], wandb_dir="wb")
