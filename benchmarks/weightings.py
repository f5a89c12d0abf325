"""Call cost of every Gramian weighting: ``balancer.weights(gramian)`` in a tight loop.

For each ``GramianBalancer`` of ``lightning_mtl.balancers.BALANCERS`` (every one the installed
solvers allow) and K = 2, 10, 40, the script times the call the module makes once per step,
``balancer.weights(gramian)`` (GradNorm: ``weights(gramian, losses)``), on a float32 K × K Gramian on
the CPU, as the module hands it. Next to it, the corresponding torchjd weighting where torchjd has one,
called on the same Gramian (``MGDAWeighting``, ``UPGradWeighting``, ``PCGradWeighting``, ...; Nash-MTL's
weighting takes a matrix and gets a K × K factor of the Gramian, as our former wrapper gave it; ConFIG
and GradNorm have no torchjd weighting).

Gramians: ``well``: ``G Gᵀ`` of K random Gaussian gradients in P = 4K dimensions with norms spread over
[0.1, 10] (full rank, conditioned by the norms); ``conflict``: the same, with every other gradient
turned against the mean of the previous ones (strong negative cosines, as in a conflicting step);
``opposed`` (only with ``--kinds``): issue 14's hard case, strongly opposed pairs of gradients with a small
common component (1e-2 to 1e-4 of their norm; the QP methods' active sets are largest there). A pool
of 16 Gramians of each kind is cycled through, so consecutive calls see different inputs (stateful
methods, e.g. Nash-MTL's warm start, see a realistic sequence).

Timing: each configuration (method, implementation, K, kind) is warmed up, then the rounds are
interleaved: every round runs every configuration for a batch of calls (about ``--target-ms``), each
call timed on its own; the table gives the median over all calls of all rounds (robust to the
preemptions of a shared machine, which a mean over a batch is not). The header also gives the time of
one elementwise NumPy and torch op on 10 numbers, before and after, to show how fast the machine ran. The budget (our call only): at most 50 µs at K = 2 and 300 µs
at K = 10; K = 40 has none. The header prints the load average before and after, since the machine may
be shared.

    python benchmarks/weightings.py                      # 15 rounds, every method, K = 2, 10, 40
    python benchmarks/weightings.py --rounds 5 --ks 2,10 --methods pcgrad,nashmtl --no-torchjd
    python benchmarks/weightings.py --rounds 5 --ks 2,10,40 --kinds opposed --no-torchjd
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torchjd.aggregation as jd

from lightning_mtl.balancers import BALANCERS, GradNorm, GramianBalancer

BUDGET_US = {2: 50.0, 10: 300.0}
POOL = 16
HAS_CVXPY = importlib.util.find_spec("cvxpy") is not None


def gramians(k: int, kind: str, seed: int) -> list[torch.Tensor]:
    """``POOL`` float32 Gramians of ``kind`` (``"well"``, ``"conflict"`` or ``"opposed"``) for K tasks."""
    generator = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(POOL):
        if kind == "opposed":
            G = opposed(k, 10 ** -float(torch.randint(2, 5, (1,), generator=generator)), generator)
            pool.append((G @ G.T).float())
            continue
        G = torch.randn(k, 4 * k, generator=generator, dtype=torch.float64)
        G = G / G.norm(dim=1, keepdim=True)
        if kind == "conflict":
            for i in range(1, k, 2):
                G[i] = G[i] - 1.5 * G[:i].mean(dim=0) / G[:i].mean(dim=0).norm()
                G[i] = G[i] / G[i].norm()
        G = G * 10 ** (torch.rand(k, 1, generator=generator, dtype=torch.float64) * 2 - 1)
        pool.append((G @ G.T).float())
    return pool


def opposed(k: int, common: float, generator: torch.Generator) -> torch.Tensor:
    """Issue 14's hard case: ``g_k = common · e_0 + r_k``, the ``r_k`` (unit norm, orthogonal to ``e_0``) summing to 0
    in nearly antipodal pairs (cosine near −1), ``common`` 1e-2 to 1e-4: the dual cone is a thin cone around ``e_0``."""
    R = torch.randn(k, 2 * k + 3, generator=generator, dtype=torch.float64)
    for i in range(1, k, 2):
        R[i] = -R[i - 1] + 0.01 * R[i]
    R[:, 0] = 0.0
    if k > 1:
        R -= R.mean(dim=0)
    R /= R.norm(dim=1, keepdim=True)
    R[:, 0] = common
    return R


def _factor(gramian: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(gramian)
    return vectors * values.clamp_min(0).sqrt()


def torchjd_call(name: str, k: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchjd's weighting for method ``name``, as a callable on the Gramian (None where it has none)."""
    simple = {
        "mgda": jd.MGDAWeighting,
        "upgrad": jd.UPGradWeighting,
        "dualproj": jd.DualProjWeighting,
        "pcgrad": jd.PCGradWeighting,
        "gradvac": jd.GradVacWeighting,
        "imtlg": jd.IMTLGWeighting,
        "alignedmtl": jd.AlignedMTLWeighting,
    }
    if name in simple:
        return simple[name]()
    if name == "cagrad" and HAS_CVXPY:
        return jd.CAGradWeighting(c=0.4)
    if name == "nashmtl" and HAS_CVXPY:
        weighting = jd.NashMTL(n_tasks=k).weighting
        return lambda gramian: weighting(_factor(gramian))
    return None


