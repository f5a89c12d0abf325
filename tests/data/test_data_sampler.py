"""MultiTaskSampler without a Trainer: schedules, epoch lengths, determinism, sharding, resume."""

from collections import Counter

import numpy as np
import pytest
import torch.distributed as dist

from lightning_mtl.data import SAMPLING_MODES, MultiTaskSampler


def steps(sampler: MultiTaskSampler) -> list[dict[str, list[int]]]:
    """Iterate one epoch as [{task: [index, ...]}, ...]."""
    out = []
    for batch in sampler:
        step: dict[str, list[int]] = {}
        for task, index in batch:
            step.setdefault(task, []).append(index)
        out.append(step)
    return out


def task_counts(sampler: MultiTaskSampler) -> Counter:
    return Counter(task for step in steps(sampler) for task in step)


SIZES = {"a": 10, "b": 25, "c": 7}  # batches of 4: a=3, b=7, c=2


@pytest.mark.parametrize(
    ("sampling", "length", "counts"),
    [
        ("zip", 7, {"a": 7, "b": 7, "c": 7}),
        ("zip_shortest", 2, {"a": 2, "b": 2, "c": 2}),
        ("round_robin", 12, {"a": 3, "b": 7, "c": 2}),
        ("sequential", 12, {"a": 3, "b": 7, "c": 2}),
    ],
)
def test_exact_counts(sampling: str, length: int, counts: dict[str, int]) -> None:
    sampler = MultiTaskSampler(SIZES, batch_size=4, sampling=sampling)
    assert len(sampler) == length
    assert len(steps(sampler)) == length
    assert task_counts(sampler) == counts


def test_zip_steps_hold_every_task_in_order() -> None:
    for sampling in ("zip", "zip_shortest"):
        sampler = MultiTaskSampler(SIZES, batch_size=4, sampling=sampling)
        assert all(list(step) == ["a", "b", "c"] for step in steps(sampler))


def test_round_robin_order() -> None:
    sampler = MultiTaskSampler(SIZES, batch_size=4, sampling="round_robin")
    order = [next(iter(step)) for step in steps(sampler)]
    assert order == ["a", "b", "c", "a", "b", "c", "a", "b", "b", "b", "b", "b"]
    assert sampler.schedule() == [(task,) for task in order]


def test_sequential_order_and_full_pass() -> None:
    sampler = MultiTaskSampler(SIZES, batch_size=4, sampling="sequential")
    got = steps(sampler)
    assert [next(iter(step)) for step in got] == ["a"] * 3 + ["b"] * 7 + ["c"] * 2
    for task, size in SIZES.items():
        assert sorted(i for step in got for i in step.get(task, [])) == list(range(size))


def test_zip_cycles_with_fresh_permutations() -> None:
    sampler = MultiTaskSampler({"a": 10, "b": 25}, batch_size=5, sampling="zip")
    a = [step["a"] for step in steps(sampler)]  # 5 steps, task a has 2 batches per pass
    first, second = a[0] + a[1], a[2] + a[3]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second  # a new permutation per pass
    b = [i for step in steps(sampler) for i in step["b"]]
    assert sorted(b) == list(range(25))  # the longest task is seen exactly once


def test_zip_shortest_stops_at_shortest() -> None:
    sampler = MultiTaskSampler({"a": 10, "b": 25}, batch_size=5, sampling="zip_shortest")
    got = steps(sampler)
    assert len(got) == 2
    assert sorted(got[0]["a"] + got[1]["a"]) == list(range(10))


def frequencies(sampler: MultiTaskSampler, epochs: int) -> dict[str, float]:
    counts: Counter = Counter()
    for epoch in range(epochs):
        counts.update(task for (task,) in sampler.schedule(epoch))
    total = sum(counts.values())
    return {task: counts[task] / total for task in sampler.tasks}


def test_proportional_frequencies() -> None:
    sampler = MultiTaskSampler({"a": 100, "b": 400}, batch_size=1, sampling="proportional")
    assert len(sampler) == 500  # sum of per-task batch counts
    assert sampler.probabilities() == pytest.approx({"a": 0.2, "b": 0.8})
    assert frequencies(sampler, epochs=10)["a"] == pytest.approx(0.2, abs=0.02)


