"""W&B (offline), TensorBoard and CSV hold what ran: the model's description, the CLI's config, every per-task key.

Offline W&B runs write no ``wandb-summary.json`` and no run ``config.yaml``: the config, history and file records
are read from the run's ``.wandb`` file (LevelDB-log framing, 32 KiB blocks, ``wandb_internal_pb2.Record``s).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest.mock import MagicMock

import pytest
import torch
import yaml
from lightning.fabric.utilities.logger import _flatten_dict
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from conftest import RecordingLogger, quiet_trainer
from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.callbacks.model_summary import parameter_rows
from lightning_mtl.cli import run
from lightning_mtl.run_config import WANDB_INSTALL_HINT, describe, describe_callable, describe_object
from test_cli import CONFIG, short
from test_module import SharedInput, make_module, make_tasks

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "examples" / "configs" / "wandb_sweep.yaml"
EXAMPLE = ROOT / "examples" / "wandb_trainer.py"


# ---------------------------------------------------------------------------------------- reading an offline run


@dataclass
class OfflineRun:
    """What an offline run's ``.wandb`` file holds: the run config (as ``wandb.init`` set it, then updated), the
    history rows, the files saved."""

    folder: Path
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    files: list = field(default_factory=list)

    @property
    def keys(self) -> set:
        return {key for row in self.history for key in row}


def read_run(folder: Path, timeout: float = 60.0) -> OfflineRun:
    """The records of the run in ``folder``, once W&B has written them all (its ``exit`` record).

    ``wandb.finish()`` can return before W&B's service process has flushed the file: it is read again until the
    ``exit`` record is there.
    """
    deadline = time.monotonic() + timeout
    while True:
        result, finished = _read_records(folder)
        if finished:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{folder}: the run's .wandb file has no exit record after {timeout} s")
        time.sleep(0.2)


def _read_records(folder: Path) -> tuple[OfflineRun, bool]:
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    (path,) = folder.glob("run-*.wandb")
    data, position, pending, result, finished = path.read_bytes(), 7, b"", OfflineRun(folder), False
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a record header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (2, 3):  # the first or a middle part of a record
            pending += chunk
            continue
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(pending + chunk)
        except DecodeError:  # the file's last record, still being written by W&B's service: read again later
            return result, False
        pending = b""
        kind_of_record = record.WhichOneof("record_type")
        finished = finished or kind_of_record == "exit"
        if kind_of_record in ("run", "config"):  # the config the run started with, then its updates
            for item in (record.run.config if kind_of_record == "run" else record.config).update:
                result.config[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
        elif kind_of_record == "files":
            result.files += [file.path for file in record.files.files]
        elif kind_of_record == "history":
            row: dict = {}
            for item in record.history.item:
                *parents, leaf = [item.key] if item.key else list(item.nested_key)
                target = row
                for parent in parents:
                    target = target.setdefault(parent, {})
                target[leaf] = json.loads(item.value_json)
            result.history.append(row)
    return result, finished


def per_task_keys(module: MultiTaskModule, weights: bool = True) -> set:
    """Every per-task key the module logs in a fit with validation, then a test."""
    keys = set()
    for name, task in module.tasks.items():
        keys |= {f"train/{name}/loss", *(f"{stage}/{name}/{metric}" for stage in ("train", "val", "test") for metric in task.metrics)}
        keys |= {f"val/{name}/loss", f"test/{name}/loss"} | ({f"train/{name}/weight"} if weights else set())
    return keys


def expected_parameters(module: MultiTaskModule) -> dict:
    rows = {part: {"trainable": trainable, "total": total} for part, trainable, total in parameter_rows(module)}
    return {
        "shared": rows.pop("shared"),
        "tasks": {name: rows.pop(f"task {name}") for name in module.task_names},
        **rows,
    }


# ---------------------------------------------------------------------------------------- the description


def test_description_names_tasks_balancer_gradients_optimizer_and_parameter_counts():
    tasks = make_tasks()
    tasks[0].loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0]), label_smoothing=0.1)
    module = make_module(tasks=tasks, balancer="dwa", gradients="parameters", nonfinite_loss="skip")
    description = describe(module)
    assert json.loads(json.dumps(description)) == description  # plain data
    cls, reg = description["tasks"]["cls"], description["tasks"]["reg"]
    assert cls["head"] == {"class_path": "torch.nn.Linear", "init_args": {"in_features": 8, "out_features": 2}}
    assert cls["loss"]["class_path"] == "torch.nn.CrossEntropyLoss"
    assert cls["loss"]["init_args"] | {"weight": [1.0, 3.0], "label_smoothing": 0.1} == cls["loss"]["init_args"]
    assert cls["metrics"]["multiclass_accuracy"]["class_path"] == "torchmetrics.classification.MulticlassAccuracy"
    assert {"num_classes": 2, "average": "micro"}.items() <= cls["metrics"]["multiclass_accuracy"]["init_args"].items()
    assert cls["weight"] == 1.0 and reg["weight"] == 1.0
    assert reg["head"]["class_path"] == "torch.nn.Sequential"  # composite: its one-line repr says what it is
    assert reg["head"]["repr"] == "Sequential((0): Linear(in_features=8, out_features=1, bias=True) (1): Flatten(start_dim=0, end_dim=-1))"
    assert reg["metrics"] == {"mse": {"class_path": "torchmetrics.MeanSquaredError", "init_args": {"squared": True, "num_outputs": 1}}}
    assert description["balancer"] == {"name": "dwa", "class_path": "lightning_mtl.balancers.DWA", "init_args": {"temperature": 2.0}}
    assert (description["gradients"], description["nonfinite_loss"]) == ("parameters", "skip")
    assert description["optimizer"] == {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001}}  # the default
    assert description["lr_scheduler"] is None
    assert description["parameters"] == expected_parameters(module)
    assert description["parameters"]["shared"] == {"trainable": 6 * 8 + 8, "total": 6 * 8 + 8}
    assert description["parameters"]["tasks"]["cls"] == {"trainable": 18, "total": 18}


def test_balancer_arguments_kept_inside_a_torchjd_weighting_are_found():
    pytest.importorskip("cvxpy")
    from lightning_mtl.balancers import CAGrad, MGDA

    assert describe(make_module(balancer=CAGrad(c=0.25)))["balancer"]["init_args"] == {"c": 0.25, "norm_eps": 0.0001}
    assert describe(make_module(balancer=MGDA(max_iters=7)))["balancer"]["init_args"] == {"epsilon": 0.001, "max_iters": 7}


def test_factories_are_described_by_their_target_and_arguments():
    sgd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    assert describe_callable(sgd) == {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "momentum": 0.9}}
    assert describe_callable(torch.optim.AdamW) == {"class_path": "torch.optim.AdamW", "init_args": {}}
    step = functools.partial(torch.nn.functional.cross_entropy, ignore_index=255)
    assert describe_callable(step) == {"function": "torch.nn.functional.cross_entropy", "kwargs": {"ignore_index": 255}}
    lr = 0.05
    factory = lambda params: torch.optim.SGD(params, lr=lr)  # noqa: E731
    described = describe_callable(factory)
    assert described["function"].endswith("<lambda>") and described["closure"] == {"lr": 0.05}
    assert describe_callable(None) is None
    # nn.Linear keeps `bias` as a tensor, not the bool it was given: left out rather than misreported
    assert describe_object(nn.Linear(3, 4, bias=False)) == {"class_path": "torch.nn.Linear", "init_args": {"in_features": 3, "out_features": 4}}


def test_the_cli_optimizer_and_scheduler_are_described_with_their_init_args(tmp_path):
    cli = run(["fit", *short(tmp_path, "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.3",
                             "--model.lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--model.lr_scheduler.step_size", "4",
                             "--trainer.logger", "false", "--task_table", "false", "--trainer.enable_model_summary", "false",
                             "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0")])  # fmt: skip
    description = describe(cli.model)
    assert description["optimizer"]["class_path"] == "torch.optim.SGD" and description["optimizer"]["init_args"]["lr"] == 0.3
    assert description["lr_scheduler"]["class_path"] == "torch.optim.lr_scheduler.StepLR"
    assert description["lr_scheduler"]["init_args"]["step_size"] == 4


# ---------------------------------------------------------------------------------------- every logger gets it


def fit_and_test(module, logger, tmp_path, **trainer_args):
    trainer = quiet_trainer(logger=logger, log_every_n_steps=1, default_root_dir=str(tmp_path), **trainer_args)
    trainer.fit(module, DataLoader(SharedInput(64), batch_size=16), DataLoader(SharedInput(32, seed=1), batch_size=16))
    trainer.test(module, DataLoader(SharedInput(32, seed=2), batch_size=16))
    return trainer


def test_csv_logger_gets_the_description_in_hparams_yaml_and_the_checkpoint_has_no_hyper_parameters(tmp_path):
    module = make_module(balancer="uw")
    logger = CSVLogger(tmp_path, name="csv")
    trainer = fit_and_test(module, logger, tmp_path, enable_checkpointing=True)
    saved = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert saved["multitask"] == describe(module)
    assert saved["multitask"]["balancer"]["name"] == "uw"
    (checkpoint,) = Path(logger.log_dir, "checkpoints").glob("*.ckpt")
    loaded = torch.load(checkpoint, weights_only=True)
    assert "hyper_parameters" not in loaded and module.hparams == {}
    assert trainer.logged_metrics  # the run really logged


def test_tensorboard_gets_the_description_as_hparams(tmp_path, monkeypatch):
    import lightning.fabric.loggers.tensorboard as fabric_tensorboard

    monkeypatch.setattr(fabric_tensorboard, "_TENSORBOARD_AVAILABLE", True)  # tensorboard itself is not installed
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    logger._experiment = MagicMock()
    Path(logger.log_dir).mkdir(parents=True)
    module = make_module(balancer="uw")
    fit_and_test(module, logger, tmp_path)
    assert logger.hparams["multitask"] == describe(module)
    assert yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())["multitask"] == describe(module)
    # what TensorBoard's hparams plugin is given: flat keys, each value a number, a string or a bool
    flat = logger._sanitize_params(_flatten_dict({"multitask": describe(module)}))
    assert flat["multitask/balancer/name"] == "uw" and flat["multitask/tasks/cls/head/class_path"] == "torch.nn.Linear"
    assert all(isinstance(value, (int, float, str, bool)) for value in flat.values())


class HparamsLogger(RecordingLogger):
    def __init__(self) -> None:
        super().__init__()
        self.hparams: list = []

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self.hparams.append(dict(params))


@pytest.mark.parametrize("autolog", [True, False])
def test_the_description_is_logged_once_per_run_unless_the_trainer_turns_hparams_logging_off(tmp_path, autolog):
    logger = HparamsLogger()
    module = make_module()
    fit_and_test(module, logger, tmp_path, enable_autolog_hparams=autolog)
    assert logger.hparams == ([{"multitask": describe(module)}] * 2 if autolog else [])  # fit, then test


@pytest.mark.slow
def test_python_api_offline_wandb_run_holds_the_description_counts_and_every_per_task_key(offline):
    from lightning.pytorch.loggers import WandbLogger

    module = make_module(balancer="uw", optimizer=functools.partial(torch.optim.SGD, lr=0.05))
    logger = WandbLogger(offline=True, save_dir=str(offline / "logs"), project="api")
    fit_and_test(module, logger, offline)
    folder = Path(logger.experiment.dir).parent
    import wandb

    wandb.finish()
    recorded = read_run(folder)
    description = recorded.config["multitask"]
    assert description == describe(module)
    assert description["balancer"]["class_path"] == "lightning_mtl.balancers.UW"
    assert description["optimizer"] == {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}
    assert set(description["tasks"]) == {"cls", "reg"} and description["gradients"] == "parameters"
    assert description["parameters"] == expected_parameters(module)
    missing = per_task_keys(module) - recorded.keys
    assert not missing, f"per-task keys missing from the W&B run: {sorted(missing)}"


# ---------------------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_cli_offline_wandb_run_holds_the_resolved_config_its_file_the_description_and_images(offline):
    import wandb

    logger = {"class_path": "lightning.pytorch.loggers.WandbLogger",
              "init_args": {"offline": True, "project": "mtl", "save_dir": str(offline / "logs")}}  # fmt: skip
    balancer = "{class_path: lightning_mtl.balancers.DWA, init_args: {temperature: 3.0}}"
    try:
        cli = run(["fit", *short(offline / "root", "--trainer.logger", json.dumps(logger), "--model.balancer", balancer,
                                 "--trainer.log_every_n_steps", "1", "--test_after_fit", "true",
                                 "--trainer.callbacks+=lightning_mtl.callbacks.GradientConflict",
                                 "--trainer.callbacks.every_n_steps=1")])  # fmt: skip
        files = Path(cli.trainer.logger.experiment.dir)
    finally:
        wandb.finish()
    run_folder = Path(cli.trainer.checkpoint_callback.best_model_path).resolve().parents[1]
    recorded = read_run(files.parent)
    config = recorded.config
    # the resolved config, as the run's config.yaml holds it
    saved = yaml.safe_load((run_folder / "config.yaml").read_text())
    for key in ("model", "data", "trainer", "seed_everything", "test_after_fit"):
        assert config[key] == saved[key], key
    assert config["model"]["balancer"] == {"class_path": "lightning_mtl.balancers.DWA", "init_args": {"temperature": 3.0}}
    assert [task["init_args"]["name"] for task in config["model"]["tasks"]] == ["left", "right", "sum"]
    # config.yaml itself is a file of the run
    assert "lightning-mtl/config.yaml" in recorded.files
    assert (files / "lightning-mtl" / "config.yaml").read_bytes() == (run_folder / "config.yaml").read_bytes()
    # the model's description and the parameter counts
    description = config["multitask"]
    assert description == describe(cli.model)
    assert description["balancer"] == {"name": "dwa", "class_path": "lightning_mtl.balancers.DWA", "init_args": {"temperature": 3.0}}
    assert description["tasks"]["sum"]["weight"] == 0.5
    assert description["tasks"]["left"]["metrics"]["accuracy"]["init_args"]["num_classes"] == 10
    assert description["optimizer"]["class_path"] == "torch.optim.Adam" and description["optimizer"]["init_args"]["lr"] == 0.002
    assert description["parameters"] == expected_parameters(cli.model)
    assert config["train_size"] == 256  # the data module's own hyper-parameters, as before
    # every per-task key (train/val from fit, test from --test_after_fit), and the pictures
    missing = per_task_keys(cli.model) - recorded.keys
    assert not missing, f"per-task keys missing from the W&B run: {sorted(missing)}"
    (row,) = [row for row in recorded.history if "train/gradients/cosine" in row]
    assert (files / row["train/gradients/cosine"]["filenames"][0]).is_file()


# ---------------------------------------------------------------------------------------- the sweep


def sweep_command(sweep: dict, values: dict) -> list[str]:
    """The command a W&B agent runs for ``values``, built with wandb's own helpers (as ``wandb agent`` does)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    macros = sweep_utils.create_sweep_command_args({"args": {key: {"value": value} for key, value in values.items()}})
    macros["env"] = []  # `/usr/bin/env`: the program is called directly here
    command: list[str] = []
    for chunk in sweep_utils.create_sweep_command(list(sweep["command"])):
        chunk = str(chunk)
        command += macros[chunk[2:-1]] if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return command


