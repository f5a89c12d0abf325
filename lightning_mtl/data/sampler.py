"""The multi-task step schedule and its DDP sharding.

:class:`MultiTaskSampler` is a *batch sampler*: each item it yields is one training step, a list of
``(task, index)`` pairs, where ``index`` addresses a sample of that task's dataset. The pairs of one
task are contiguous, and tasks appear in the order of the ``sizes`` mapping.

Epoch length
------------
Let ``n[t]`` be the number of batches of task ``t`` in one pass over its data on this process:
``ceil(shard / batch_size[t])`` (``floor`` with ``drop_last=True``), where ``shard`` is the number of
samples of ``t`` this process owns (``ceil(len / world_size)``, see *DDP* below). One epoch is:

``zip``
    ``max(n)`` steps; every step holds a batch of every task. A task that runs out restarts with a
    fresh permutation (it *cycles*); the epoch ends when the longest task is exhausted.
``zip_shortest``
    ``min(n)`` steps; every step holds every task; the epoch ends when the shortest is exhausted.
``round_robin``
    ``sum(n)`` steps, one task per step in turn (``t1, t2, t3, t1, ...``); an exhausted task drops
    out of the rotation.
``proportional``
    ``sum(n)`` steps, one task per step, drawn independently with probability proportional to the
    task's dataset size (in samples). The epoch therefore has as many steps as one pass over all
    data, but a given task may be drawn more or fewer times than it has batches: when drawn more
    often it cycles, like ``zip``.
``temperature``
    Like ``proportional`` with probability proportional to ``size ** (1 / temperature)``:
    ``temperature=1`` is ``proportional``, larger values flatten the distribution towards uniform
    (``float("inf")`` is exactly uniform).
``sequential``
    ``sum(n)`` steps: all batches of the first task, then all of the second, ... in mapping order.

Determinism
-----------
The schedule (which tasks run at which step) and every per-task permutation are pure functions of
``(seed, epoch)`` (plus the task name and how many times the task has cycled). Nothing depends on
global random state, so two samplers built with the same arguments yield the same batches, and
every DDP process computes the same schedule without communicating. Call :meth:`set_epoch` at
the start of each epoch (Lightning does this for you) to get a new schedule and new permutations;
like :class:`~torch.utils.data.distributed.DistributedSampler`, iterating twice without it repeats
the same epoch. ``shuffle=False`` keeps every task's dataset order (the ``proportional`` and
``temperature`` draws are still random, seeded by ``(seed, epoch)``).

DDP
---
Each task's permutation is split across processes the way ``DistributedSampler`` does it: padded
by repeating its head to a multiple of ``world_size``, then process ``rank`` takes every
``world_size``-th index starting at ``rank``. All processes thus own equally many samples of each
task, have the same ``n[t]``, the same epoch length and the same schedule, so at every step they
process the same task(s) on disjoint samples (apart from the few padding duplicates) and no process
waits for another at a collective. With ``pad=False`` (used for prediction) nothing is duplicated
and processes may own different numbers of batches.

``rank`` and ``world_size`` may be given explicitly; if left ``None`` they are read from
:mod:`torch.distributed` every time they are needed (when it is initialized; otherwise a single
process is assumed), so a sampler built before the process group exists still shards correctly.

Resume
------
:meth:`resume` sets the epoch and a number of steps to skip on the next iteration. Skipped steps
only advance the per-task counters; no index lists are built and no data is loaded for them.
Iteration is lazy: the epoch and the skip are read at the first ``next()``, so that a
``DataLoader`` creating and discarding iterators (its multi-process iterator calls ``iter()`` on
the batch sampler twice) does not lose the skip.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping
from typing import Literal, Union, get_args

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

Sampling = Literal["zip", "zip_shortest", "round_robin", "proportional", "temperature", "sequential"]
"""A sampling mode's name; as a type hint it lets a config parser check the name and list the choices."""

SAMPLING_MODES: tuple[str, ...] = get_args(Sampling)

# Seed-sequence tags: keep the schedule stream apart from the permutation streams.
_SCHEDULE_STREAM = 0
_PERMUTATION_STREAM = 1


def _check_task_name(name: object) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(
            f"Task names must be non-empty strings without '/' (they become logged keys "
            f"'{{stage}}/{{task}}/{{metric}}'), got {name!r}."
        )
    return name


def _check_sampling(sampling: str) -> str:
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"Unknown sampling mode {sampling!r}; valid modes are {', '.join(SAMPLING_MODES)}.")
    return sampling


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"`temperature` must be a positive number (float('inf') for uniform), got {temperature!r}.")
    return float(temperature)


def _check_batch_size(batch_size: object, what: str) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"{what} must be a positive integer, got {batch_size!r}.")
    return batch_size


