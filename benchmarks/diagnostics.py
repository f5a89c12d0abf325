"""Whole-run cost of the diagnostic callbacks (GradientConflict, TaskWeights, TaskAffinity) at their intervals.

Workload W-MLP (as in ``benchmarks/balancers.py``): backbone Linear 256→512→512→256 (ReLU), K = 2 or 10
cross-entropy heads 256→10, shared-input batches of 128, Adam (lr 1e-3), static weights unless said. Each run is
a ``Trainer.fit`` of ``--epochs`` epochs of ``--steps-per-epoch`` steps, no logger (the pictures go to PNG + JSON
files in a temporary directory), no checkpointing, no progress bar. Its time is taken from the first
``on_train_start`` to the last ``on_train_end`` (a timer placed after the callbacks measured, so their epoch-end
and end-of-fit pictures count): the whole training run, the Trainer's set-up excluded (the same for all).

Configurations, per workload: ``base`` (no diagnostic callback), each callback alone at its interval, all three
together, and UPGrad without and with ``GradientConflict`` (a gradient-level balancer forms the Gramian anyway:
reading it should cost nothing). Both wall-clock and process CPU time are taken: on a machine shared with other
jobs the CPU time of a one-thread run (``--threads 1``) is the steadier measure of the work added. Runs are interleaved (every configuration once per round, in turn); reported is
the median over rounds of each configuration's per-round ratio to ``base`` of the same round (UPGrad + callback:
to UPGrad alone), with the spread of those ratios. Goal (issue 13): ≤ 1.05× at the default intervals.

``--paired`` runs each configuration against ``base`` in back-to-back ABBA / BAAB quadruples instead (a slow
drift of the machine cancels within a quadruple), CPU time, and reports the median of the quadruples' ratios.

``--per-sample`` measures what one sample costs instead: each callback with ``every_n_steps=1`` (pictures off)
against no callback, interleaved; the extra milliseconds of a sampled step are the difference of the two runs'
median step times. An interval follows: interval ≥ per-sample cost / (0.05 × step time) for 5 %. It also times drawing and writing each picture once (paid once
per epoch). The whole-run ratio at interval N and E steps per epoch is then about
1 + (per-sample cost / N + pictures / E) / step time.

    python benchmarks/diagnostics.py                          # defaults: 3 rounds, 2 x 250 steps, K = 2 and 10
    python benchmarks/diagnostics.py --per-sample --rounds 3
    python benchmarks/diagnostics.py --paired --rounds 4 --epochs 1 --steps-per-epoch 1000 --threads 1
    python benchmarks/diagnostics.py --paired --rounds 6 --workloads 10 --only GradientConflict --threads 1
    python benchmarks/diagnostics.py --rounds 1 --epochs 1 --steps-per-epoch 20 --workloads 2   # smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.callbacks import GradientConflict, TaskAffinity, TaskWeights


def mlp_backbone() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU())


def build(num_tasks: int, balancer: str | None = None) -> MultiTaskModule:
    torch.manual_seed(0)
    tasks = [Task(f"t{k}", nn.Linear(256, 10), nn.CrossEntropyLoss()) for k in range(num_tasks)]
    return MultiTaskModule(mlp_backbone(), tasks, balancer=balancer)


def batches(num_tasks: int, count: int, batch: int = 128, distinct: int = 16) -> list:
    g = torch.Generator().manual_seed(0)
    pool = []
    for _ in range(distinct):
        x = torch.randn(batch, 256, generator=g)
        pool.append((x, {f"t{k}": torch.randint(0, 10, (batch,), generator=g) for k in range(num_tasks)}))
    return [pool[i % distinct] for i in range(count)]


class RunTimer(Callback):
    """Wall-clock and process CPU seconds of the training run."""

    def __init__(self) -> None:
        self.start = self.cpu_start = self.seconds = self.cpu_seconds = 0.0
        self.steps = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, *args) -> None:
        self.steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds, self.cpu_seconds = time.perf_counter() - self.start, time.process_time() - self.cpu_start


def run(num_tasks: int, data: list, epochs: int, callbacks: list[Callback], balancer: str | None, root: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one training run (``on_train_start`` to the timer's ``on_train_end``, after the callbacks')."""
    timer = RunTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, timer],
        log_every_n_steps=50,
        default_root_dir=root,
    )
    trainer.fit(build(num_tasks, balancer), DataLoader(data, batch_size=None, shuffle=False))
    assert timer.steps == epochs * len(data)
    return timer.seconds, timer.cpu_seconds


