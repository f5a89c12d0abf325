"""Where representation mode's extra step time goes, on a balancers.py workload.

Times, interleaved in one process, a static step and representation-mode steps of one balancer with
parts of the balancing switched off: ``no-weighting`` (the balancer's weights replaced by 1/K),
``no-balancing`` (the views' backward returns the plain sum of the cotangents, i.e. the views
mechanism alone) and ``no-loss-check`` (the loss finiteness check skipped). Prints the median step
time and the median over rounds of the per-round ratio to static.

    python benchmarks/representation_ablation.py --workload mlp-k2 --balancer imtlg
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from balancers import WORKLOADS, build_module, make_balancer, our_step


def make_step(workload, name: str, mode: str, ablation: str | None = None):
    module = build_module(workload, make_balancer(name), mode)
    if ablation == "no-weighting":
        uniform = torch.full((workload.num_tasks,), 1.0 / workload.num_tasks)
        module.balancer.weights = lambda gramian, losses=None, present=None, nonzero=None: uniform
    elif ablation == "no-balancing":
        module.balancing.balance_in_backward = lambda tap, context, stacks: [stack.sum(0) for stack in stacks]
    elif ablation == "no-loss-check":
        module.nonfinite.losses_finite = lambda *args: True
    return our_step(module, module.configure_optimizers())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="mlp-k2", choices=list(WORKLOADS))
    parser.add_argument("--balancer", default="imtlg")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    workload = WORKLOADS[args.workload]
    steps = {"static": make_step(workload, "static", "parameters"), args.balancer: make_step(workload, args.balancer, "representation")}
    for ablation in ("no-weighting", "no-balancing", "no-loss-check"):
        steps[ablation] = make_step(workload, args.balancer, "representation", ablation)
    batches = workload.batches()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            for i in range(5):
                step(batches[i % len(batches)])
            samples = []
            for i in range(args.steps):
                start = time.perf_counter()
                step(batches[i % len(batches)])
                samples.append(time.perf_counter() - start)
            times[name].append(statistics.median(samples))
    print(f"{args.workload}, {args.balancer}, representation mode, {torch.get_num_threads()} threads")
    for name, values in times.items():
        ratio = statistics.median(a / b for a, b in zip(values, times["static"]))
        print(f"{name:14s} {statistics.median(values) * 1e3:.3f} ms  {ratio:.3f}x")


if __name__ == "__main__":
    main()