def printed_config(args: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit:
        run([*args, "--print_config"])
    assert exit.value.code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())


@pytest.mark.slow
def test_the_sweep_yaml_is_a_grid_over_balancers_whose_every_value_is_a_valid_cli_option(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.chdir(ROOT)  # the sweep runs from the repository root
    sweep = yaml.safe_load(SWEEP.read_text())
    assert sweep["method"] == "grid" and sweep["metric"]["goal"] in ("minimize", "maximize")
    parameters = sweep["parameters"]
    assert "model.balancer" in parameters and all("values" in spec or "value" in spec for spec in parameters.values())
    balancers = parameters["model.balancer"]["values"]
    assert len({yaml.safe_load(str(value)).get("class_path") for value in balancers if "{" in str(value)}) >= 4
    first = {key: spec["values"][0] if "values" in spec else spec["value"] for key, spec in parameters.items()}
    seen = set()
    for key, spec in parameters.items():
        for value in spec.get("values", [spec.get("value")]):
            command = sweep_command(sweep, {**first, key: value})
            assert command[:5] == ["lightning-mtl", "fit", "--config", "examples/configs/multidigits.yaml", "--trainer.logger=lightning.pytorch.loggers.WandbLogger"]
            config = printed_config(command[1:])
            assert config["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
            node = config
            for part in key.split("."):
                node = node[part]
            expected = yaml.safe_load(str(value))
            if isinstance(expected, dict):  # a class_path config: the given init_args, the rest defaults
                assert node["class_path"] == expected["class_path"]
                assert expected.get("init_args", {}).items() <= node["init_args"].items()
            else:
                assert node == expected
            seen.add((key, json.dumps(expected, sort_keys=True)))
    assert len(seen) == sum(len(spec.get("values", [0])) for spec in parameters.values())


@pytest.mark.slow
def test_a_sweep_run_offline_as_the_agent_starts_it_logs_its_balancer(offline, monkeypatch):
    import wandb

    sweep = yaml.safe_load(SWEEP.read_text())
    values = {"model.balancer": "{class_path: lightning_mtl.balancers.DWA, init_args: {temperature: 4.0}}", "seed_everything": 1}
    command = sweep_command(sweep, values)
    # the agent's environment: the run id and the sweep's parameters as the run config
    params = offline / "sweep-params.yaml"
    params.write_text(yaml.safe_dump({"wandb_version": 1, **{key: {"value": value} for key, value in values.items()}}))
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep1")
    monkeypatch.setenv("WANDB_RUN_ID", "sweeprun1")
    monkeypatch.setenv("WANDB_PROJECT", "lightning-mtl")
    (offline / "cwd" / "examples" / "configs").mkdir(parents=True)
    (offline / "cwd" / "examples" / "configs" / "multidigits.yaml").write_bytes(CONFIG.read_bytes())
    wandb.teardown()  # W&B reads the environment once per set-up: the agent tears down between runs, so do we
    try:
        cli = run([*command[1:], *short(offline / "root")[2:], "--trainer.logger.init_args.offline=true"])
    finally:
        wandb.finish()
        wandb.teardown()  # the next W&B run in this process must not read this run's id
    (folder,) = (offline / "cwd" / "runs" / "multidigits" / "wandb").glob("offline-run-*-sweeprun1")
    config = read_run(folder).config
    assert config["model.balancer"] == values["model.balancer"] and config["seed_everything"] == 1  # the agent's
    assert config["model"]["balancer"]["init_args"] == {"temperature": 4.0}
    assert config["multitask"]["balancer"] == {"name": "dwa", "class_path": "lightning_mtl.balancers.DWA", "init_args": {"temperature": 4.0}}
    assert (offline / "cwd" / "runs" / "multidigits" / "lightning-mtl" / "sweeprun1" / "config.yaml").is_file()
    assert cli.trainer.global_step == 2


# ---------------------------------------------------------------------------------------- the example script


def load_example():
    spec = importlib.util.spec_from_file_location("wandb_trainer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_wandb_trainer_example_runs_offline_with_config_tables_images_and_per_task_keys(offline):
    pytest.importorskip("matplotlib")
    result = load_example().main(["--offline", "--train-size", "256", "--batch-size", "64", "--epochs", "1",
                                  "--log-every", "1", "--balancer", "uw", "--diagnostics",
                                  "--save-dir", str(offline / "runs")])  # fmt: skip
    recorded = read_run(result["run_dir"])
    description = recorded.config["multitask"]
    assert description["balancer"]["name"] == "uw" and list(description["tasks"]) == ["left", "right", "sum"]
    assert description["optimizer"] == {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.002}}
    assert set(description["parameters"]["tasks"]) == {"left", "right", "sum"}
    expected = {f"train/{task}/{key}" for task in ("left", "right", "sum") for key in ("loss", "weight")}
    expected |= {f"{stage}/{task}/loss" for stage in ("val", "test") for task in ("left", "right", "sum")}
    expected |= {f"{stage}/{task}/accuracy" for stage in ("train", "val", "test") for task in ("left", "right")}
    expected |= {f"{stage}/sum/mae" for stage in ("train", "val", "test")}
    assert not expected - recorded.keys, sorted(expected - recorded.keys)
    files = result["run_dir"] / "files"
    for key in ("train/gradients/cosine", "train/task_weights"):
        row = next(row for row in recorded.history if key in row)
        assert (files / row[key]["filenames"][0]).is_file()
    for key in ("val/task_table", "test/task_table"):
        row = next(row for row in recorded.history if key in row)
        table = json.loads((files / row[key]["path"]).read_text())
        assert table["columns"] == ["task", "metric", "value"] and ["sum", "mae"] == table["data"][5][:2]
    assert result["test"]["test/left/accuracy"] >= 0.0


# ---------------------------------------------------------------------------------------- without wandb


_WITHOUT_WANDB = r"""
import importlib, importlib.util, os, pkgutil, sys
sys.modules["wandb"] = None  # `import wandb` fails, as when it is not installed
import lightning_mtl
for info in pkgutil.walk_packages(lightning_mtl.__path__, "lightning_mtl."):
    importlib.import_module(info.name)
from lightning_mtl.run_config import require_wandb
try:
    require_wandb("W&B logging")
except ImportError as error:
    print("REQUIRE:", error)
sys.argv = ["lightning-mtl", "fit", "--config", sys.argv[1], "--trainer.logger", "lightning.pytorch.loggers.WandbLogger"]
from lightning_mtl.cli import main
try:
    main()
except SystemExit as exit:
    print("EXIT:", exit.code)
spec = importlib.util.spec_from_file_location("wandb_trainer", os.environ["EXAMPLE"])
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
try:
    example.main(["--offline"])
except ImportError as error:
    print("EXAMPLE:", error)
"""


@pytest.mark.slow
def test_without_wandb_the_wandb_options_fail_with_the_install_hint_and_nothing_else_needs_it(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_WANDB, str(CONFIG)],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "EXAMPLE": str(EXAMPLE)}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    hint = WANDB_INSTALL_HINT
    assert f"REQUIRE: W&B logging needs Weights & Biases (wandb), which is not installed: {hint}" in result.stdout
    assert "EXIT: 2" in result.stdout
    assert f"--trainer.logger lightning.pytorch.loggers.WandbLogger needs Weights & Biases (wandb), which is not installed: {hint}" in result.stderr
    assert "Traceback" not in result.stderr
    assert f"EXAMPLE: examples/wandb_trainer.py needs Weights & Biases (wandb), which is not installed: {hint}" in result.stdout
    assert WANDB_INSTALL_HINT == "pip install lightning-mtl[wandb]"


def test_a_module_with_a_task_named_shared_is_described_without_parameter_counts():
    tasks = make_tasks()
    tasks[0] = Task("shared", tasks[0].head, tasks[0].loss)
    with pytest.warns(UserWarning, match="named 'shared'"):
        description = describe(make_module(tasks=tasks))
    assert "parameters" not in description and set(description["tasks"]) == {"shared", "reg"}
