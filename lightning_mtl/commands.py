"""``lightning-mtl baselines`` and ``lightning-mtl compare``: experiments made of several ``fit`` runs of one config.

``baselines``
-------------
One single-task model per task, from the multi-task run's own config.

Δm (:class:`~lightning_mtl.callbacks.DeltaM`) compares a multi-task model with single-task models trained the same
way. ``lightning-mtl baselines --config X.yaml [overrides]`` builds them from ``X.yaml`` itself, so that nothing but
the task set differs: the config is resolved as ``fit`` resolves it (``--print_config``), then, for each task in
turn, the model keeps only that task (its head, loss and metrics, weight 1: a single task's weight would only scale
its loss), the balancer is ``static`` (plain single-task training: Nash-MTL would normalise the one gradient, a
meta-learned weighting would tune the one weight; a ``meta`` split is dropped), the data module serves only that task,
a ``DeltaM`` callback is dropped (its file is what this command
writes; a ``ModelCheckpoint`` or ``EarlyStopping`` monitoring ``val/delta_m``, or another task's value such as
``val/right/accuracy`` in the baseline of ``left``, monitors the task's validation loss, ``val/loss``, mode ``min``,
instead: a single-task run logs neither), and the run goes to ``<default_root_dir>/baselines/<task>``. Backbone, optimizer, trainer budget and
``seed_everything`` are the config's. Each model is evaluated with its best checkpoint when a ``ModelCheckpoint``
monitors a metric (else its last weights), on the validation and the test split, and the per-task metrics of both go
to the baseline file (:func:`~lightning_mtl.baselines.write_baselines`) that ``DeltaM`` reads: the path given by
``--output``, else the ``baselines`` argument of the config's ``DeltaM`` callback.

Restricting the data to one task is done for the two forms the package knows: a ``MultiTaskDataModule`` whose splits
are ``{task: Dataset}`` mappings (each split keeps the task's dataset, and a ``batch_size`` mapping its entry), and
any data module with a ``tasks`` argument (``MultiDigitsDataModule``, ...), which is set to ``[task]``. Other data
modules are refused before anything is trained, with what to change.

``compare``
-----------
``lightning-mtl compare --config X.yaml --balancers static,uw,famo,upgrad --seeds 3 [overrides]`` fits the same
config once per balancer and seed (``--model.balancer NAME --seed_everything S``, seeds ``0..n-1`` unless
``--seed_values`` lists them; run folders ``<default_root_dir>/compare/<balancer>/seed_<S>``), tests each with its
best checkpoint (``test_after_fit``), and writes a leaderboard: per balancer, every ``test/{task}/{metric}`` and
``test/delta_m`` (when the config has a ``DeltaM`` callback) as mean ± sample standard deviation over the seeds, and
the median training-step time (:class:`~lightning_mtl.callbacks.StepTimer`, all seeds' steps pooled) relative to
the first balancer listed (put ``static`` first to read it as "× static"). The table is printed and saved as
``leaderboard.md`` and ``leaderboard.json`` in ``--output`` (default ``<default_root_dir>/compare``). Step times
are a relative guide: they are only as quiet as the machine the runs share.

``--wandb_project NAME`` also logs the leaderboard to Weights & Biases: one run of that project (job type
``leaderboard``, its config the balancers, seeds and config files; ``--wandb_dir`` its folder; ``WANDB_MODE=offline``
and the other ``WANDB_*`` variables apply) holding ``leaderboard``, a W&B Table with the columns of
``leaderboard.md``, each ``mean ± std`` as two number columns. Without wandb installed the option fails before
anything is trained.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import yaml
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_mtl.baselines import logged_task_metrics, task_directions, write_baselines
from lightning_mtl.run_config import require_wandb


class CommandError(ValueError):
    """A ``baselines`` command that cannot run as given; the message says what to change."""


def resolved_config(config_args: Sequence[str]) -> dict[str, Any]:
    """The ``fit`` config that ``config_args`` (``--config X.yaml`` and overrides) resolve to, every default filled in."""
    from lightning_mtl.cli import run

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            run(["fit", *config_args, "--print_config"])
        except SystemExit as exit:
            if exit.code not in (0, None):
                raise
    return yaml.safe_load(out.getvalue())


def task_names(config: dict[str, Any]) -> list[str]:
    return [_init_args(task)["name"] for task in config["model"]["tasks"]]


def single_task_config(config: dict[str, Any], task: str, root: str) -> dict[str, Any]:
    """``config`` with only ``task``: its Task (weight 1), its data, no ``DeltaM`` (a callback monitoring
    ``val/delta_m`` or another task's value monitors ``val/loss`` instead), run folder ``root/baselines/task``."""
    single = yaml.safe_load(yaml.safe_dump(config))  # a deep copy of plain data
    tasks = [entry for entry in single["model"]["tasks"] if _init_args(entry)["name"] == task]
    _init_args(tasks[0])["weight"] = 1.0
    single["model"]["tasks"] = tasks
    single["model"]["balancer"] = "static"  # plain single-task training, whatever the multi-task run balances with
    single["data"] = _single_task_data(single["data"], task)
    trainer = single["trainer"]
    trainer["callbacks"] = [callback for callback in trainer.get("callbacks") or [] if not _is_delta_m(callback)]
    others = set(task_names(config)) - {task}
    for callback in trainer["callbacks"]:
        arguments = _init_args(callback)
        if _not_logged_by_single_task(str(arguments.get("monitor") or ""), others):
            arguments.update(monitor="val/loss", mode="min")
    trainer["default_root_dir"] = os.path.join(root, "baselines", task)
    single["test_after_fit"] = False
    return single


def _not_logged_by_single_task(monitor: str, other_tasks: set[str]) -> bool:
    """Whether a single-task run never logs the key ``monitor``: Δm, or another task's value (``val/right/accuracy``
    in the baseline of ``left``)."""
    parts = monitor.split("/")
    return monitor.endswith("/delta_m") or (len(parts) > 2 and parts[1] in other_tasks)


def baselines_path(config: dict[str, Any], output: Optional[str]) -> str:
    """Where the baseline file goes: ``--output``, else the ``baselines`` argument of the config's ``DeltaM``."""
    if output:
        return output
    for callback in config["trainer"].get("callbacks") or []:
        if _is_delta_m(callback) and _init_args(callback).get("baselines"):
            return str(_init_args(callback)["baselines"])
    raise CommandError(
        "lightning-mtl baselines: no file to write. Pass --output baselines.json, or add the DeltaM callback with its "
        "file to the config (trainer.callbacks: [{class_path: lightning_mtl.callbacks.DeltaM, init_args: "
        "{baselines: baselines.json}}])."
    )


def train_baselines(config_args: Sequence[str], output: Optional[str] = None) -> Path:
    """Train one single-task model per task of the config and write their metrics; the file's path."""
    from lightning_mtl.cli import run

    config = resolved_config(config_args)
    path = baselines_path(config, output)
    names = task_names(config)
    root = config["trainer"].get("default_root_dir") or os.getcwd()
    singles = {task: single_task_config(config, task, root) for task in names}  # refuse unknown data before training
    metrics: dict[str, dict[str, dict[str, float]]] = {"val": {}, "test": {}}
    directions: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as folder:
        for index, task in enumerate(names, 1):
            print(f"lightning-mtl baselines: [{index}/{len(names)}] task {task!r} -> {singles[task]['trainer']['default_root_dir']}", flush=True)
            file = os.path.join(folder, f"{task}.yaml")
            Path(file).write_text(yaml.safe_dump(singles[task]))
            cli = run(["fit", "--config", file])
            directions.update(task_directions(cli.model.tasks))
            callback = cli.trainer.checkpoint_callback
            best = "best" if callback is not None and getattr(callback, "best_model_path", "") else None
            for split, evaluate in (("val", cli.trainer.validate), ("test", cli.trainer.test)):
                if not is_overridden(f"{split}_dataloader", cli.datamodule, LightningDataModule):
                    continue  # the config has no such split
                evaluate(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False)
                metrics[split].update(logged_task_metrics(cli.trainer.callback_metrics, [task], split))
    written = write_baselines(path, {split: values for split, values in metrics.items() if values}, directions=directions, config=config)
    print(f"lightning-mtl baselines: wrote {written} ({len(names)} tasks)", flush=True)
    return written


def compare_balancers(
    config_args: Sequence[str],
    balancers: Sequence[str],
    seeds: Sequence[int],
    output: Optional[str] = None,
    wandb_project: Optional[str] = None,
    wandb_dir: Optional[str] = None,
) -> dict[str, Any]:
    """Fit the config with every balancer and seed; the leaderboard (also written to ``output``, and with
    ``wandb_project`` logged as a W&B Table, see :func:`log_leaderboard_to_wandb`)."""
    from lightning_mtl.callbacks import StepTimer
    from lightning_mtl.cli import check_balancer_name, run

    if wandb_dir is not None and wandb_project is None:
        raise CommandError("lightning-mtl compare: --wandb_dir is the folder of the W&B run that --wandb_project makes; give both.")
    if wandb_project is not None:
        try:
            require_wandb("lightning-mtl compare --wandb_project")
        except ImportError as error:
            raise CommandError(str(error)) from None
    for name in balancers:
        check_balancer_name(name)
    config = resolved_config(config_args)
    root = config["trainer"].get("default_root_dir") or os.getcwd()
    folder = Path(output or os.path.join(root, "compare"))
    results: dict[str, dict[str, Any]] = {}
    total = len(balancers) * len(seeds)
    for index, (name, seed) in enumerate(((name, seed) for name in balancers for seed in seeds), 1):
        run_dir = os.path.join(root, "compare", name, f"seed_{seed}")
        print(f"lightning-mtl compare: [{index}/{total}] balancer {name!r}, seed {seed} -> {run_dir}", flush=True)
        cli = run([
            "fit", *config_args, "--model.balancer", name, "--seed_everything", str(seed), "--test_after_fit", "true",
            "--trainer.default_root_dir", run_dir, "--trainer.callbacks+=lightning_mtl.callbacks.StepTimer",
        ])  # fmt: skip
        timer = next(callback for callback in cli.trainer.callbacks if isinstance(callback, StepTimer))
        _finish_wandb_runs(cli.trainer)
        entry = results.setdefault(name, {"metrics": {}, "step_seconds": []})
        for key, value in cli.trainer.callback_metrics.items():
            if key.startswith("test/") and key != "test/loss":
                entry["metrics"].setdefault(key, []).append(float(value))
        entry["step_seconds"] += timer.seconds
    board = leaderboard(results, balancers)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "leaderboard.json").write_text(json.dumps({"seeds": list(seeds), **board}, indent=2))
    table = format_leaderboard(board)
    (folder / "leaderboard.md").write_text(table + "\n")
    print(f"{table}\nlightning-mtl compare: wrote {folder / 'leaderboard.md'} and leaderboard.json", flush=True)
    if wandb_project is not None:
        config_files = [path for flag, path in zip(config_args, config_args[1:]) if flag in ("-c", "--config")]
        log_leaderboard_to_wandb(board, wandb_project, {"balancers": list(balancers), "seeds": list(seeds), "config": config_files}, wandb_dir)
    return board


