"""The pre-registered study of docs/where_mtl_helps.md: multi-task vs single-task, paired by seed.

For each seed S, in its own folder ``<root>/seed_S`` (the config's relative paths land there):

1. ``lightning-mtl baselines --config CONFIG --seed_everything S``: one single-task model per task, same
   backbone, data, budget and seed; their metrics go to the config's ``DeltaM`` baseline file;
2. ``lightning-mtl fit --config CONFIG --seed_everything S``: the multi-task model, tested after fit, its
   Δm against the baselines of the same seed logged by ``DeltaM``.

Then, from the CSV logs, each task's test metric per seed, the relative gain of the multi-task model
over the single-task one (sign-corrected: positive is better) and Δm, with mean, sample standard deviation
and a 95 % Student-t confidence interval over seeds.

    python benchmarks/where_mtl_helps.py --root runs/where_mtl_helps --seeds 0,1,2,3,4 --streams 2
    python benchmarks/where_mtl_helps.py --root runs/where_mtl_helps --seeds 0,1,2,3,4 --analyse-only
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "configs" / "multidigits_few_labels.yaml"
#: Two-sided 95 % quantiles of Student's t for 1..9 degrees of freedom.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
#: (task, metric key, higher is better)
ENDPOINTS = [("left", "accuracy", True), ("right", "accuracy", True), ("sum", "mae", False)]


def run_seed(config: Path, root: Path, seed: int) -> None:
    folder = root / f"seed_{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    common = ["--config", str(config), "--seed_everything", str(seed), "--trainer.enable_progress_bar=false"]
    for command in (["baselines"], ["fit"]):
        with open(folder / f"{command[0]}.log", "w") as log:
            subprocess.run(["lightning-mtl", *command, *common], cwd=folder, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"seed {seed}: done", flush=True)


def last_test_metrics(run_folder: Path) -> dict[str, float]:
    """The test metrics of the newest ``metrics.csv`` under ``run_folder`` (the CSV logger's file)."""
    files = sorted(run_folder.glob("lightning_logs/version_*/metrics.csv"), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no lightning_logs/version_*/metrics.csv under {run_folder}")
    values: dict[str, float] = {}
    for row in csv.DictReader(open(files[-1])):
        values.update({key: float(value) for key, value in row.items() if key.startswith("test/") and value})
    return values


def gain(multi: float, single: float, higher: bool) -> float:
    return (1 if higher else -1) * (multi - single) / abs(single) * 100.0


def summary(values: list[float]) -> str:
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return f"{mean:+.2f}"
    half = T95[n - 1] * statistics.stdev(values) / math.sqrt(n)
    return f"{mean:+.2f} ± {statistics.stdev(values):.2f} (95 % CI {mean - half:+.2f} … {mean + half:+.2f})"


def analyse(root: Path, seeds: list[int], config: Path) -> str:
    rows, gains, deltas = [], {task: [] for task, *_ in ENDPOINTS}, []
    config_text = config.read_text()
    baseline_file = "runs/few_labels/baselines.json" if "runs/few_labels/baselines.json" in config_text else None
    for seed in seeds:
        folder = root / f"seed_{seed}"
        multi = last_test_metrics(folder / "runs" / "few_labels")
        single = json.loads((folder / baseline_file).read_text())["metrics"]["test"]
        cells = [str(seed)]
        for task, metric, higher in ENDPOINTS:
            m, b = multi[f"test/{task}/{metric}"], single[task][metric]
            g = gain(m, b, higher)
            gains[task].append(g)
            cells.append(f"{b:.4f} → {m:.4f} ({g:+.2f} %)")
        deltas.append(multi["test/delta_m"])
        cells.append(f"{multi['test/delta_m']:+.2f} %")
        rows.append("| " + " | ".join(cells) + " |")
    header = ["seed", *(f"{task} {metric} (single → multi, gain)" for task, metric, _ in ENDPOINTS), "Δm"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header), *rows]
    lines.append("")
    for task, metric, _ in ENDPOINTS:
        lines.append(f"- {task} {metric}: gain {summary(gains[task])} %")
    lines.append(f"- Δm: {summary(deltas)} %")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--root", type=Path, default=Path("runs/where_mtl_helps"))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--streams", type=int, default=1, help="seeds run at the same time")
    parser.add_argument("--analyse-only", action="store_true")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    config = args.config.resolve()
    if not args.analyse_only:
        with ThreadPoolExecutor(args.streams) as pool:
            for future in [pool.submit(run_seed, config, args.root, seed) for seed in seeds]:
                future.result()
    table = analyse(args.root, seeds, config)
    print(table)
    (args.root / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    sys.exit(main())