Config = tuple[str, Callable[[], list[Callback]], "str | None", str]  # name, callbacks, balancer, reference


def configurations(gc: int, tw: int, ta: int) -> list[Config]:
    return [
        ("base", lambda: [], None, "base"),
        (f"GradientConflict({gc})", lambda: [GradientConflict(every_n_steps=gc)], None, "base"),
        (f"TaskWeights({tw})", lambda: [TaskWeights(every_n_steps=tw)], None, "base"),
        (f"TaskAffinity({ta})", lambda: [TaskAffinity(every_n_steps=ta)], None, "base"),
        (
            "all three",
            lambda: [GradientConflict(every_n_steps=gc), TaskWeights(every_n_steps=tw), TaskAffinity(every_n_steps=ta)],
            None,
            "base",
        ),
        ("UPGrad", lambda: [], "upgrad", "UPGrad"),
        (f"UPGrad + GradientConflict({gc})", lambda: [GradientConflict(every_n_steps=gc)], "upgrad", "UPGrad"),
    ]


def paired_runs(args: argparse.Namespace) -> None:
    """Each configuration against ``base`` in pairs run back to back, in ABBA / BAAB order (a drift of the machine's
    speed over a few runs cancels out); the ratio of the pair sums, median over repetitions."""
    for num_tasks in args.workloads:
        data = batches(num_tasks, args.steps_per_epoch)
        configs = [config for config in configurations(args.gc, args.tw, args.ta) if config[3] == "base" and config[0] != "base"]
        if args.only:
            configs = [config for config in configs if config[0].split("(")[0] in args.only]
        base_config: Config = ("base", lambda: [], None, "base")
        ratios: dict[str, list[float]] = {name: [] for name, *_ in configs}
        base_seconds: list[float] = []
        with tempfile.TemporaryDirectory() as root:
            run(num_tasks, data[:10], 1, [], None, root)  # warm-up
            for repetition in range(args.rounds):
                for config in configs:
                    order = [base_config, config, config, base_config]
                    if repetition % 2:
                        order.reverse()
                    times: dict[str, float] = {"base": 0.0, config[0]: 0.0}
                    for name, callbacks, balancer, _ in order:
                        seconds = run(num_tasks, data, args.epochs, callbacks(), balancer, root)[1]  # CPU time
                        times[name] += seconds
                    ratios[config[0]].append(times[config[0]] / times["base"])
                    base_seconds.append(times["base"] / 2)
        steps = args.epochs * args.steps_per_epoch
        print(f"\nW-MLP K={num_tasks}: paired ABBA runs of {args.epochs} epoch(s) x {args.steps_per_epoch} steps, "
              f"{args.rounds} repetitions, CPU time; base {statistics.median(base_seconds) / steps * 1e3:.2f} ms/step")
        print("| configuration | ratio to base (median) | spread | per repetition |")
        print("| --- | --- | --- | --- |")
        for name, values in ratios.items():
            print(f"| {name} | **{statistics.median(values):.3f}×** | {spread(values)} | {' '.join(f'{v:.3f}' for v in values)} |")


def spread(values: list[float]) -> str:
    return f"{min(values):.3f}–{max(values):.3f}" if len(values) > 1 else "-"