def _resolve_batch_sizes(batch_size: Union[int, Mapping[str, int]], tasks: list[str]) -> dict[str, int]:
    """One positive batch size per task; a mapping must name every task and nothing else."""
    if not isinstance(batch_size, Mapping):
        size = _check_batch_size(batch_size, "`batch_size`")
        return {task: size for task in tasks}
    missing = [task for task in tasks if task not in batch_size]
    if missing:
        raise ValueError(f"`batch_size` has no entry for task(s) {missing}; it names {list(batch_size)}.")
    unknown = [task for task in batch_size if task not in tasks]
    if unknown:
        raise ValueError(f"`batch_size` names unknown task(s) {unknown}; the tasks are {tasks}.")
    return {task: _check_batch_size(batch_size[task], f"`batch_size[{task!r}]`") for task in tasks}


def _shard_length(size: int, rank: int, world_size: int, pad: bool) -> int:
    if pad:
        return math.ceil(size / world_size)
    return len(range(rank, size, world_size))


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng([e % 2**64 for e in entropy])


class _TaskStream:
    """The batches of one task on one process, cycling with a fresh permutation per pass."""

    def __init__(
        self,
        name: str,
        size: int,
        batch_size: int,
        num_batches: int,
        *,
        seed: int,
        epoch: int,
        shuffle: bool,
        rank: int,
        world_size: int,
        pad: bool,
    ) -> None:
        self.name = name
        self.size = size
        self.batch_size = batch_size
        self.num_batches = num_batches
        self._entropy = (seed, epoch, _PERMUTATION_STREAM, zlib.crc32(name.encode()))
        self._shuffle = shuffle
        self._rank = rank
        self._world_size = world_size
        self._pad = pad
        self._cycle = -1
        self._shard = np.empty(0, dtype=np.int64)

    def _make_shard(self, cycle: int) -> np.ndarray:
        if self._shuffle:
            order = _rng(*self._entropy, cycle).permutation(self.size)
        else:
            order = np.arange(self.size)
        if self._pad:
            order = np.resize(order, math.ceil(self.size / self._world_size) * self._world_size)
        # Contiguous, so each batch below is a contiguous view (cheap to hand to torch).
        return np.ascontiguousarray(order[self._rank :: self._world_size])

    def indices(self, j: int) -> np.ndarray:
        """Indices of this task's ``j``-th batch of the epoch, as an integer array view (do not modify)."""
        cycle, b = divmod(j, self.num_batches)
        if cycle != self._cycle:
            self._shard, self._cycle = self._make_shard(cycle), cycle
        return self._shard[b * self.batch_size : (b + 1) * self.batch_size]

    def batch(self, j: int) -> list[int]:
        """Indices of this task's ``j``-th batch of the epoch (``j`` may exceed ``num_batches``)."""
        return self.indices(j).tolist()


