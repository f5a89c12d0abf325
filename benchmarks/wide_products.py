"""The K × K products of wide K × P matrices that a gradient-level step forms, and the present-task test.

Every parameter-mode step with a materialised Jacobian forms ``J Jᵀ`` (K × P, P up to millions); MoCo forms
the Gramian of its tracked gradients too, and MoCo and DB-MTL test which rows of ``G`` are not all zero. On
CPU a single ``mm`` with a K × K output and an inner dimension of P is slow and, in float32, inexact (one
long accumulation). This script times, for K = 2, 10, 40 and P = 131k, 525k, 2M (float32, random Gaussian
rows, contiguous as the module hands them):

- ``a @ a.T``, the plain product;
- ``lightning_mtl.gradients.row_products(a)``: the sum of the products of 8192-column chunks (one ``bmm``);

with the largest error of each relative to the largest entry of the float64 product; and the present-task
test: ``(G != 0).any(1)``, ``|G|.amax(1) != 0`` and ``lightning_mtl.balancers.base.nonzero_rows`` (``max``
and ``min`` of each row). Each figure is the median over ``--rounds`` interleaved rounds of the mean of a
batch of calls.

    python benchmarks/wide_products.py
    python benchmarks/wide_products.py --rounds 9 --ks 10 --widths 524800
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch

from lightning_mtl.balancers.base import nonzero_rows
from lightning_mtl.gradients import row_products


def mean_ms(call: Callable[[], object], repeats: int) -> float:
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ks", default="2,10,40")
    parser.add_argument("--widths", default="131072,524800,2000000")
    args = parser.parse_args()
    shapes = [(int(k), int(p)) for k in args.ks.split(",") for p in args.widths.split(",")]
    generator = torch.Generator().manual_seed(0)
    matrices = {shape: torch.randn(*shape, generator=generator) for shape in shapes}
    calls: dict[tuple[str, tuple[int, int]], Callable[[], object]] = {}
    for shape, a in matrices.items():
        calls["a @ a.T", shape] = lambda a=a: a @ a.T
        calls["row_products", shape] = lambda a=a: row_products(a)
        calls["(G != 0).any(1)", shape] = lambda a=a: (a != 0).any(dim=1)
        calls["|G|.amax(1) != 0", shape] = lambda a=a: a.abs().amax(dim=1) != 0
        calls["nonzero_rows", shape] = lambda a=a: nonzero_rows(a)
    times: dict[tuple[str, tuple[int, int]], list[float]] = {key: [] for key in calls}
    for _ in range(args.rounds):
        for key, call in calls.items():
            repeats = max(3, int(2e8 // (key[1][0] * key[1][1] * 4 + 1)))  # about 200 MB read per batch
            times[key].append(mean_ms(call, min(repeats, 200)))
    print(
        f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC | torch {torch.__version__} | {platform.processor() or platform.machine()}"
        f" | threads {torch.get_num_threads()} | rounds {args.rounds}\n"
    )
    print("| K | P | a @ a.T, ms | error | row_products, ms | error | speed-up | any(G != 0), ms | abs.amax, ms | nonzero_rows, ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape, a in matrices.items():
        exact = a.double() @ a.double().T
        scale = exact.abs().max().item()
        error = {name: ((product.double() - exact).abs().max().item() / scale) for name, product in (("mm", a @ a.T), ("rp", row_products(a)))}
        ms = {name: statistics.median(times[name, shape]) for name, _ in calls if _ == shape}
        print(
            f"| {shape[0]} | {shape[1]} | {ms['a @ a.T']:.2f} | {error['mm']:.1e} | {ms['row_products']:.2f} | {error['rp']:.1e} | "
            f"{ms['a @ a.T'] / ms['row_products']:.1f}× | {ms['(G != 0).any(1)']:.2f} | {ms['|G|.amax(1) != 0']:.2f} | "
            f"{ms['nonzero_rows']:.2f} |"
        )


if __name__ == "__main__":
    main()
