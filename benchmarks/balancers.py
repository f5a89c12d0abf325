"""Step-time cost of every balancer in ``MultiTaskModule``, and of torchjd's own UPGrad / MGDA paths.

Workloads (shared-input batches ``(x, {task: y})``, cross-entropy heads 256→10):

- ``mlp-k2`` / ``mlp-k10`` / ``mlp-k40`` (W-MLP): backbone Linear 256→512→512→256 (ReLU), K = 2, 10 or 40 heads,
  batch 128;
- ``cnn-k2`` / ``cnn-k10`` / ``cnn-k40`` (W-CNN): 1×32×32 input, conv 32, 32, pool, 64, 64, pool (3×3, padding 1,
  ReLU), flatten, Linear → 256 (ReLU); K = 2, 10 or 40 heads, batch 64.

K = 40 is a CelebA-sized task count.

Configurations, all trained with Adam (lr 1e-3) in a plain PyTorch loop, no ``Trainer``:

- ours: ``loss = module.training_step(batch, 0)``, ``loss.backward()``, ``opt.step()``,
  ``opt.zero_grad()`` (``module.log`` is a no-op). Every loss-level balancer once (``--gradient-only``: none but
  Static); every gradient-level one in each mode of ``--modes`` (default both, ``gradients="parameters"`` and
  ``"representation"``), except parameter mode above K = 10 (no goal there, and costly: ``--k40-parameters`` runs
  it). FAMO's post-step loss update, which ``MultiTaskModule.optimizer_step`` does under a ``Trainer``, is done by
  the loop after ``opt.step()`` (one extra no-grad forward, part of FAMO's cost); Auto-Lambda's meta step, which
  ``MetaSteps`` does before the step under a ``Trainer``, by the loop before it, on held-out batches (its cost is the
  method's, so it has no goal; ``benchmarks/autolambda.py`` measures it apart).
- torchjd, UPGrad and MGDA, up to K = 10 (at K = 40 a step takes 18x Static on W-MLP, 50x on W-CNN):
  (a) ``autojac``: ``mtl_backward(losses, features=z)`` then ``jac_to_grad(backbone parameters, UPGrad())``;
  (b) ``autogram``: the Engine docstring's recipe, ``gramian = engine.compute_gramian(losses)``,
  ``weights = UPGradWeighting()(gramian)``, ``losses.backward(weights)``, with ``Engine(backbone, batch_dim=None)``:
  ``batch_dim=0`` rejects the K batch-mean task losses (the tensor it differentiates must be batched like the
  modules' outputs; the script prints the error). ``--autogram-b0`` adds (c) ``autogram-b0``: ``batch_dim=0`` on
  the B × K per-sample losses, whose (B·K)² Gramian is summed to the K × K one (slow, off by default).

Before timing, one SGD step of ours (UPGrad / MGDA, parameters mode) is compared with torchjd's (up to K = 10)
on the same batch and initial weights: autojac must give the same parameters (backbone and heads);
autogram the same backbone (its recipe gives head k a ``w_k``-scaled gradient, ours the plain one).
Balancer/mode pairs that ``MultiTaskModule`` refuses, or whose balancer cannot be built for a missing optional
package (none today: CAGrad and NashMTL needed cvxpy before their native versions), are skipped and listed; so are MoCo, DB-MTL and ExcessMTL in representation mode, which the module
refuses (they keep gradient state across steps). A configuration whose step raises is not run again and fails its
goal.

Goals, on the ratio to Static: loss level ≤ 1.05×; representation mode ≤ 1.1× (K = 2), ≤ 1.25× (K = 10), ≤ 1.6×
(K = 40); parameter mode ≤ 2× (K = 2), ≤ 5× (K = 10); ours faster than torchjd's paths. The last lines count
pass/total per goal and list every configuration that fails its goal.

Runs are interleaved: each round runs every configuration of a workload for ``--warmup`` then
``--steps`` steps (the CNN, ~20x costlier per step: ``--cnn-warmup`` / ``--cnn-steps``), in turn, in blocks
of 5 timed steps (each after 2 untimed ones) alternating with blocks of ``MultiTaskModule`` with static
weights (:func:`run_round`): a block's ratio is its median over the mean of the two Static blocks' medians
beside it, and a configuration's ratio for the round is the median over its blocks. This VM switches between
a fast and a slow state (1.6x apart, lasting seconds), so only a comparison made within a fraction of a
second is clean (until 2026-12-02 06:40 every ratio divided by one Static block at the start of the round;
until 08:55 by the Static blocks before and after the configuration's 30 steps). Reported: the median over
rounds of each configuration's per-round median step time, and the median over rounds of its per-round
ratio, with the quartiles of those ratios. For gradient-level
methods the balancer's own call (``weights`` for a Gramian weighting, ``forward`` for a direction
method) is timed inside every step, and the ratio is also given without that time: what the module
adds and what the wrapped method costs, apart. Ratios depend on what else is interleaved (a run with
fewer configurations measured the same code up to ±0.2 differently in parameter mode): compare
figures from one run. Most of that is glibc's malloc: parameter mode allocates the K × P Jacobian
every step, and with the default (dynamic) thresholds glibc may hand such blocks back to the OS and
page-fault them in again at the next step, depending on what ran before. Run with

    MALLOC_MMAP_THRESHOLD_=4294967295 MALLOC_TRIM_THRESHOLD_=4294967295 python benchmarks/balancers.py

(or jemalloc / tcmalloc through LD_PRELOAD) for figures that do not depend on the interleaving; the
header records the allocator settings of a run.

    python benchmarks/balancers.py                       # defaults: 5 rounds x 30 steps, all workloads
    python benchmarks/balancers.py --rounds 1 --steps 3 --workloads mlp-k2 --balancers upgrad,mgda
    python benchmarks/balancers.py --workloads mlp-k40 --modes representation --balancers upgrad,mgda

Issue 14's whole-step table (every gradient-level balancer, both W-MLP and W-CNN, K = 2, 10, 40, one interleaved
run): about 35 min on one thread of a loaded 2-core machine (from a smoke run's step times: W-CNN K = 10, ~36
configurations at 0.1–2 s a step, is nearly half of it; W-MLP ~7 min in all)

    MALLOC_MMAP_THRESHOLD_=4294967295 MALLOC_TRIM_THRESHOLD_=4294967295 python benchmarks/balancers.py --rounds 5 \\
        --gradient-only --workloads mlp-k2,mlp-k10,mlp-k40,cnn-k2,cnn-k10,cnn-k40

    python benchmarks/balancers.py --profile mlp-k10:upgrad:parameters,mlp-k10:upgrad:torchjd-autojac --steps 30
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import importlib.metadata
import io
import itertools
import os
import platform
import pstats
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchjd.autogram
import torchjd.autojac
from torch import nn
from torchjd.aggregation import MGDA as TorchjdMGDA
from torchjd.aggregation import MGDAWeighting, UPGradWeighting
from torchjd.aggregation import UPGrad as TorchjdUPGrad

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.balancers import BALANCERS, Balancer

# ---------------------------------------------------------------------------------------- workloads


def mlp_backbone() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU())


def cnn_backbone() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 256), nn.ReLU(),
    )  # fmt: skip


@dataclass(frozen=True)
class Workload:
    name: str
    num_tasks: int
    batch: int
    input_shape: tuple[int, ...]
    backbone: Callable[[], nn.Module]

    def batches(self, count: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(count):
            x = torch.randn(self.batch, *self.input_shape, generator=g)
            labels = {f"t{k}": torch.randint(0, 10, (self.batch,), generator=g) for k in range(self.num_tasks)}
            out.append((x, labels))
        return out


WORKLOADS = {
    "mlp-k2": Workload("W-MLP", 2, 128, (256,), mlp_backbone),
    "mlp-k10": Workload("W-MLP", 10, 128, (256,), mlp_backbone),
    "mlp-k40": Workload("W-MLP", 40, 128, (256,), mlp_backbone),
    "cnn-k2": Workload("W-CNN", 2, 64, (1, 32, 32), cnn_backbone),
    "cnn-k10": Workload("W-CNN", 10, 64, (1, 32, 32), cnn_backbone),
    "cnn-k40": Workload("W-CNN", 40, 64, (1, 32, 32), cnn_backbone),
}
#: Workloads with more tasks than this run neither parameter mode (unless ``--k40-parameters``: no goal there, and
#: costly) nor torchjd's paths (18x Static per step on W-MLP K=40, 50x on W-CNN K=40, and the same answer).
MAX_TASKS_PARAMETERS = MAX_TASKS_TORCHJD = 10

# ---------------------------------------------------------------------------------------- models


class Plain(nn.Module):
    """Backbone + K heads, for torchjd's own paths (no lightning-mtl code involved)."""

    def __init__(self, backbone: nn.Module, heads: list[nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)

    def losses(self, batch: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, labels = batch
        z = self.backbone(x)
        return z, [F.cross_entropy(head(z), labels[f"t{k}"]) for k, head in enumerate(self.heads)]


def build_module(workload: Workload, balancer: Balancer | None, mode: str) -> MultiTaskModule:
    torch.manual_seed(0)  # every configuration starts from the same weights
    tasks = [Task(f"t{k}", nn.Linear(256, 10), nn.CrossEntropyLoss()) for k in range(workload.num_tasks)]
    module = MultiTaskModule(workload.backbone(), tasks, balancer=balancer, gradients=mode)
    module.log = lambda *args, **kwargs: None  # no Trainer: logging is a no-op
    module.train()
    return module


def plain_copy(module: MultiTaskModule) -> Plain:
    return Plain(copy.deepcopy(module.backbone), [copy.deepcopy(module.heads[name]) for name in module.task_names])


def our_step(
    module: MultiTaskModule, optimizer: torch.optim.Optimizer, meta_batches: list[Any] | None = None
) -> Callable[[Any], None]:
    """One training step of ``module``; with ``meta_batches``, a balancer that learns from held-out batches
    (Auto-Lambda) first gets its meta step when it is due, on the next of them, as ``MetaSteps`` does under a
    ``Trainer`` (without putting the buffers back: the workloads have none)."""
    forward = module.task_forward
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer_steps = itertools.count()

    def task_losses(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        _, predictions = forward.run(forward.groups(batch))
        return forward.stack_losses({p[0]: forward.loss(*p)[0] for p in predictions})

    def step(batch: Any) -> None:
        balancer = module.balancer
        if meta_batches is not None and balancer.meta_step_due(next(optimizer_steps)):
            meta_batch = meta_batches[balancer.meta_batches % len(meta_batches)]
            balancer.meta_step(task_losses, parameters, batch, meta_batch, optimizer.param_groups[0]["lr"])
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        if module._last_batch is not None:  # FAMO: what MultiTaskModule.optimizer_step does under a Trainer
            with torch.no_grad():
                _, predictions = forward.run(forward.groups(module._last_batch))
                losses = torch.stack([forward.loss(*prediction)[0] for prediction in predictions]).float()
            module.balancer.after_optimizer_step(losses)
            module._last_batch = None
        optimizer.zero_grad()

    return step


def autojac_step(model: Plain, optimizer: torch.optim.Optimizer, aggregator: Any) -> Callable[[Any], None]:
    shared = list(model.backbone.parameters())

    def step(batch: Any) -> None:
        z, losses = model.losses(batch)
        torchjd.autojac.mtl_backward(losses, features=z)
        torchjd.autojac.jac_to_grad(shared, aggregator)
        optimizer.step()
        optimizer.zero_grad()

    return step


def autogram_step(model: Plain, optimizer: torch.optim.Optimizer, weighting: Any) -> Callable[[Any], None]:
    """The Engine docstring's recipe on the K task losses.

    ``batch_dim=None``: with ``batch_dim=0`` the Engine requires the differentiated tensor to be
    batched on dim 0 like the modules' outputs, and rejects the K batch-mean losses (see
    :func:`autogram_batch_dim_error`).
    """
    engine = torchjd.autogram.Engine(model.backbone, batch_dim=None)  # once, before any backward

    def step(batch: Any) -> None:
        _, losses = model.losses(batch)
        losses = torch.stack(losses)
        gramian = engine.compute_gramian(losses)
        weights = weighting(gramian)
        losses.backward(weights)
        optimizer.step()
        optimizer.zero_grad()

    return step


def autogram_per_sample_step(model: Plain, optimizer: torch.optim.Optimizer, weighting: Any) -> Callable[[Any], None]:
    """``Engine(backbone, batch_dim=0)`` on the B × K per-sample losses, reduced to the K × K Gramian.

    The Gramian of the mean losses is ``(1/B²) Σ_{i,j}`` of the (i, j) blocks of the (B·K) × (B·K)
    per-sample Gramian; the weights then multiply the mean losses, so the update is UPGrad's (MGDA's)
    on the K task losses, like the other paths.
    """
    engine = torchjd.autogram.Engine(model.backbone, batch_dim=0)
    k = len(model.heads)

    def step(batch: Any) -> None:
        x, labels = batch
        z = model.backbone(x)
        per_sample = torch.stack(
            [F.cross_entropy(head(z), labels[f"t{i}"], reduction="none") for i, head in enumerate(model.heads)], dim=1
        )  # B x K
        b = per_sample.shape[0]
        gramian = engine.compute_gramian(per_sample).reshape(b, k, b, k).sum(dim=(0, 2)) / b**2
        weights = weighting(gramian)
        per_sample.mean(dim=0).backward(weights)
        optimizer.step()
        optimizer.zero_grad()

    return step


def autogram_batch_dim_error(workload: Workload) -> str:
    """What ``Engine(backbone, batch_dim=0).compute_gramian(losses)`` says for the K task losses."""
    model = plain_copy(build_module(workload, None, "parameters"))
    engine = torchjd.autogram.Engine(model.backbone, batch_dim=0)
    _, losses = model.losses(workload.batches(1)[0])
    try:
        engine.compute_gramian(torch.stack(losses))
    except Exception as error:  # noqa: BLE001 - reported, not handled
        return f"{type(error).__name__}: {error}"
    return "no error"


PATHS = {"autojac": autojac_step, "autogram": autogram_step, "autogram-b0": autogram_per_sample_step}
TORCHJD = {  # balancer name -> (aggregator for autojac, weighting for autogram)
    "upgrad": (TorchjdUPGrad, UPGradWeighting),
    "mgda": (TorchjdMGDA, MGDAWeighting),
}

# ---------------------------------------------------------------------------------------- configurations


@dataclass
class Config:
    workload: str
    balancer: str  # display name
    mode: str  # "parameters" / "representation" / "-" (loss level) / torchjd path
    level: str  # "loss", "gradient" or "torchjd"
    step: Callable[[Any], None]
    key: str = ""  # name:mode, for --profile and the comparisons
    stopwatch: Stopwatch | None = None  # gradient level: times the method's own weighting call
    meta: bool = False  # preceded by the balancer's meta step on held-out batches (Auto-Lambda)
    error: str = ""  # the exception a step raised: not run again, and it fails its goal
    per_round: list[float] = field(default_factory=list)  # median seconds per step, one per round
    ratios: list[float] = field(default_factory=list)
    # median over a round's steps of (step time - time in the method's weighting call), one per round
    machinery_per_round: list[float] = field(default_factory=list)
    machinery_ratios: list[float] = field(default_factory=list)


class Stopwatch:
    """Wraps a balancer's own call (``weights`` for a Gramian weighting, ``forward`` for a direction
    method) and adds up the time spent in it: what the method's math costs inside the real step."""

    def __init__(self, balancer: Balancer) -> None:
        self.total = 0.0
        name = "weights" if balancer.needs == "gramian" else "forward"
        call = getattr(balancer, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - start

        setattr(balancer, name, timed)


def make_balancer(name: str) -> Balancer | None:
    """An instance of the registered balancer, or None if its optional solver is missing."""
    try:
        return BALANCERS[name]()
    except ImportError:
        return None


#: Why a balancer/mode pair is not timed -> the workloads where it is not (printed once per pair and reason).
Skipped = dict[tuple[str, str], list[str]]


def configurations(
    workload_key: str,
    names: list[str],
    skipped: Skipped,
    paths: tuple[str, ...] = ("autojac", "autogram"),
    modes: tuple[str, ...] = ("parameters", "representation"),
    large_k_parameters: bool = False,
) -> list[Config]:
    """Static first, then each of ``names``: loss-level ones once, gradient-level ones in each of ``modes``
    (parameter mode above ``MAX_TASKS_PARAMETERS`` tasks only with ``large_k_parameters``), then torchjd's
    ``paths`` for UPGrad / MGDA (up to ``MAX_TASKS_TORCHJD`` tasks). What is not run is added to ``skipped``."""
    workload = WORKLOADS[workload_key]
    configs = []
    for name in ["static"] + [n for n in names if n != "static"]:
        probe = make_balancer(name)
        if probe is None:
            skipped.setdefault((name, "optional solver (cvxpy) not installed"), []).append(workload_key)
            continue
        display = type(probe).__name__
        wanted = ["-"] if probe.needs == "losses" else [m for m in ("parameters", "representation") if m in modes]
        run = []
        for mode in wanted:
            if mode == "parameters" and workload.num_tasks > MAX_TASKS_PARAMETERS and not large_k_parameters:
                why = f"parameter mode above K = {MAX_TASKS_PARAMETERS}: no goal, and costly (--k40-parameters runs it)"
                skipped.setdefault((f"{name} ({mode})", why), []).append(workload_key)
            else:
                run.append(mode)
        for mode in run:
            balancer = probe if mode == run[0] else make_balancer(name)
            try:
                module = build_module(workload, balancer, "parameters" if mode == "-" else mode)
            except ValueError as error:  # a combination the module refuses
                why = f"MultiTaskModule refuses it: {error}"
                skipped.setdefault((f"{name} ({mode})", why), []).append(workload_key)
                continue
            optimizer = module.configure_optimizers()
            meta = balancer.needs_meta_batches
            step = our_step(module, optimizer, workload.batches(seed=1) if meta else None)
            level = "loss" if mode == "-" else "gradient"
            stopwatch = Stopwatch(module.balancer) if level == "gradient" else None
            configs.append(Config(workload_key, display, mode, level, step, f"{name}:{mode}", stopwatch, meta))
    for name, (aggregator, weighting) in TORCHJD.items():
        if name not in names:
            continue
        if workload.num_tasks > MAX_TASKS_TORCHJD and paths:
            why = f"above K = {MAX_TASKS_TORCHJD}: 18x (W-MLP) to 50x (W-CNN) Static per step at K = 40"
            skipped.setdefault((f"{name} (torchjd {', '.join(paths)})", why), []).append(workload_key)
            continue
        display = type(make_balancer(name)).__name__
        for path in paths:
            model = plain_copy(build_module(workload, None, "parameters"))
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            step = PATHS[path](model, optimizer, aggregator() if path == "autojac" else weighting())
            configs.append(Config(workload_key, display, f"torchjd {path}", "torchjd", step, f"{name}:torchjd-{path}"))
    return configs


# ---------------------------------------------------------------------------------------- equivalence check


def check_against_torchjd(workload_key: str, name: str, paths: tuple[str, ...]) -> list[str]:
    """One SGD step (lr 0.1) of ours (parameters mode) and of each torchjd path, from the same weights."""
    workload = WORKLOADS[workload_key]
    batch = workload.batches(1, seed=123)[0]
    aggregator, weighting = TORCHJD[name]
    ours = build_module(workload, make_balancer(name), "parameters")
    theirs = {path: plain_copy(ours) for path in paths}
    start = plain_copy(ours)
    sgd = torch.optim.SGD(ours.parameters(), lr=0.1)
    ours.training_step(batch, 0).backward()
    sgd.step()
    for path, model in theirs.items():
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        PATHS[path](model, sgd, aggregator() if path == "autojac" else weighting())(batch)

    def compare(a: nn.Module, b: nn.Module) -> str:
        pairs = list(zip(a.parameters(), b.parameters()))
        worst = max(float((p - q).detach().abs().max()) for p, q in pairs)
        same = all(torch.allclose(p, q, rtol=1e-4, atol=1e-6) for p, q in pairs)
        return f"{'allclose' if same else 'DIFFERENT'} (max |Δθ| {worst:.1e})"

    def step_norm(model: nn.Module) -> float:  # the backbone's update, lr times the norm of the direction J^T w
        return float(sum((p - q).detach().pow(2).sum() for p, q in zip(model.backbone.parameters(), start.backbone.parameters())) ** 0.5)

    our_heads = nn.ModuleList(ours.heads[n] for n in ours.task_names)
    lines = []
    for path, model in theirs.items():
        note = "" if path == "autojac" else "; expected to differ: torchjd's recipe scales head k's gradient by w_k"
        if name == "mgda":  # MGDA's direction is the min-norm point: the smaller update is the more exact one
            a, b = step_norm(ours), step_norm(model)
            if abs(a - b) <= 1e-6 * max(a, b):  # float32 parameters: the norms agree to their rounding
                verdict = "the same to float32 rounding"
            else:
                verdict = "ours is closer to it" if a < b else "torchjd's is closer to it: a defect of ours"
            note += f"; backbone step norm ours {a:.7e}, torchjd {b:.7e} (MGDA is the min-norm point: {verdict})"
        lines.append(
            f"check {workload.name} K={workload.num_tasks} {type(ours.balancer).__name__}, one SGD step, ours "
            f"(parameters) vs torchjd {path}: backbone {compare(ours.backbone, model.backbone)}, heads "
            f"{compare(our_heads, model.heads)}{note}"
        )
    return lines


# ---------------------------------------------------------------------------------------- timing


def time_steps(
    step: Callable[[Any], None], batches: list[Any], warmup: int, steps: int, stopwatch: Stopwatch | None = None
) -> tuple[list[float], list[float]]:
    """Each step's time, and each step's time less the time in the method's weighting call, after ``warmup`` steps."""
    for i in range(warmup):
        step(batches[i % len(batches)])
    times, machinery = [], []
    for i in range(steps):
        batch = batches[i % len(batches)]
        inside = stopwatch.total if stopwatch is not None else 0.0
        start = time.perf_counter()
        step(batch)
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        machinery.append(elapsed - ((stopwatch.total - inside) if stopwatch is not None else 0.0))
    return times, machinery


#: Timed steps per block of the alternation in :func:`run_round`, and untimed steps before each block.
BLOCK_STEPS, BLOCK_WARMUP = 5, 2


def run_round(configs: list[Config], batches: list[Any], warmup: int, steps: int) -> None:
    """One round of a workload: every configuration in turn, each in short blocks alternating with Static's.

    This VM runs in a fast and a slow state (Static's W-MLP K = 2 step: 4.9 or 8.6 ms; consecutive steps are
    in the same state with correlation 0.72, 30-step block medians with 0.90, and a state lasts seconds). So a
    configuration's ``steps`` timed steps are cut into blocks of :data:`BLOCK_STEPS` (the last one shorter if
    ``steps`` is not a multiple), each after
    :data:`BLOCK_WARMUP` untimed steps (which also take the caches back from the other model), alternating with
    Static's blocks: S C S C ... S. Each C block's ratio is its median over the mean of the medians of the two S
    blocks beside it (about 40 ms away on W-MLP, well inside a state), and the configuration's ratio for the
    round is the median over its blocks. A block pair that straddles a change of state is an outlier the
    median ignores. Static's figure for the round is the median of all its steps.
    """
    static = configs[0]
    size = max(1, min(BLOCK_STEPS, steps))
    sizes = [size] * (steps // size) + ([steps % size] if steps % size else [])  # every timed step, the last block shorter
    static_times: list[float] = []

    def static_block(first: bool, count: int) -> float:  # not guarded: if Static itself fails, the run stops
        times, _ = time_steps(static.step, batches, warmup if first else BLOCK_WARMUP, count)
        static_times.extend(times)
        return statistics.median(times)

    for config in configs[1:]:
        if config.error:
            continue
        before = static_block(first=True, count=size)
        times, machinery, ratios, machinery_ratios = [], [], [], []
        for block, count in enumerate(sizes):
            try:
                block_times, block_machinery = time_steps(
                    config.step, batches, warmup if block == 0 else BLOCK_WARMUP, count, config.stopwatch
                )
            except Exception as error:  # noqa: BLE001 - reported with the results, counted as a failed goal
                config.error = f"{type(error).__name__}: {error}"
                print(f"error in {config.workload} {config.key}, not run again: {config.error}", flush=True)
                break
            after = static_block(first=False, count=count)
            reference = (before + after) / 2
            ratios.append(statistics.median(block_times) / reference)
            machinery_ratios.append(statistics.median(block_machinery) / reference)
            times += block_times
            machinery += block_machinery
            before = after
        if config.error:
            continue
        config.per_round.append(statistics.median(times))
        config.machinery_per_round.append(statistics.median(machinery))
        config.ratios.append(statistics.median(ratios))
        config.machinery_ratios.append(statistics.median(machinery_ratios))
    if not static_times:  # no other configuration: Static alone
        static_block(first=True, count=steps)
    static.per_round.append(statistics.median(static_times))
    static.machinery_per_round.append(static.per_round[-1])
    static.ratios.append(1.0)
    static.machinery_ratios.append(1.0)


def quartiles(values: list[float]) -> str:
    """First and third quartile of the per-round ratios: how much a ratio moves from round to round."""
    if len(values) < 2:
        return "-"
    first, _, third = statistics.quantiles(values, n=4)
    return f"{first:.2f}–{third:.2f}"


#: Bounds on the step-time ratio to Static: a loss-level balancer's, and a gradient mode's by the number of tasks K,
#: as ``(largest K, bound)`` pairs (issue 14; no goal above the last K listed).
LOSS_GOAL = 1.05
GRADIENT_GOALS = {
    "representation": ((2, 1.1), (10, 1.25), (40, 1.6)),
    "parameters": ((2, 2.0), (10, 5.0)),
}


def goal(config: Config, num_tasks: int) -> float | None:
    """The bound on ``config``'s ratio to Static; None where there is none (Static, torchjd's paths, Auto-Lambda whose
    meta step is a lookahead of its own, measured by ``benchmarks/autolambda.py``, parameter mode above K = 10)."""
    if config.level == "loss":
        return None if config.balancer == "Static" or config.meta else LOSS_GOAL
    for largest, bound in GRADIENT_GOALS.get(config.mode, ()):
        if num_tasks <= largest:
            return bound
    return None


def goal_name(config: Config, num_tasks: int) -> str:
    """The goal ``config`` is held to, as the summary counts them: level or mode, and the bound."""
    bound = goal(config, num_tasks)
    return f"{'loss level' if config.level == 'loss' else config.mode} ≤ {bound:g}×"


def versions() -> str:
    return (
        f"python {platform.python_version()} | torch {torch.__version__} | lightning {L.__version__} | "
        f"torchjd {importlib.metadata.version('torchjd')}"
    )


def allocator() -> str:
    """The environment that decides how glibc's malloc returns large blocks to the OS (see RESULTS.md)."""
    keys = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")
    given = [f"{key}={os.environ[key]}" for key in keys if key in os.environ]
    return ", ".join(given) if given else "glibc defaults (no MALLOC_* / LD_PRELOAD set)"


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def profile(specs: list[str], warmup: int, steps: int, top: int) -> None:
    """cProfile ``steps`` steps of each ``workload:balancer:mode`` configuration; print the top functions."""
    for spec in specs:
        workload_key, name, mode = spec.split(":")
        skipped: Skipped = {}
        configs = configurations(workload_key, [name], skipped, tuple(PATHS), large_k_parameters=True)
        configs = [c for c in configs if c.key == f"{name}:{mode}"]
        if not configs:
            raise SystemExit(
                f"no configuration {spec!r}; modes: -, parameters, representation, "
                + ", ".join(f"torchjd-{path}" for path in PATHS)
                + "".join(f"; skipped {what}: {why}" for what, why in skipped)
            )
        step = configs[0].step
        batches = WORKLOADS[workload_key].batches()
        for i in range(warmup):
            step(batches[i % len(batches)])
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        for i in range(steps):
            step(batches[i % len(batches)])
        profiler.disable()
        elapsed = (time.perf_counter() - start) / steps * 1e3
        for sort in ("cumulative", "tottime"):
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).strip_dirs().sort_stats(sort).print_stats(top)
            print(f"\n### profile {spec}: {steps} steps, {elapsed:.2f} ms/step (profiled), sorted by {sort}\n")
            print("```")
            print(stream.getvalue().strip())
            print("```")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--cnn-steps", type=int, default=6, help="timed steps per round for the cnn-* workloads")
    parser.add_argument("--cnn-warmup", type=int, default=2, help="warm-up steps per round for the cnn-* workloads")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, from {list(WORKLOADS)}")
    parser.add_argument("--balancers", default="all", help="comma-separated names (static is always run), or all")
    parser.add_argument(
        "--modes",
        default="parameters,representation",
        help="comma-separated gradient modes of the gradient-level balancers",
    )
    parser.add_argument(
        "--k40-parameters",
        action="store_true",
        help=f"also run parameter mode on workloads with K > {MAX_TASKS_PARAMETERS} (no goal there; costly)",
    )
    parser.add_argument(
        "--gradient-only", action="store_true", help="only Static and the gradient-level balancers (no loss-level ones)"
    )
    parser.add_argument("--profile", default="", help="comma-separated workload:balancer:mode to cProfile instead")
    parser.add_argument("--top", type=int, default=25, help="--profile: functions listed")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--autogram-b0",
        action="store_true",
        help="also time torchjd's Engine(batch_dim=0) on the B x K per-sample losses (slow: a (BK)^2 Gramian)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = ("autojac", "autogram") + (("autogram-b0",) if args.autogram_b0 else ())

    workload_keys = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workload_keys if w not in WORKLOADS]
    names = list(BALANCERS) if args.balancers == "all" else [b.strip().lower() for b in args.balancers.split(",")]
    unknown += [n for n in names if n not in BALANCERS]
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown += [m for m in modes if m not in GRADIENT_GOALS]
    if unknown:
        raise SystemExit(
            f"unknown workload/balancer/mode {unknown}; workloads {list(WORKLOADS)}, balancers {list(BALANCERS)}, "
            f"modes {list(GRADIENT_GOALS)}"
        )
    if args.gradient_only:
        names = [n for n in names if BALANCERS[n].needs != "losses"]

    print(f"# lightning-mtl balancer step times — {datetime.now().isoformat(timespec='seconds')}")
    print(
        f"# {platform.platform()} | {platform.processor() or platform.machine()} | {os.cpu_count()} CPUs | "
        f"torch.get_num_threads() = {torch.get_num_threads()}"
    )
    print(f"# {versions()}")
    print(f"# load average at start (1, 5, 15 min): {load()}")
    print(f"# allocator: {allocator()}")
    if args.profile:
        profile([s.strip() for s in args.profile.split(",") if s.strip()], args.warmup, args.steps, args.top)
        return
    print(
        f"# rounds {args.rounds} x steps {args.steps} (warm-up {args.warmup}; cnn {args.cnn_steps}, warm-up "
        f"{args.cnn_warmup}) | threads {torch.get_num_threads()} | workloads {','.join(workload_keys)} | "
        f"balancers {args.balancers}{' (gradient level only)' if args.gradient_only else ''} | modes {','.join(modes)}"
        f"{' | --k40-parameters' if args.k40_parameters else ''}"
    )
    print()
    torchjd_keys = [w for w in workload_keys if WORKLOADS[w].num_tasks <= MAX_TASKS_TORCHJD]
    if any(name in names for name in TORCHJD) and torchjd_keys:
        error = autogram_batch_dim_error(WORKLOADS[torchjd_keys[0]])
        print(f"torchjd Engine(backbone, batch_dim=0).compute_gramian(<K task losses>) -> {error}")
        print("so 'torchjd autogram' uses batch_dim=None (same recipe otherwise)" + (
            "; 'torchjd autogram-b0' uses batch_dim=0 on the B x K per-sample losses" if args.autogram_b0 else ""
        ))
    for workload_key in workload_keys:
        for name in TORCHJD:
            if name not in names:
                continue
            if workload_key in torchjd_keys:
                for line in check_against_torchjd(workload_key, name, paths):
                    print(line)
            else:
                print(f"check {workload_key} {name} against torchjd: not run above K = {MAX_TASKS_TORCHJD}")

    skipped: Skipped = {}
    plan = {w: configurations(w, names, skipped, paths, modes, args.k40_parameters) for w in workload_keys}
    batches = {w: WORKLOADS[w].batches() for w in workload_keys}
    for (what, why), where in skipped.items():
        print(f"skipped {what} on {', '.join(where)}: {why}")
    started = time.perf_counter()
    for r in range(args.rounds):
        for workload_key, configs in plan.items():
            cnn = workload_key.startswith("cnn")
            warmup, steps = (args.cnn_warmup, args.cnn_steps) if cnn else (args.warmup, args.steps)
            run_round(configs, batches[workload_key], warmup, steps)
        print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s, load {load()})", flush=True)

    print()
    print(
        "| workload | K | balancer | mode | ms/step | ratio to static | ratio, quartiles over rounds | goal | "
        "method's own call, ms | ratio without it | goal without it |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    verdicts: dict[str, list[bool]] = {}  # goal name -> pass/fail of each configuration held to it
    machinery_verdicts: dict[str, list[bool]] = {}
    failures = []
    for workload_key, configs in plan.items():
        workload = WORKLOADS[workload_key]
        for config in configs:
            where = f"{workload.name} K={workload.num_tasks} | {config.balancer} | {config.mode}"
            bound = goal(config, workload.num_tasks)
            if config.error:
                if bound is not None:
                    verdicts.setdefault(goal_name(config, workload.num_tasks), []).append(False)
                    failures.append(f"| {where} | error: {config.error} | ≤ {bound:g}× |")
                print(f"| {workload.name} | {workload.num_tasks} | {config.balancer} | {config.mode} | error: "
                      f"{config.error} | | | {'' if bound is None else 'FAIL'} | | | |")  # fmt: skip
                continue
            ms = statistics.median(config.per_round) * 1e3
            ratio = statistics.median(config.ratios)
            verdict = "" if bound is None else f"≤ {bound:g}× {'pass' if ratio <= bound else 'FAIL'}"
            if bound is not None:
                verdicts.setdefault(goal_name(config, workload.num_tasks), []).append(ratio <= bound)
                if ratio > bound:
                    failures.append(f"| {where} | {ratio:.2f}× | ≤ {bound:g}× |")
            own = without = machinery_verdict = ""
            if config.stopwatch is not None:
                machinery_ms = statistics.median(config.machinery_per_round) * 1e3
                machinery_ratio = statistics.median(config.machinery_ratios)
                own, without = f"{ms - machinery_ms:.2f}", f"{machinery_ratio:.2f}×"
                if bound is not None:
                    machinery_verdict = f"{'pass' if machinery_ratio <= bound else 'FAIL'}"
                    name = goal_name(config, workload.num_tasks)
                    machinery_verdicts.setdefault(name, []).append(machinery_ratio <= bound)
            print(
                f"| {workload.name} | {workload.num_tasks} | {config.balancer} | {config.mode} | {ms:.2f} | "
                f"{ratio:.2f}× | {quartiles(config.ratios)} | {verdict} | {own} | {without} | {machinery_verdict} |"
            )
    if any(c.meta for configs in plan.values() for c in configs):
        print()
        print("AutoLambda: with its meta step (a lookahead on a held-out batch) before every step it asks for; no goal "
              "(its cost is the method's, measured apart by benchmarks/autolambda.py).")  # fmt: skip
    comparisons = [
        (workload_key, name, mode, path)
        for workload_key in plan
        for name in TORCHJD
        for mode in ("parameters", "representation")
        for path in paths
    ]
    rows = []
    for workload_key, name, mode, path in comparisons:
        by_key = {c.key: c for c in plan[workload_key] if not c.error}
        ours, theirs = by_key.get(f"{name}:{mode}"), by_key.get(f"{name}:torchjd-{path}")
        if ours is None or theirs is None:
            continue
        workload = WORKLOADS[workload_key]
        # both as ratios to the Static blocks beside them: raw step times from different moments of a round would
        # carry the VM's changes of speed
        ratio = statistics.median(a / b for a, b in zip(ours.ratios, theirs.ratios))
        like = "" if mode == "parameters" else " (not like-for-like: other Jacobian)"
        verdicts.setdefault("ours < torchjd", []).append(ratio < 1)
        if ratio >= 1:
            failures.append(f"| {workload.name} K={workload.num_tasks} | {ours.balancer} | {mode} vs torchjd {path} | "
                            f"{ratio:.2f}× | < 1× |")  # fmt: skip
        rows.append(
            f"| {workload.name} | {workload.num_tasks} | {ours.balancer} | {mode} | {path} | {ratio:.2f}× | "
            f"< 1× {'pass' if ratio < 1 else 'FAIL'}{like} |"
        )
    if rows:
        print()
        print("Ours against torchjd's own paths (median over rounds of the quotient of the two per-round ratios to Static; < 1: ours faster):")
        print()
        print("| workload | K | balancer | ours | torchjd | ours / torchjd | goal |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(rows))

    def counts(results: dict[str, list[bool]]) -> str:
        total = [v for results_of_goal in results.values() for v in results_of_goal]
        each = [f"{name}: {sum(results_of_goal)}/{len(results_of_goal)}" for name, results_of_goal in results.items()]
        return " | ".join(each + [f"all: {sum(total)}/{len(total)} pass"]) if total else "none held"

    print()
    print(f"goals: {counts(sort_goals(verdicts))}")
    print(f"gradient level without the method's own call: {counts(sort_goals(machinery_verdicts))}")
    print(f"total {time.perf_counter() - started:.0f} s | load average at end: {load()}")
    print()
    if failures:
        print(f"{len(failures)} configuration(s) FAIL their goal:")
        print()
        print("| workload | balancer | mode | ratio | goal |")
        print("| --- | --- | --- | --- | --- |")
        print("\n".join(failures))
    else:
        print("no configuration fails its goal")


def sort_goals(results: dict[str, list[bool]]) -> dict[str, list[bool]]:
    """Loss level, then each gradient mode's goals by K, then ours against torchjd."""
    order = [f"loss level ≤ {LOSS_GOAL:g}×"]
    order += [f"{mode} ≤ {bound:g}×" for mode, bounds in GRADIENT_GOALS.items() for _, bound in bounds]
    order += ["ours < torchjd"]
    return {name: results[name] for name in order if name in results}


if __name__ == "__main__":
    main()