def whole_runs(args: argparse.Namespace) -> None:
    for num_tasks in args.workloads:
        data = batches(num_tasks, args.steps_per_epoch)
        configs = configurations(args.gc, args.tw, args.ta)
        if args.skip_upgrad:
            configs = [config for config in configs if config[2] is None]
        wall: dict[str, list[float]] = {name: [] for name, *_ in configs}
        cpu: dict[str, list[float]] = {name: [] for name, *_ in configs}
        with tempfile.TemporaryDirectory() as root:
            run(num_tasks, data[:10], 1, [], None, root)  # warm-up
            for _ in range(args.rounds):
                for name, callbacks, balancer, _ in configs:
                    seconds, cpu_seconds = run(num_tasks, data, args.epochs, callbacks(), balancer, root)
                    wall[name].append(seconds)
                    cpu[name].append(cpu_seconds)
        steps = args.epochs * args.steps_per_epoch
        print(f"\nW-MLP K={num_tasks}: {args.rounds} rounds of {args.epochs} epochs x {args.steps_per_epoch} steps")
        print("| configuration | median run, wall (s) | ms/step | ratio, wall | spread | ratio, CPU time | spread |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, _, _, reference in configs:
            median = statistics.median(wall[name])
            cells = []
            for times in (wall, cpu):
                ratios = [a / b for a, b in zip(times[name], times[reference])]
                cells += ["—", "-"] if name == reference else [f"**{statistics.median(ratios):.3f}×**", spread(ratios)]
            print(f"| {name} | {median:.2f} | {median / steps * 1e3:.2f} | {' | '.join(cells)} |")


class StepTimer(Callback):
    """Seconds of every step, from one ``on_train_batch_start`` to the next (placed first: it includes the other
    callbacks' work on the step, before and after it)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.starts: list[float] = []
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(self.clock())
        self.steps.append(trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(self.clock())

    def durations(self) -> dict[int, float]:
        return {step: b - a for step, a, b in zip(self.steps, self.starts, self.starts[1:])}


def per_sample(args: argparse.Namespace) -> None:
    """Extra time of a sampled step: each callback with ``every_n_steps=1`` (pictures off) against ``base``, runs
    interleaved; the difference of their median step times (so that a slow spell of the machine counts little and
    a cost that spills over into the next step counts in full), median over rounds."""
    steps = args.per_sample_steps
    for num_tasks in args.workloads:
        data = batches(num_tasks, steps)
        configs: list[tuple[str, Callable[[], list[Callback]], "str | None"]] = [
            ("base", lambda: [], None),
            ("GradientConflict", lambda: [GradientConflict(every_n_steps=1, heatmap=False)], None),
            ("TaskWeights", lambda: [TaskWeights(every_n_steps=1, every_n_epochs=0)], None),
            ("TaskAffinity", lambda: [TaskAffinity(every_n_steps=1, heatmap=False, every_n_epochs=0, num_groups=1)], None),
            ("UPGrad", lambda: [], "upgrad"),
            ("UPGrad + GradientConflict", lambda: [GradientConflict(every_n_steps=1, heatmap=False)], "upgrad"),
        ]
        clocks = {"wall": time.perf_counter, "CPU": time.process_time}
        medians: dict[tuple[str, str], list[float]] = {(name, clock): [] for name, *_ in configs for clock in clocks}
        with tempfile.TemporaryDirectory() as root:
            run(num_tasks, data[:10], 1, [], None, root)
            for _ in range(args.rounds):
                for name, callbacks, balancer in configs:
                    timers = {clock: StepTimer(function) for clock, function in clocks.items()}
                    run(num_tasks, data, 1, [*timers.values(), *callbacks()], balancer, root)
                    for clock, timer in timers.items():
                        durations = [seconds for step, seconds in timer.durations().items() if step >= 4]
                        medians[name, clock].append(statistics.median(durations) * 1e3)
        print(f"\nW-MLP K={num_tasks}: one sample's cost (every_n_steps=1 against none, {steps} steps, {args.rounds} rounds)")
        print("| callback | clock | step without it (ms) | extra ms per sample | its spread over rounds | in steps | interval for ≤ 1.05× |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, _, balancer in configs:
            if name in ("base", "UPGrad"):
                continue
            reference = "UPGrad" if balancer == "upgrad" else "base"
            for clock in clocks:
                extra = [a - b for a, b in zip(medians[name, clock], medians[reference, clock])]
                base, cost = statistics.median(medians[reference, clock]), statistics.median(extra)
                print(
                    f"| {name} | {clock} | {base:.2f} | {cost:.2f} | {min(extra):.2f} to {max(extra):.2f} | "
                    f"{cost / base:.2f} | ≥ {max(1.0, cost / (0.05 * base)):.0f} |"
                )
        pictures(num_tasks, args.rounds)


def pictures(num_tasks: int, rounds: int) -> None:
    """Milliseconds to draw and write each callback's picture once (no logger: PNG + JSON files)."""
    from types import SimpleNamespace

    from lightning_mtl.callbacks.figures import heatmap, line_chart, log_figure

    names = [f"t{k}" for k in range(num_tasks)]
    matrix = torch.randn(num_tasks, num_tasks).tolist()
    history = list(range(0, 1000, 10))
    draws = {
        "heatmap (GradientConflict, TaskAffinity)": lambda: heatmap(matrix, names, "cosine"),
        f"line chart, {len(history)} samples (TaskWeights)": lambda: line_chart(
            history, {name: [0.5] * len(history) for name in names}, "weights", "step", "weight"
        ),
    }
    with tempfile.TemporaryDirectory() as root:
        trainer = SimpleNamespace(is_global_zero=True, loggers=[], default_root_dir=root)
        for name, draw in draws.items():
            times, cpu_times = [], []
            for step in range(rounds + 2):
                start, cpu_start = time.perf_counter(), time.process_time()
                log_figure(trainer, "train/x", draw(), step=step, data={"matrix": matrix})
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
            print(
                f"| picture: {name} | wall / CPU | | {statistics.median(times[2:]) * 1e3:.0f} / "
                f"{statistics.median(cpu_times[2:]) * 1e3:.0f} ms, once per epoch | | |"
            )


def header() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    given = [f"{k}={os.environ[k]}" for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD") if k in os.environ]
    return (
        f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC | {platform.machine()} | {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads | load {load:.1f} | python {platform.python_version()} | torch {torch.__version__} "
        f"| lightning {L.__version__} | allocator: {', '.join(given) or 'glibc defaults'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=250)
    parser.add_argument("--workloads", type=lambda s: [int(k) for k in s.split(",")], default=[2, 10], help="K values")
    parser.add_argument("--gc", type=int, default=GradientConflict().every_n_steps, help="GradientConflict interval")
    parser.add_argument("--tw", type=int, default=TaskWeights().every_n_steps, help="TaskWeights interval")
    parser.add_argument("--ta", type=int, default=TaskAffinity().every_n_steps, help="TaskAffinity interval")
    parser.add_argument("--per-sample", action="store_true", help="measure the cost of one sample instead")
    parser.add_argument("--paired", action="store_true", help="whole runs in ABBA pairs against base (CPU time)")
    parser.add_argument(
        "--only", type=lambda s: s.split(","), default=[],
        help="--paired: these configurations only (comma-separated, e.g. GradientConflict,TaskWeights)",
    )
    parser.add_argument("--skip-upgrad", action="store_true", help="whole runs: leave out the UPGrad pair (slow at K=10)")
    parser.add_argument("--per-sample-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(header())
    (per_sample if args.per_sample else paired_runs if args.paired else whole_runs)(args)
    print(f"# finished {datetime.now(timezone.utc):%H:%M} UTC, load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