def our_call(name: str, k: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    cls = BALANCERS[name]
    try:
        balancer = cls()
    except ImportError:  # a solver this method needs is missing
        return None
    balancer.setup([f"t{i}" for i in range(k)])
    if isinstance(balancer, GradNorm):
        losses = torch.linspace(1.0, 2.0, k)
        return lambda gramian: balancer.weights(gramian, losses)
    return balancer.weights


def time_calls(
    call: Callable[[torch.Tensor], torch.Tensor], pool: list[torch.Tensor], calls: int, offset: int = 0
) -> list[float]:
    """Seconds of each of ``calls`` calls cycling through ``pool`` from ``offset``, timed one by one."""
    times = []
    clock = time.perf_counter
    for i in range(offset, offset + calls):
        gramian = pool[i % POOL]
        start = clock()
        call(gramian)
        times.append(clock() - start)
    return times


def calibration() -> tuple[float, float]:
    """Median µs of one NumPy and one torch elementwise op on 10 numbers: the machine's speed at the moment."""
    import numpy as np

    a, t = np.ones(10), torch.ones(10)
    numpy_times, torch_times = [], []
    for _ in range(21):
        start = time.perf_counter()
        for _ in range(1000):
            np.multiply(a, a)
        numpy_times.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        for _ in range(1000):
            torch.mul(t, t)
        torch_times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(numpy_times), statistics.median(torch_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--ks", default="2,10,40")
    parser.add_argument("--kinds", default="well,conflict")
    parser.add_argument("--methods", default="", help="comma-separated balancer names (default: every Gramian weighting)")
    parser.add_argument("--no-torchjd", action="store_true", help="time ours only")
    parser.add_argument("--target-ms", type=float, default=20.0, help="about this much time per configuration per round")
    args = parser.parse_args()

    names = [n for n, cls in BALANCERS.items() if issubclass(cls, GramianBalancer)]
    if args.methods:
        names = [n for n in names if n in args.methods.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    kinds = args.kinds.split(",")

    configs = []  # (name, impl, k, kind, call, pool, calls per round)
    skipped = []
    for k in ks:
        for kind in kinds:
            pool = gramians(k, kind, seed=k)
            for name in names:
                for impl, factory in (("ours", our_call), ("torchjd", torchjd_call)):
                    if impl == "torchjd" and args.no_torchjd:
                        continue
                    call = factory(name, k)
                    if call is None:
                        if impl == "ours":
                            skipped.append(name)
                        continue
                    start = time.perf_counter()  # warm-up: 2 x POOL calls, or 2 calls and half a second
                    for i in range(2 * POOL):
                        call(pool[i % POOL])
                        if i >= 1 and time.perf_counter() - start > 0.5:
                            break
                    per_call = statistics.median(time_calls(call, pool, 3))
                    calls = max(1, int(args.target_ms * 1e-3 / per_call))  # cvxpy at K = 40: one call a round
                    configs.append([name, impl, k, kind, call, pool, calls, []])

    load_before = os.getloadavg()
    calibrations = [calibration()]
    for round_ in range(args.rounds):
        for config in configs:
            _, _, _, _, call, pool, calls, samples = config
            samples.extend(time_calls(call, pool, calls, offset=round_ * calls))
    calibrations.append(calibration())
    load_after = os.getloadavg()

    medians = {(n, impl, k, kind): statistics.median(s) * 1e6 for n, impl, k, kind, _, _, _, s in configs}
    try:
        torchjd_version = importlib.metadata.version("torchjd")
    except importlib.metadata.PackageNotFoundError:
        torchjd_version = "?"
    print(f"# Weighting call cost, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), torchjd {torchjd_version}, "
        f"cvxpy {'installed' if HAS_CVXPY else 'missing'}"
    )
    print(f"load average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print("one elementwise op on 10 numbers (before, after): NumPy "
          + ", ".join(f"{n:.2f}" for n, _ in calibrations) + " µs, torch " + ", ".join(f"{t:.2f}" for _, t in calibrations) + " µs")
    print(f"median µs per call over all calls of {args.rounds} interleaved rounds; budget (ours): "
          + ", ".join(f"K={k} ≤ {b:.0f} µs" for k, b in BUDGET_US.items()))
    if skipped:
        print(f"skipped (a solver is missing): {', '.join(sorted(set(skipped)))}")
    print()
    header = "| method | " + " | ".join(f"K={k} {kind} ours / torchjd" for k in ks for kind in kinds) + " | budget |"
    print(header)
    print("| --- " * (2 + len(ks) * len(kinds)) + "|")
    for name in names:
        if (name, "ours", ks[0], kinds[0]) not in medians:
            continue
        cells, verdict = [], []
        for k in ks:
            for kind in kinds:
                ours = medians[(name, "ours", k, kind)]
                theirs = medians.get((name, "torchjd", k, kind))
                cells.append(f"{ours:.0f} / {theirs:.0f}" if theirs is not None else f"{ours:.0f} / —")
                if k in BUDGET_US and ours > BUDGET_US[k]:
                    verdict.append(f"K={k} {kind}")
        status = "pass" if not verdict else "FAIL (" + ", ".join(verdict) + ")"
        print(f"| {BALANCERS[name].__name__} | " + " | ".join(cells) + f" | {status} |")


if __name__ == "__main__":
    main()