def test_temperature_frequencies() -> None:
    sampler = MultiTaskSampler({"a": 100, "b": 400}, batch_size=1, sampling="temperature", temperature=2.0)
    assert len(sampler) == 500
    assert sampler.probabilities() == pytest.approx({"a": 1 / 3, "b": 2 / 3})  # sqrt(100) : sqrt(400)
    assert frequencies(sampler, epochs=10)["a"] == pytest.approx(1 / 3, abs=0.02)


def test_temperature_one_is_proportional() -> None:
    sizes = {"a": 100, "b": 400}
    proportional = MultiTaskSampler(sizes, batch_size=1, sampling="proportional", seed=5)
    temperature = MultiTaskSampler(sizes, batch_size=1, sampling="temperature", temperature=1.0, seed=5)
    assert temperature.probabilities() == pytest.approx(proportional.probabilities())
    assert temperature.schedule() == proportional.schedule()
    assert steps(temperature) == steps(proportional)


def test_large_temperature_approaches_uniform() -> None:
    sizes = {"a": 100, "b": 400}
    hot = MultiTaskSampler(sizes, batch_size=1, sampling="temperature", temperature=1e6)
    assert hot.probabilities()["a"] == pytest.approx(0.5, abs=1e-5)
    assert frequencies(hot, epochs=10)["a"] == pytest.approx(0.5, abs=0.02)
    uniform = MultiTaskSampler(sizes, batch_size=1, sampling="temperature", temperature=float("inf"))
    assert uniform.probabilities() == {"a": 0.5, "b": 0.5}
    # Temperatures order the small task's share: proportional < T=2 < T=5 < uniform.
    shares = [
        MultiTaskSampler(sizes, batch_size=1, sampling="temperature", temperature=t).probabilities()["a"]
        for t in (1.0, 2.0, 5.0, float("inf"))
    ]
    assert shares == sorted(shares)


def test_temperature_overdrawn_task_cycles() -> None:
    # Uniform draws over 2 + 50 batches: task a is drawn ~26 times but has 2 batches per pass.
    sampler = MultiTaskSampler({"a": 4, "b": 100}, batch_size=2, sampling="temperature", temperature=float("inf"))
    a = [step["a"] for step in steps(sampler) if "a" in step]
    assert len(a) > 4
    passes = [sorted(a[k] + a[k + 1]) for k in range(0, len(a) - 1, 2)]
    assert all(p == [0, 1, 2, 3] for p in passes)


def test_large_sizes_do_not_overflow() -> None:
    sampler = MultiTaskSampler({"a": 10**9, "b": 10}, batch_size=10**8, sampling="temperature", temperature=0.01)
    probabilities = sampler.probabilities()
    assert probabilities["a"] == pytest.approx(1.0) and np.isfinite(probabilities["b"])


def test_per_task_batch_sizes() -> None:
    sampler = MultiTaskSampler({"a": 10, "b": 25}, batch_size={"a": 3, "b": 10}, sampling="sequential")
    sizes = [(task, len(indices)) for step in steps(sampler) for task, indices in step.items()]
    assert sizes == [("a", 3), ("a", 3), ("a", 3), ("a", 1), ("b", 10), ("b", 10), ("b", 5)]
    assert sampler.num_batches() == {"a": 4, "b": 3}


def test_drop_last() -> None:
    sampler = MultiTaskSampler({"a": 10, "b": 25}, batch_size={"a": 3, "b": 10}, sampling="sequential", drop_last=True)
    assert sampler.num_batches() == {"a": 3, "b": 2}
    assert all(len(v) == {"a": 3, "b": 10}[k] for step in steps(sampler) for k, v in step.items())


def test_shuffle_false_keeps_dataset_order() -> None:
    sampler = MultiTaskSampler({"a": 6, "b": 11}, batch_size=2, sampling="zip", shuffle=False)
    got = steps(sampler)
    assert [i for step in got for i in step["b"]] == list(range(11))
    assert [i for step in got for i in step["a"]] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
    sampler.set_epoch(4)
    assert steps(sampler) == got


@pytest.mark.parametrize("sampling", SAMPLING_MODES)
def test_deterministic_per_seed_and_epoch(sampling: str) -> None:
    def build(seed: int = 0) -> MultiTaskSampler:
        return MultiTaskSampler({"a": 30, "b": 50}, batch_size=4, sampling=sampling, seed=seed)

    first, second = build(), build()
    assert steps(first) == steps(second)
    assert steps(first) == steps(second)  # iterating again without set_epoch repeats the epoch
    epoch0 = steps(first)
    first.set_epoch(1)
    assert steps(first) != epoch0
    second.set_epoch(1)
    assert steps(first) == steps(second)
    assert steps(build(seed=1)) != epoch0


