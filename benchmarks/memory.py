"""Peak memory and step time of parameter mode, layerwise Gramian against the materialised Jacobian (issue 14).

Workloads (``--workloads``): ``10M``, an MLP backbone 512→2048→2048→2048→256 (ReLU; 10.0 M shared
parameters), batch 64, K cross-entropy heads 256→10, shared-input batches; ``25M``, the same with
512→3328→3328→3328→256 (24.7 M); ``W-MLP`` and ``W-CNN``, the step-time workloads of
``benchmarks/balancers.py`` (batch 128 and 64), for the time goals. K from ``--tasks`` (``25M``: K = 40
only). Configurations, all trained with SGD (lr 1e-3) in a plain loop (``training_step``, ``backward``,
``step``, ``zero_grad``; ``module.log`` a no-op):

- ``static``: ``Static`` weights (loss level);
- ``representation``: UPGrad, ``gradients="representation"``;
- ``parameters``: UPGrad, ``gradients="parameters"``, the default rule (``lightning_mtl.gramian.LAYERWISE =
  "auto"``); the table says which path it took;
- ``layerwise``: the same with ``LAYERWISE = "always"``;
- ``materialised``: the same with ``LAYERWISE = "never"``, i.e. the K × P Jacobian of parameter mode before
  issue 14 (and still used for DDP, for methods that need the gradients, and where the rule prefers it).

**Memory.** Every configuration runs in a fresh Python process. The child builds the module, the optimizer
and the batch, reads its resident set size (``VmRSS`` in ``/proc/self/status``), resets the kernel's
peak-RSS counter (``5`` written to ``/proc/self/clear_refs``), runs ``--memory-steps`` training steps and
reads the peak (``VmHWM``). Reported: peak − start, "the peak memory over the run's start"; it includes
what the first steps allocate for good (the gradients: P × 4 bytes). Why RSS: PyTorch allocates CPU tensors
with ``malloc`` (no caching allocator, and no CPU allocator statistics to read), which ``tracemalloc`` does
not see (it traces Python's object allocator). RSS counts the pages the process has touched, so a K × P
tensor written in full is counted, whatever allocator served it. glibc may keep freed memory mapped, so RSS
can exceed the live tensors but never undercount their peak; the same holds for every configuration.

**Time.** In the same child, after the memory steps: ``--warmup`` steps, then the median of ``--steps``
steps, in process CPU time (``time.process_time``, robust to other processes on a shared machine) and in
wall time, with ``--threads`` torch threads (default 1, so that CPU time is the step's work).

    python benchmarks/memory.py                   # K = 2, 10, 40 on the 10 M MLP
    python benchmarks/memory.py --workloads 10M,25M
    python benchmarks/memory.py --workloads W-MLP,W-CNN --tasks 2,10 --configurations static,parameters,layerwise,materialised
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

CONFIGURATIONS = ("static", "representation", "parameters", "layerwise", "materialised")
WIDTHS = {"10M": (512, 2048, 2048, 2048, 256), "25M": (512, 3328, 3328, 3328, 256)}


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(spec: dict) -> dict:
    """One configuration, in this (fresh) process: its memory and step times."""
    import torch
    from torch import nn

    from lightning_mtl import MultiTaskModule, Task, gramian
    from lightning_mtl.updates import parameters

    torch.set_num_threads(spec["threads"])
    gramian.LAYERWISE = {"layerwise": "always", "materialised": "never"}.get(spec["configuration"], "auto")
    taken: list[bool] = []
    choose = parameters.use_layerwise
    parameters.use_layerwise = lambda *args: taken.append(choose(*args)) or taken[-1]  # the path each step took
    num_tasks = spec["tasks"]
    torch.manual_seed(0)
    backbone, input_shape, batch_size, width = workload(spec["model"])
    tasks = [Task(f"t{k}", nn.Linear(width, 10), nn.CrossEntropyLoss()) for k in range(num_tasks)]
    balancer = "static" if spec["configuration"] == "static" else "upgrad"
    mode = "representation" if spec["configuration"] == "representation" else "parameters"
    module = MultiTaskModule(backbone, tasks, balancer=balancer, gradients=mode)
    module.log = lambda *args, **kwargs: None
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    labels = {f"t{k}": torch.randint(0, 10, (batch_size,), generator=g) for k in range(num_tasks)}
    batch = (torch.randn(batch_size, *input_shape, generator=g), labels)

    def step() -> None:
        module.training_step(batch, 0).backward()
        optimizer.step()
        optimizer.zero_grad()

    start = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(spec["memory_steps"]):
        step()
    peak = _status("VmHWM") - start
    cpu, wall = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        c, w = time.process_time(), time.perf_counter()
        step()
        if i >= spec["warmup"]:
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - w)
    shared = sum(p.numel() for p in module.backbone.parameters())
    path = "" if not taken else "layerwise" if all(taken) else "materialised" if not any(taken) else "mixed"
    return {**spec, "shared": shared, "peak": peak, "cpu": statistics.median(cpu), "wall": statistics.median(wall), "path": path}


def workload(name: str):
    """``(backbone, input shape, batch size, output width)``."""
    from torch import nn

    if name in WIDTHS:
        widths = WIDTHS[name]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers), (widths[0],), 64, widths[-1]
    from balancers import cnn_backbone, mlp_backbone  # this folder's step-time benchmark

    return (mlp_backbone(), (256,), 128, 256) if name == "W-MLP" else (cnn_backbone(), (1, 32, 32), 64, 256)


def run(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        return {**spec, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    lines = [
        "| model | K | configuration | path | peak over start (MB) | over static (MB) | K·P·4 (MB) | over static / K·P·4 | step CPU (ms) | × static | step wall (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    static = {(r["model"], r["tasks"]): r for r in results if r["configuration"] == "static" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tasks']} | {r['configuration']} | | error: {r['error']} | | | | | | |")
            continue
        base = static.get((r["model"], r["tasks"]))
        jacobian = r["tasks"] * r["shared"] * 4
        over = r["peak"] - base["peak"] if base else float("nan")
        lines.append(
            f"| {r['model']} | {r['tasks']} | {r['configuration']} | {r['path']} | {r['peak'] / 1e6:.0f} | {over / 1e6:.0f} | "
            f"{jacobian / 1e6:.0f} | {over / jacobian:.2f} | {r['cpu'] * 1e3:.0f} | "
            f"{r['cpu'] / base['cpu'] if base else float('nan'):.2f} | {r['wall'] * 1e3:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workloads", default="10M", help="comma-separated: 10M, 25M (K = 40 only), W-MLP, W-CNN")
    parser.add_argument("--tasks", default="2,10,40", help="comma-separated K values")
    parser.add_argument("--configurations", default="static,representation,parameters,materialised")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    runs = [(w, int(k)) for w in args.workloads.split(",") for k in args.tasks.split(",") if w != "25M" or k == "40"]
    common = {"memory_steps": args.memory_steps, "warmup": args.warmup, "steps": args.steps, "threads": args.threads}
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC | torch {torch.__version__} | threads {args.threads} | "
          f"CPUs {os.cpu_count()} | load at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)  # fmt: skip
    results = []
    for model, num_tasks in runs:
        for configuration in args.configurations.split(","):
            results.append(run({"model": model, "tasks": num_tasks, "configuration": configuration, **common}))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(table(results))
    print(f"load at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for r in results:
        if r["model"] == "10M" and r["tasks"] == 10 and r["configuration"] == "parameters" and "error" not in r:
            base = next(s for s in results if s["model"] == "10M" and s["tasks"] == 10 and s["configuration"] == "static")
            share = (r["peak"] - base["peak"]) / (10 * r["shared"] * 4)
            print(f"goal (10 M, K = 10, parameter mode over static ≤ 25% of K·P·4): {share:.1%}: {'pass' if share <= 0.25 else 'FAIL'}")


if __name__ == "__main__":
    main()
