"""MultiTaskLoader's batched fetch gives exactly the batches of per-sample fetch and default collate.

The reference is the straightforward pipeline: a ``DataLoader`` whose batch sampler is the
``MultiTaskSampler`` itself (``(task, index)`` pairs), fetching sample by sample and collating each
task's items. The loader must match it in values, types, dtypes, shapes, strides and autograd.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from lightning_mtl.data import MultiTaskLoader, MultiTaskSampler


class PairDataset(Dataset):
    """Every task's samples addressed by ``(task, index)``; an item is ``(task, dataset[index])``."""

    def __init__(self, datasets) -> None:
        self.datasets = datasets

    def __len__(self) -> int:
        return sum(len(ds) for ds in self.datasets.values())

    def __getitem__(self, key):
        task, index = key
        return task, self.datasets[task][index]


class CollateByTask:
    def __init__(self, collate_fn) -> None:
        self.collate_fn = default_collate if collate_fn is None else collate_fn

    def __call__(self, pairs):
        groups: dict = {}
        for task, item in pairs:
            groups.setdefault(task, []).append(item)
        return {task: self.collate_fn(items) for task, items in groups.items()}


def reference(datasets, sampler: MultiTaskSampler, collate_fn=None, num_workers: int = 0) -> list:
    """Sample-by-sample fetch of the sampler's ``(task, index)`` pairs, collated per task."""
    loader = DataLoader(
        PairDataset(datasets), batch_sampler=sampler, collate_fn=CollateByTask(collate_fn), num_workers=num_workers
    )
    return list(loader)


def make_sampler(datasets, **kwargs) -> MultiTaskSampler:
    return MultiTaskSampler({task: len(ds) for task, ds in datasets.items()}, **kwargs)


def assert_same(got, want) -> None:
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
        assert got.requires_grad == want.requires_grad and type(got.grad_fn) is type(want.grad_fn)
        assert got.is_shared() == want.is_shared()
        assert torch.equal(got.detach(), want.detach())
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
    else:
        assert got == want


def check(datasets, collate_fn=None, num_workers: int = 0, epochs: int = 2, **sampler_kwargs) -> None:
    ours_sampler = make_sampler(datasets, **sampler_kwargs)
    ref_sampler = make_sampler(datasets, **sampler_kwargs)
    loader = MultiTaskLoader(datasets, ours_sampler, collate_fn=collate_fn, num_workers=num_workers)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        ref_sampler.set_epoch(epoch)
        got, want = list(loader), reference(datasets, ref_sampler, collate_fn, num_workers)
        assert len(got) == len(want) == len(loader)
        for g, w in zip(got, want):
            assert_same(g, w)


def tensor_tasks(g: torch.Generator) -> dict[str, TensorDataset]:
    return {
        "a": TensorDataset(torch.randn(23, 5, generator=g), torch.randint(0, 3, (23,), generator=g)),
        "b": TensorDataset(torch.randn(41, 1, 3, 4, generator=g), torch.randn(41, generator=g)),
        "c": TensorDataset(torch.arange(17, dtype=torch.int32)),
    }


@pytest.mark.parametrize("sampling", ["zip", "zip_shortest", "round_robin", "proportional", "temperature", "sequential"])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_same_batches_as_per_sample_fetch(sampling: str, shuffle: bool, drop_last: bool) -> None:
    g = torch.Generator().manual_seed(0)
    check(tensor_tasks(g), batch_size={"a": 4, "b": 6, "c": 3}, sampling=sampling, shuffle=shuffle, drop_last=drop_last)


@pytest.mark.parametrize("pad", [True, False])
def test_same_batches_on_every_rank(pad: bool) -> None:
    g = torch.Generator().manual_seed(1)
    for rank in range(3):
        check(tensor_tasks(g), batch_size=4, sampling="round_robin", rank=rank, world_size=3, pad=pad)


def test_dtypes_and_shapes() -> None:
    n = 13
    data = {
        "many": TensorDataset(
            torch.rand(n, 2, 3) > 0.5,
            torch.randn(n, 4).half(),
            torch.randn(n, 2, dtype=torch.complex64),
            torch.arange(n, dtype=torch.uint8),
            torch.randn(n, 1, 1, 1),
            torch.randn(n, 0),
        ),
        "single": TensorDataset(torch.randn(n, 3)),
    }
    check(data, batch_size=5, sampling="zip")


def test_tensors_the_gather_does_not_handle() -> None:
    n = 11
    weights = torch.randn(n, 3, requires_grad=True)
    data = {
        "transposed": TensorDataset(torch.randn(4, n).t(), torch.arange(n)),
        "channels_last": TensorDataset(torch.randn(n, 3, 2, 2).to(memory_format=torch.channels_last)),
        "grad": TensorDataset(weights, torch.arange(n)),
        "conj": TensorDataset(torch.randn(n, 2, dtype=torch.complex64).conj()),
        "parameter": TensorDataset(torch.nn.Parameter(torch.randn(n, 2), requires_grad=False)),
    }
    check(data, batch_size=4, sampling="zip")


class GetItems(Dataset):
    """A dataset fetching a list of indices at once, like DataLoader's ``__getitems__`` protocol."""

    def __init__(self, size: int) -> None:
        self.size, self.calls = size, []

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        return {"x": torch.tensor([float(i)]), "y": i % 2}

    def __getitems__(self, indices: list[int]) -> list:
        assert all(type(i) is int for i in indices)
        self.calls.append(indices)
        return [self[i] for i in indices]


class Rows(TensorDataset):
    """A TensorDataset subclass changing items: must be fetched sample by sample."""

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return x * 2, y + 1


def test_other_datasets() -> None:
    g = torch.Generator().manual_seed(2)
    base = TensorDataset(torch.randn(30, 3, generator=g), torch.arange(30))
    data = {
        "getitems": GetItems(14),
        "subset": Subset(base, list(range(3, 25, 2))),
        "subclass": Rows(torch.randn(9, 2, generator=g), torch.arange(9)),
        "plain": base,
    }
    check(data, batch_size=4, sampling="zip")


def test_getitems_gets_one_call_per_task_batch() -> None:
    data = {"a": GetItems(10), "b": TensorDataset(torch.arange(7).float())}
    sampler = make_sampler(data, batch_size=4, sampling="zip", shuffle=False)
    batches = list(MultiTaskLoader(data, sampler))
    assert data["a"].calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]][: len(batches)]
    assert len(batches) == 3


@pytest.mark.parametrize("collate_fn", [default_collate, lambda items: items, "tuple"])
def test_custom_collate(collate_fn) -> None:
    if collate_fn == "tuple":
        collate_fn = tuple
    g = torch.Generator().manual_seed(3)
    check(tensor_tasks(g), collate_fn=collate_fn, batch_size=3, sampling="temperature")


def test_workers_same_batches_in_shared_memory() -> None:
    g = torch.Generator().manual_seed(4)
    data = tensor_tasks(g)
    data["getitems"] = GetItems(12)
    check(data, num_workers=2, epochs=1, batch_size=4, sampling="round_robin")


def test_sampler_pairs_match_loader_steps() -> None:
    g = torch.Generator().manual_seed(5)
    data = tensor_tasks(g)
    for sampling in ("zip", "temperature"):
        sampler = make_sampler(data, batch_size=4, sampling=sampling, seed=3)
        sampler.set_epoch(2)
        sampler.resume(2, 3)
        pairs = list(sampler)
        sampler.resume(2, 3)
        steps = list(sampler._iter_steps())
        assert pairs == [[(t, i) for t, idx in step for i in idx.tolist()] for step in steps]
        assert sampler.pending_start == 0
