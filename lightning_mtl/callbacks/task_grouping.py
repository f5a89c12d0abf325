"""Task grouping from an inter-task affinity matrix (Fifty et al. 2021, TAG, §3.3): :func:`task_groups`.

Given the K × K affinity ``Z`` (``Z[i][j]``: how much task i's update helps task j; :class:`TaskAffinity` measures
it), the best split of the tasks into ``G`` groups maximises the sum over tasks of the affinity onto each task
from the other members of its group. Solved exactly by a branch-and-bound search over the partitions, with a
node budget; the grouping says whether the search finished.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

#: :func:`task_groups` stops its exact search after this many search nodes by default (seconds of Python)
MAX_SEARCH_NODES = 1_000_000


@dataclass(frozen=True)
class TaskGrouping:
    """A partition of the tasks into groups, from :func:`task_groups`.

    Attributes:
        groups: the groups, each a tuple of task names (in registry order; groups ordered by their first task).
        score: the total affinity of the partition: the sum over tasks of each task's affinity to its group.
        task_scores: each task's affinity to its group: the mean of ``Z_{i→task}`` over the other members
            (0 for a task alone in its group).
        exact: the search proved the partition optimal (False when it stopped at its node budget: then it is
            the best partition found).
    """

    groups: tuple[tuple[str, ...], ...]
    score: float
    task_scores: dict[str, float]
    exact: bool


def grouping_score(affinity: Any, groups: Sequence[Sequence[int]]) -> tuple[float, list[float]]:
    """The total affinity of a partition (task indices) and each task's affinity to its group."""
    z = torch.as_tensor(affinity, dtype=torch.float64)
    scores = [0.0] * z.shape[0]
    for group in groups:
        if len(group) > 1:
            for j in group:
                scores[j] = sum(float(z[i, j]) for i in group if i != j) / (len(group) - 1)
    return sum(scores), scores


def task_groups(
    affinity: Any, num_groups: int, task_names: Optional[Sequence[str]] = None, max_nodes: int = MAX_SEARCH_NODES
) -> TaskGrouping:
    """The partition of the K tasks into ``num_groups`` groups with the largest total inter-task affinity.

    ``affinity[i][j]`` is ``Z_{i→j}``, the affinity of task i onto task j (the diagonal is not used). Following
    Fifty et al. (2021, §3.3), a task's affinity to its group is the mean of the affinities onto it from the other
    members of the group, and a grouping's score is the sum of these over the tasks; a task alone in its group
    scores 0 (nothing transferred, nothing lost), so a task that every other task hurts is left alone. The paper's
    network selection also allows overlapping groups (a task trained in several networks, served by its best
    one); this is the partition, where each task is trained in exactly one group.

    The search is exact: a branch-and-bound over the assignments of tasks to groups (each partition visited
    once), pruned by an upper bound on every task's final score, started from a local-search solution. Every
    group count from 1 to K - 1 together took 0.1 s for K = 10 and 1 s for K = 12 on random affinities, 0.3 s and
    7 s on nearly equal ones (the hard case: many near-ties to rule out), on one CPU core; it grows
    exponentially with K, so after ``max_nodes`` search nodes (about 2 s per million) it stops and returns the best
    partition found, with ``exact=False`` and a warning.

    Args:
        affinity: K × K (tensor, array or nested lists), finite off the diagonal.
        num_groups: the number of (non-empty) groups, 1 ≤ ``num_groups`` ≤ K.
        task_names: names of the tasks (default ``"0"``, ``"1"``, ...).
        max_nodes: the search budget.
    """
    z = torch.as_tensor(affinity, dtype=torch.float64).cpu()
    if z.ndim != 2 or z.shape[0] != z.shape[1] or z.shape[0] == 0:
        raise ValueError(f"affinity must be a square K x K matrix, got shape {tuple(z.shape)}")
    k = z.shape[0]
    names = [str(i) for i in range(k)] if task_names is None else list(task_names)
    if len(names) != k:
        raise ValueError(f"{len(names)} task names for a {k} x {k} affinity matrix")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or not 1 <= num_groups <= k:
        raise ValueError(f"num_groups must be an integer between 1 and the number of tasks ({k}), got {num_groups!r}")
    off_diagonal = ~torch.eye(k, dtype=torch.bool)
    bad = off_diagonal & ~torch.isfinite(z)
    if bad.any():
        pairs = [(names[i], names[j]) for i, j in bad.nonzero().tolist()][:5]
        raise ValueError(
            f"the affinity is not finite for the pairs (from, onto) {pairs}: they were never measured together "
            "(both tasks must be labelled in the same steps)"
        )
    values = z.tolist()
    groups, exact = _BranchAndBound(values, num_groups, max_nodes).solve()
    groups = sorted((sorted(group) for group in groups), key=lambda group: group[0])
    if not exact:
        warnings.warn(
            f"task_groups: the exact search over partitions of {k} tasks into {num_groups} groups stopped after "
            f"{max_nodes} nodes; the grouping returned is the best one found, not proven optimal (raise max_nodes)"
        )
    total, scores = grouping_score(values, groups)
    return TaskGrouping(
        groups=tuple(tuple(names[i] for i in group) for group in groups),
        score=total,
        task_scores={names[j]: scores[j] for j in range(k)},
        exact=exact,
    )


