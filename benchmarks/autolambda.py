"""Cost of Auto-Lambda (``lightning_mtl.balancers.AutoLambda``) per training step and per meta step, against ``Static``.

Workloads: W-MLP with K = 2 and K = 10 heads (``mlp-k2``, ``mlp-k10``; definitions in ``benchmarks/balancers.py``'s
docstring: backbone Linear 256→512→512→256 (ReLU), heads 256→10, cross-entropy, batch 128), Adam (lr 1e-3), one
plain PyTorch loop without a ``Trainer``, as in ``benchmarks/balancers.py``. Configurations:

- ``Static``: ``loss = module.training_step(batch, 0)``, backward, ``opt.step()``, ``opt.zero_grad()``;
- ``AutoLambda``: the same step preceded by its meta step on a held-out batch (what ``MultiTaskModule`` does in
  ``on_train_batch_start`` under a ``Trainer``: ``balancer.meta_step`` with the module's forward, α = the optimizer's
  lr), at every step (``update_every=1``, the paper's setting) and every 10 steps (``update_every=10``);
- ``meta step``: the meta step alone (virtual step, meta gradient, the two finite-difference forwards, Adam on λ).

Each round runs every configuration of a workload, in turn, for ``--warmup`` blocks then ``--blocks`` blocks of 10
steps, and keeps the median over blocks of a block's mean step time (a block holds exactly one meta step of
``update_every=10``); reported are the median over rounds of those and of the per-round ratio to ``Static`` (with the
quartiles of the ratios).

    python benchmarks/autolambda.py                        # 7 rounds x 5 blocks, both workloads
    python benchmarks/autolambda.py --rounds 1 --blocks 1  # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from balancers import WORKLOADS, allocator, build_module, load, our_step, quartiles, versions  # noqa: E402

from lightning_mtl import MultiTaskModule  # noqa: E402
from lightning_mtl.balancers import Static  # noqa: E402
from lightning_mtl.balancers.autolambda import AutoLambda  # noqa: E402


def meta_step(module: MultiTaskModule, optimizer: torch.optim.Optimizer, meta_batches: list[Any]) -> Callable[[Any], None]:
    """The balancer's meta step on the step's batch and the next held-out batch (MetaSteps without the Trainer)."""
    forward = module.task_forward
    parameters = [p for p in module.parameters() if p.requires_grad]
    drawn = iter(range(10**9))

    def task_losses(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        _, predictions = forward.run(forward.groups(batch))
        return forward.stack_losses({p[0]: forward.loss(*p)[0] for p in predictions})

    def step(batch: Any) -> None:
        lr = optimizer.param_groups[0]["lr"]
        module.balancer.meta_step(task_losses, parameters, batch, meta_batches[next(drawn) % len(meta_batches)], lr)

    return step


def with_meta(module: MultiTaskModule, optimizer: torch.optim.Optimizer, meta_batches: list[Any]) -> Callable[[Any], None]:
    """A training step preceded by the meta step when it is due (``update_every``), as under the Trainer."""
    train, meta = our_step(module, optimizer), meta_step(module, optimizer, meta_batches)
    counter = iter(range(10**9))

    def step(batch: Any) -> None:
        if module.balancer.meta_step_due(next(counter)):
            meta(batch)
        train(batch)

    return step


BLOCK = 10


def time_blocks(step: Callable[[Any], None], batches: list[Any], warmup: int, blocks: int) -> float:
    """Median over ``blocks`` blocks of ``BLOCK`` steps of the block's mean step time (after ``warmup`` blocks)."""
    means = []
    for block in range(warmup + blocks):
        start = time.perf_counter()
        for i in range(BLOCK):
            step(batches[(block * BLOCK + i) % len(batches)])
        if block >= warmup:
            means.append((time.perf_counter() - start) / BLOCK)
    return statistics.median(means)


CONFIGS = ("Static", "AutoLambda", "AutoLambda every 10", "meta step")


def build(name: str, workload_key: str, meta_batches: list[Any]) -> Callable[[Any], None]:
    workload = WORKLOADS[workload_key]
    balancer = Static() if name == "Static" else AutoLambda(update_every=10 if name.endswith("10") else 1)
    module = build_module(workload, balancer, "parameters")
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    if name == "Static":
        return our_step(module, optimizer)
    if name == "meta step":
        return meta_step(module, optimizer, meta_batches)
    return with_meta(module, optimizer, meta_batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1, help="blocks of 10 steps before timing")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks of 10 steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workloads", default="mlp-k2,mlp-k10")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC | {versions()} | threads {args.threads}")
    print(f"allocator: {allocator()} | load (1, 5, 15 min) at start: {load()}")
    for workload_key in args.workloads.split(","):
        workload = WORKLOADS[workload_key]
        batches, meta_batches = workload.batches(seed=0), workload.batches(seed=1)
        times: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for _ in range(args.rounds):
            for name in CONFIGS:
                step = build(name, workload_key, meta_batches)
                times[name].append(time_blocks(step, batches, args.warmup, args.blocks))
        print(f"\n{workload.name} K={workload.num_tasks} ({workload_key}), {args.rounds} rounds x {args.blocks} x {BLOCK} steps, "
              f"load at end: {load()}")  # fmt: skip
        print("| configuration | step (ms) | ratio to Static | quartiles |\n| --- | --- | --- | --- |")
        for name in CONFIGS:
            ratios = [t / s for t, s in zip(times[name], times["Static"])]
            print(f"| {name} | {1000 * statistics.median(times[name]):.2f} | {statistics.median(ratios):.2f} | "
                  f"{quartiles(ratios)} |")  # fmt: skip


if __name__ == "__main__":
    main()