class MultiTaskSampler(Sampler[list[tuple[str, int]]]):
    """Batch sampler yielding one multi-task step at a time as a list of ``(task, index)`` pairs.

    See the module docstring for the sampling modes, the epoch length, DDP sharding and resume.

    Args:
        sizes: number of samples of each task's dataset, in the task order to use.
        batch_size: one batch size for all tasks or a mapping with one per task.
        sampling: one of :data:`SAMPLING_MODES`.
        temperature: ``T`` of ``temperature`` sampling (ignored by the other modes); must be > 0.
        seed: seed of the schedule and of the permutations.
        shuffle: permute each task's samples every pass; ``False`` keeps dataset order.
        drop_last: drop each task's last incomplete batch (per process).
        pad: pad each task's samples to a multiple of ``world_size`` so every process gets the
            same number of batches (needed for training and for evaluation under DDP).
        rank, world_size: this process and the number of processes; ``None`` reads them from
            :mod:`torch.distributed` when it is initialized (else a single process).
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        batch_size: Union[int, Mapping[str, int]] = 32,
        sampling: str = "zip",
        temperature: float = 2.0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        pad: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if not sizes:
            raise ValueError("`sizes` is empty: a multi-task sampler needs at least one task.")
        self._tasks = [_check_task_name(task) for task in sizes]
        for task, size in sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(f"The size of task {task!r} must be a non-negative integer, got {size!r}.")
            if size == 0:
                raise ValueError(f"The dataset of task {task!r} is empty.")
        if (rank is None) != (world_size is None):
            raise ValueError("Give both `rank` and `world_size`, or neither.")
        if world_size is not None and (world_size < 1 or not 0 <= rank < world_size):
            raise ValueError(f"Invalid `rank={rank}` for `world_size={world_size}`.")
        self.sizes = dict(sizes)
        self.batch_sizes = _resolve_batch_sizes(batch_size, self._tasks)
        self.sampling = _check_sampling(sampling)
        self.temperature = _check_temperature(temperature)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pad = pad
        self._rank = rank
        self._world_size = world_size
        self._epoch = 0
        self._start = 0

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def rank(self) -> int:
        return self._replicas()[0]

    @property
    def world_size(self) -> int:
        return self._replicas()[1]

    @property
    def pending_start(self) -> int:
        """Steps the next iteration will skip (set by :meth:`resume`, cleared by starting an iteration)."""
        return self._start

    def _replicas(self) -> tuple[int, int]:
        if self._world_size is not None:
            return self._rank, self._world_size  # type: ignore[return-value]
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose schedule the next iteration yields.

        Changing the epoch discards a pending :meth:`resume` skip; setting the same epoch keeps it,
        so Lightning's ``set_epoch`` call after restoring a mid-epoch checkpoint is harmless.
        """
        if epoch != self._epoch:
            self._epoch = epoch
            self._start = 0

    def resume(self, epoch: int, step: int) -> None:
        """Make the next iteration yield ``epoch`` from step ``step`` on, without loading skipped data."""
        if epoch < 0 or step < 0:
            raise ValueError(f"Cannot resume at epoch {epoch}, step {step}.")
        self._epoch = epoch
        self._start = step

    def num_batches(self) -> dict[str, int]:
        """Batches per pass over each task's data on this process."""
        rank, world_size = self._replicas()
        out = {}
        for task in self._tasks:
            shard = _shard_length(self.sizes[task], rank, world_size, self.pad)
            size = self.batch_sizes[task]
            n = shard // size if self.drop_last else math.ceil(shard / size)
            if n == 0 and (self.drop_last or self.sampling not in ("sequential", "round_robin")):
                raise ValueError(
                    f"Task {task!r} yields no batch on this process: {shard} sample(s) per process "
                    f"(world size {world_size}), batch_size={size}, drop_last={self.drop_last}. "
                    "Lower its batch size or set drop_last=False."
                )
            out[task] = n
        return out

    def probabilities(self) -> dict[str, float] | None:
        """Per-step task probabilities of ``proportional``/``temperature`` sampling, else ``None``."""
        if self.sampling not in ("proportional", "temperature"):
            return None
        temperature = 1.0 if self.sampling == "proportional" else self.temperature
        logs = np.log(np.array([self.sizes[t] for t in self._tasks], dtype=np.float64))
        weights = np.exp((logs - logs.max()) / temperature)
        weights /= weights.sum()
        return dict(zip(self._tasks, weights.tolist()))

    def __len__(self) -> int:
        counts = list(self.num_batches().values())
        if self.sampling == "zip":
            return max(counts)
        if self.sampling == "zip_shortest":
            return min(counts)
        return sum(counts)

    def _task_schedule(self, epoch: int, counts: list[int]) -> list[tuple[int, ...]]:
        k = len(counts)
        if self.sampling in ("zip", "zip_shortest"):
            every = tuple(range(k))
            return [every] * (max(counts) if self.sampling == "zip" else min(counts))
        if self.sampling == "sequential":
            return [(i,) for i in range(k) for _ in range(counts[i])]
        if self.sampling == "round_robin":
            return [(i,) for r in range(max(counts)) for i in range(k) if r < counts[i]]
        probabilities = np.array(list(self.probabilities().values()))  # type: ignore[union-attr]
        draws = _rng(self.seed, epoch, _SCHEDULE_STREAM).choice(k, size=sum(counts), p=probabilities)
        return [(i,) for i in draws.tolist()]

    def schedule(self, epoch: int | None = None) -> list[tuple[str, ...]]:
        """Tasks of every step of ``epoch`` (default: the current epoch), identical on all processes."""
        counts = list(self.num_batches().values())
        steps = self._task_schedule(self._epoch if epoch is None else epoch, counts)
        return [tuple(self._tasks[i] for i in step) for step in steps]

    def __iter__(self) -> Iterator[list[tuple[str, int]]]:
        # A generator: the epoch and the resume step are read at the first `next()`, not at
        # `iter()`. DataLoader's multi-process iterator calls `iter()` twice and advances only
        # the second one.
        start, self._start = self._start, 0
        yield from self._generate(self._epoch, start)

    def _iter_steps(self) -> Iterator[list[tuple[str, np.ndarray]]]:
        """Like :meth:`__iter__` (same lazy epoch/skip), but each step grouped by task.

        A step is ``[(task, indices), ...]`` in task order, ``indices`` an integer array (a view; do
        not modify it): the same indices :meth:`__iter__` yields as ``(task, index)`` pairs,
        without building them.
        """
        start, self._start = self._start, 0
        yield from self._generate_steps(self._epoch, start)

    def _generate(self, epoch: int, start: int) -> Iterator[list[tuple[str, int]]]:
        for step in self._generate_steps(epoch, start):
            yield [(task, index) for task, indices in step for index in indices.tolist()]

    def _generate_steps(self, epoch: int, start: int) -> Iterator[list[tuple[str, np.ndarray]]]:
        rank, world_size = self._replicas()
        counts = self.num_batches()
        streams = [
            _TaskStream(
                task,
                self.sizes[task],
                self.batch_sizes[task],
                counts[task],
                seed=self.seed,
                epoch=epoch,
                shuffle=self.shuffle,
                rank=rank,
                world_size=world_size,
                pad=self.pad,
            )
            for task in self._tasks
        ]
        drawn = [0] * len(streams)
        schedule = self._task_schedule(epoch, list(counts.values()))
        # Skipped steps only advance the per-task counters: no indices are built for them.
        for tasks in schedule[:start]:
            for i in tasks:
                drawn[i] += 1
        for tasks in schedule[start:]:
            step: list[tuple[str, np.ndarray]] = []
            for i in tasks:
                stream = streams[i]
                step.append((stream.name, stream.indices(drawn[i])))
                drawn[i] += 1
            yield step