class _BranchAndBound:
    """Exact search over partitions of ``range(K)`` into ``G`` groups maximising :func:`grouping_score`.

    Tasks are assigned in order, each to an existing group or to a new one (so every partition is reached
    once). A partition's score is ``Σ_g S_g / (|g| - 1)`` with ``S_g`` the sum of the affinities within group g,
    kept up to date as tasks are placed. The bound of a partial assignment is, for each task, the largest mean
    it can still reach: for an assigned task, the mean over its current group mates raised by the unassigned
    tasks' affinities onto it that exceed it, best first (0 or its best unassigned affinity if it is alone so
    far); for an unassigned task, 0 or its best affinity from any task.
    """

    def __init__(self, z: list[list[float]], num_groups: int, max_nodes: int) -> None:
        k = len(z)
        self.z, self.k, self.num_groups, self.max_nodes = z, k, num_groups, max_nodes
        self.best_score = -math.inf
        self.best: list[list[int]] = []
        self.nodes = 0
        # offers[t][j]: the affinities onto j from the tasks not placed yet when task t is placed (i >= t), best first
        self.offers = [[sorted((z[i][j] for i in range(t, k) if i != j), reverse=True) for j in range(k)] for t in range(k + 1)]
        self.alone_best = [max([z[i][j] for i in range(k) if i != j] + [0.0]) for j in range(k)]
        self.groups: list[list[int]] = []
        self.group_sum: list[float] = []  # S_g
        self.mate_sum = [0.0] * k  # affinity onto j from its current group mates

    def solve(self) -> tuple[list[list[int]], bool]:
        self._incumbent()
        exact = self._search(0)
        return [list(group) for group in self.best], exact

    def _incumbent(self) -> None:
        """A good first partition: tasks dealt round the groups, then single-task moves while they help."""
        groups = [[j for j in range(self.k) if j % self.num_groups == g] for g in range(self.num_groups)]
        score = grouping_score(self.z, groups)[0]
        improved = True
        while improved:
            improved = False
            for j in range(self.k):
                source = next(g for g in groups if j in g)
                if len(source) == 1:
                    continue
                for target in groups:
                    if target is source:
                        continue
                    source.remove(j)
                    target.append(j)
                    candidate = grouping_score(self.z, groups)[0]
                    if candidate > score + 1e-12:
                        score, improved = candidate, True
                        break
                    target.remove(j)
                    source.append(j)
                if improved:
                    break
        self.best_score, self.best = score, [sorted(g) for g in groups]

    def _place(self, t: int, g: int) -> None:
        z, group = self.z, self.groups[g]
        onto_t = 0.0
        for i in group:
            self.mate_sum[i] += z[t][i]
            onto_t += z[i][t]
        self.mate_sum[t] = onto_t
        self.group_sum[g] += onto_t + sum(z[t][i] for i in group)
        group.append(t)

    def _unplace(self, t: int, g: int) -> None:
        z, group = self.z, self.groups[g]
        group.pop()
        for i in group:
            self.mate_sum[i] -= z[t][i]
        self.group_sum[g] -= self.mate_sum[t] + sum(z[t][i] for i in group)
        self.mate_sum[t] = 0.0

    def _bound(self, t: int) -> float:
        offers, total = self.offers[t], 0.0
        for group in self.groups:
            n = len(group) - 1
            for j in group:
                if n == 0:
                    total += max(0.0, offers[j][0]) if offers[j] else 0.0
                    continue
                s, m = self.mate_sum[j], n
                for value in offers[j]:
                    if value * m <= s:
                        break
                    s, m = s + value, m + 1
                total += s / m
        return total + sum(self.alone_best[j] for j in range(t, self.k))

    def _search(self, t: int) -> bool:
        """Explore the assignments of tasks ``t..K-1``; False once the node budget is spent."""
        self.nodes += 1
        if self.nodes > self.max_nodes:
            return False
        groups = self.groups
        if t == self.k:
            if len(groups) == self.num_groups:
                score = sum(s / (len(g) - 1) for g, s in zip(groups, self.group_sum) if len(g) > 1)
                if score > self.best_score + 1e-12:
                    self.best_score, self.best = score, [list(g) for g in groups]
            return True
        if len(groups) + self.k - t < self.num_groups or self._bound(t) <= self.best_score + 1e-12:
            return True
        for g in range(len(groups)):
            self._place(t, g)
            complete = self._search(t + 1)
            self._unplace(t, g)
            if not complete:
                return False
        if len(groups) < self.num_groups:
            groups.append([])
            self.group_sum.append(0.0)
            self._place(t, len(groups) - 1)
            complete = self._search(t + 1)
            groups.pop()
            self.group_sum.pop()
            self.mate_sum[t] = 0.0
            if not complete:
                return False
        return True