def test_random_schedule_changes_with_epoch() -> None:
    sampler = MultiTaskSampler({"a": 30, "b": 50}, batch_size=2, sampling="temperature")
    assert sampler.schedule(0) != sampler.schedule(1)
    assert sampler.schedule(1) == MultiTaskSampler({"a": 30, "b": 50}, batch_size=2, sampling="temperature").schedule(1)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("sampling", SAMPLING_MODES)
def test_sharding_across_ranks(sampling: str, world_size: int) -> None:
    sizes = {"a": 37, "b": 101}
    batch_size = {"a": 4, "b": 8}
    samplers = [
        MultiTaskSampler(sizes, batch_size, sampling=sampling, seed=3, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    per_rank = [steps(s) for s in samplers]
    assert len({len(s) for s in samplers}) == 1
    assert all(len(got) == len(samplers[0]) for got in per_rank)
    assert all(s.schedule() == samplers[0].schedule() for s in samplers)
    for step in zip(*per_rank):
        assert all(list(s) == list(step[0]) for s in step)  # same tasks on every rank
        for task in step[0]:
            ids = [i for s in step for i in s[task]]
            assert len(ids) == len(set(ids))  # disjoint shards within the step
    if sampling in ("round_robin", "sequential"):  # exactly one pass: all samples, padding only
        for task, size in sizes.items():
            ids = [i for got in per_rank for step in got for i in step.get(task, [])]
            assert set(ids) == set(range(size))
            assert len(ids) == -(-size // world_size) * world_size


def test_unpadded_shards_are_exact() -> None:
    sizes = {"a": 37, "b": 101}
    samplers = [MultiTaskSampler(sizes, 8, "sequential", shuffle=False, pad=False, rank=r, world_size=2) for r in (0, 1)]
    ids = {task: sorted(i for s in samplers for step in steps(s) for i in step.get(task, [])) for task in sizes}
    assert ids == {task: list(range(size)) for task, size in sizes.items()}


def test_rank_from_torch_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = MultiTaskSampler({"a": 10}, batch_size=1, shuffle=False)
    assert (sampler.rank, sampler.world_size, len(sampler)) == (0, 1, 10)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    assert (sampler.rank, sampler.world_size, len(sampler)) == (1, 4, 3)
    assert [i for step in steps(sampler) for i in step["a"]] == [1, 5, 9]
    explicit = MultiTaskSampler({"a": 10}, batch_size=1, shuffle=False, rank=0, world_size=2)
    assert explicit.world_size == 2  # explicit arguments win


@pytest.mark.parametrize("sampling", SAMPLING_MODES)
def test_resume_skips_steps(sampling: str) -> None:
    sampler = MultiTaskSampler({"a": 30, "b": 50}, batch_size=4, sampling=sampling)
    sampler.set_epoch(2)
    full = steps(sampler)
    sampler.set_epoch(0)
    sampler.resume(epoch=2, step=5)
    assert sampler.pending_start == 5
    sampler.set_epoch(2)  # what Lightning does after restoring: same epoch keeps the skip
    assert steps(sampler) == full[5:]
    assert sampler.pending_start == 0
    assert steps(sampler) == full  # only the next iteration skips
    sampler.resume(epoch=2, step=5)
    sampler.set_epoch(3)  # a new epoch discards the skip
    assert len(steps(sampler)) == len(full)


def test_no_batch_with_drop_last_names_task() -> None:
    sampler = MultiTaskSampler({"a": 3, "b": 50}, batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match="'a'"):
        len(sampler)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampling": "mixed"}, "zip, zip_shortest, round_robin, proportional, temperature, sequential"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": {"a": 2}}, "'b'"),
        ({"batch_size": {"a": 2, "b": -1}}, r"batch_size\['b'\]"),
        ({"sizes": {"a": 3, "b": 0}}, "'b'"),
        ({"sizes": {"a/x": 3}}, "'a/x'"),
        ({"sizes": {"": 3}}, "''"),
        ({"sizes": {}}, "empty"),
        ({"rank": 2, "world_size": 2}, "rank"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"sizes": {"a": 3, "b": 5}, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        MultiTaskSampler(**args)