def leaderboard(results: dict[str, dict[str, Any]], balancers: Sequence[str]) -> dict[str, Any]:
    """``{"reference", "rows"}`` from each balancer's ``{"metrics": {key: [value per seed]}, "step_seconds": [...]}``."""
    reference = statistics.median(results[balancers[0]]["step_seconds"] or [float("nan")])
    rows = {}
    for name in balancers:
        entry = results[name]
        median = statistics.median(entry["step_seconds"] or [float("nan")])
        rows[name] = {
            "metrics": {key: _mean_std(values) for key, values in sorted(entry["metrics"].items())},
            "median_step_seconds": median,
            "step_time_ratio": median / reference,
        }
    return {"reference": balancers[0], "rows": rows}


def _leaderboard_keys(board: dict[str, Any]) -> list[str]:
    """Every test key of the leaderboard, ``test/delta_m`` first, then in alphabetical order."""
    keys = {key for row in board["rows"].values() for key in row["metrics"]}
    return sorted(keys, key=lambda key: (key != "test/delta_m", key))


def _mean_std(values: list[float]) -> dict[str, float]:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": spread, "n": len(values)}


def format_leaderboard(board: dict[str, Any]) -> str:
    """The leaderboard as a Markdown table: one row per balancer, ``mean ± std`` per test metric, Δm first."""
    rows = board["rows"]
    keys = _leaderboard_keys(board)
    header = ["balancer", *(key.removeprefix("test/") for key in keys), f"step time (× {board['reference']})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        cells = [name]
        for key in keys:
            value = row["metrics"].get(key)
            cells.append("—" if value is None else f"{value['mean']:.4g} ± {value['std']:.2g}")
        cells.append(f"{row['step_time_ratio']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def leaderboard_table(board: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """``(columns, data)`` of :func:`format_leaderboard`'s table with numbers: each ``mean ± std`` cell as a
    ``{metric} mean`` and a ``{metric} std`` column (``None`` where a balancer lacks the metric)."""
    keys = _leaderboard_keys(board)
    columns = ["balancer", *(f"{key.removeprefix('test/')} {part}" for key in keys for part in ("mean", "std"))]
    columns.append(f"step time (× {board['reference']})")
    data = []
    for name, row in board["rows"].items():
        cells = [(row["metrics"].get(key) or {}).get(part) for key in keys for part in ("mean", "std")]
        data.append([name, *cells, row["step_time_ratio"]])
    return columns, data


def log_leaderboard_to_wandb(board: dict[str, Any], project: str, config: dict[str, Any], folder: Optional[str] = None) -> Path:
    """Log ``board`` as the W&B Table ``leaderboard`` of a new run of ``project`` (job type ``leaderboard``,
    run config ``config``, files under ``folder``); the run's folder. A W&B run still active in the process is
    finished first (``wandb.init`` would otherwise log into it)."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, dir=folder, job_type="leaderboard", config=config)
    try:
        columns, data = leaderboard_table(board)
        run.log({"leaderboard": wandb.Table(columns=columns, data=data)})
        run_folder = Path(run.dir).parent
    finally:
        run.finish()
    print(f"lightning-mtl compare: logged the leaderboard to W&B project {project!r} ({run_folder})", flush=True)
    return run_folder


def main(argv: Sequence[str]) -> None:
    """``lightning-mtl baselines|compare --config X.yaml ... [fit overrides ...]``."""
    from lightning_mtl.cli import ConfigError

    command, argv = argv[0], argv[1:]
    parser = argparse.ArgumentParser(prog=f"lightning-mtl {command}", description=_DESCRIPTIONS[command])
    parser.add_argument("-c", "--config", action="append", required=True, help="the multi-task fit config (YAML)")
    if command == "baselines":
        parser.add_argument("--output", help="the baseline file (default: the config's DeltaM `baselines` argument)")
    else:
        parser.add_argument("--balancers", required=True, help="comma-separated balancer names, e.g. static,uw,famo")
        parser.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..n-1 (default 3)")
        parser.add_argument("--seed_values", help="comma-separated seeds, instead of --seeds")
        parser.add_argument("--output", help="folder of leaderboard.md/.json (default <default_root_dir>/compare)")
        parser.add_argument("--wandb_project", help="also log the leaderboard as a W&B Table, in a run of this project")
        parser.add_argument("--wandb_dir", help="the folder of that W&B run (default: wandb's, ./wandb)")
    known, overrides = parser.parse_known_args(argv)
    config_args = [arg for path in known.config for arg in ("--config", path)] + overrides
    try:
        if command == "baselines":
            train_baselines(config_args, known.output)
            return
        seeds = [int(v) for v in known.seed_values.split(",")] if known.seed_values else list(range(known.seeds))
        balancers = [name.strip() for name in known.balancers.split(",") if name.strip()]
        if not balancers or not seeds:
            raise CommandError("lightning-mtl compare: give at least one balancer (--balancers) and one seed.")
        compare_balancers(config_args, balancers, seeds, known.output, known.wandb_project, known.wandb_dir)
    except (CommandError, ConfigError) as error:
        sys.stderr.write(f"{error}\n")
        sys.exit(2)


_DESCRIPTIONS = {
    "baselines": (
        "Train one single-task model per task of a multi-task config (same backbone, data, budget and seed) and "
        "write their validation and test metrics to the baseline file that lightning_mtl.callbacks.DeltaM reads. "
        "Any other option is a fit override (e.g. --trainer.max_epochs 5) applied to every run."
    ),
    "compare": (
        "Fit one config with several balancers and seeds and write a leaderboard: per-task test metrics and Δm "
        "(with a DeltaM callback in the config) as mean ± std over seeds, and the median step time relative to "
        "the first balancer. Any other option is a fit override applied to every run."
    ),
}


def _finish_wandb_runs(trainer: Any) -> None:
    """Finish the W&B run of each ``WandbLogger`` of a finished fit, so that the next fit's logger starts its own
    (a ``WandbLogger`` reuses an active run)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def _init_args(entry: Any) -> dict[str, Any]:
    return entry.get("init_args") or {} if isinstance(entry, dict) else {}


def _is_delta_m(callback: Any) -> bool:
    return isinstance(callback, dict) and str(callback.get("class_path", "")).rsplit(".", 1)[-1] == "DeltaM"


def _single_task_data(data: dict[str, Any], task: str) -> dict[str, Any]:
    arguments = _init_args(data)
    if "meta" in arguments:
        arguments["meta"] = None  # the held-out batches of a meta-learned weighting (AutoLambda): static needs none
    if "tasks" in arguments:
        arguments["tasks"] = [task]
        return data
    splits = [split for split in ("train", "val", "test", "predict") if isinstance(arguments.get(split), dict)]
    if splits and all(task in arguments[split] or split != "train" for split in splits):
        for split in splits:
            arguments[split] = {task: arguments[split][task]} if task in arguments[split] else None
        if isinstance(arguments.get("batch_size"), dict):
            arguments["batch_size"] = {task: arguments["batch_size"][task]}
        return data
    raise CommandError(
        f"lightning-mtl baselines: cannot restrict the data module {data.get('class_path')!r} to task {task!r}: it "
        "has no `tasks` argument and no {task: Dataset} splits naming it. Use a MultiTaskDataModule with per-task "
        "datasets, or a data module with a `tasks` argument."
    )
