"""`MultiTaskLoader`: per-task datasets behind one DataLoader, yielding ``{task: batch}``.

The loader wraps a single :class:`~torch.utils.data.DataLoader` over all tasks' datasets, driven by
a :class:`~lightning_mtl.data.sampler.MultiTaskSampler`. Each step's samples are grouped by task and
collated separately, so a batch is ``{task: collate_fn([item, ...])}`` holding only the tasks
scheduled for that step, in task order. With the default ``collate_fn`` and ``(x, y)`` items that
is ``{task: [x_batch, y_batch]}``.

Fetching: the inner ``DataLoader`` receives each step as one ``[(task, indices), ...]`` group list
and fetches every task's items the way a ``DataLoader`` over that task's dataset alone would: one
``dataset.__getitems__(indices)`` call where the dataset defines it, else ``dataset[i]`` per
sample, then ``collate_fn``. For a plain ``TensorDataset`` of ordinary contiguous CPU tensors and the
default ``collate_fn``, the rows are gathered with one ``index_select`` per tensor, which gives
exactly what ``default_collate`` of the items gives (same values, dtypes, shapes and strides; in
worker processes, likewise into shared memory) without building per-sample items.

Why not a DataLoader subclass: Lightning injects a ``DistributedSampler`` into anything that is a
``DataLoader`` and leaves other iterables alone. The sampler already shards every task across
processes (see :mod:`lightning_mtl.data.sampler`), so the loader must stay untouched, whatever
``Trainer(use_distributed_sampler=...)`` says.

Lightning integration:

* ``set_epoch``: each epoch Lightning calls ``set_epoch`` on ``loader.sampler`` (the
  :class:`MultiTaskSampler`), which selects the epoch's schedule and permutations.
* Resume: the loader is *stateful* in Lightning's sense (``state_dict``/``load_state_dict``), so the
  fit loop stores ``{"epoch", "step", ...}`` in the checkpoint and restores it before the first
  batch of a resumed run. ``step`` counts the batches handed to the consumer in the current epoch
  (not the ones prefetched by workers). A restored loader skips that many steps in the sampler
  without loading their data, and continues the interrupted epoch exactly. A state recorded at the
  end of an epoch resumes at the start of the next.
* Iteration is lazy: the epoch and the resume point are read when the first batch is requested,
  which is after Lightning has called ``set_epoch`` and ``load_state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate, get_worker_info

from lightning_mtl.data.sampler import MultiTaskSampler


def _gatherable(tensor: torch.Tensor) -> bool:
    """Whether ``index_select`` on ``tensor`` gives exactly what ``default_collate`` of its rows gives."""
    return (
        type(tensor) is torch.Tensor
        and tensor.layout is torch.strided
        and tensor.device.type == "cpu"
        and not tensor.requires_grad
        and not tensor.is_quantized
        and not tensor.is_conj()
        and not tensor.is_neg()
        and tensor.dim() > 0
        and tensor.is_contiguous()
    )


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``default_collate([tensor[i] for i in index])`` in one copy, for a :func:`_gatherable` tensor."""
    out = None
    if get_worker_info() is not None:
        # As default_collate does in a worker: gather straight into shared memory.
        rows = (len(index), *tensor.shape[1:])
        storage = tensor._typed_storage()._new_shared(math.prod(rows), device=tensor.device)
        out = tensor.new(storage).resize_(*rows)
    return torch.index_select(tensor, 0, index, out=out)


class _TaskDataset(Dataset):
    """All tasks' datasets, indexed by ``(task, index)``; an item is ``(task, dataset[index])``.

    The loader fetches a whole step at once through :meth:`__getitems__` (which ``DataLoader``
    prefers to ``__getitem__``): one ``[(task, indices), ...]`` group list from
    :meth:`MultiTaskSampler._iter_steps` gives ``{task: collate_fn(items)}``.
    """

    def __init__(
        self, datasets: Mapping[str, Dataset], collate_fn: Optional[Callable[[list[Any]], Any]] = None
    ) -> None:
        self.datasets = dict(datasets)
        self.collate_fn = default_collate if collate_fn is None else collate_fn

    def __getitem__(self, key: tuple[str, int]) -> tuple[str, Any]:
        task, index = key
        return task, self.datasets[task][index]

    def __getitems__(self, step: list[tuple[str, np.ndarray]]) -> dict[str, Any]:
        return {task: self._fetch(self.datasets[task], indices) for task, indices in step}

    def _fetch(self, dataset: Dataset, indices: np.ndarray) -> Any:
        """``collate_fn`` of one task's items, fetched as a ``DataLoader`` over ``dataset`` would."""
        if self.collate_fn is default_collate and type(dataset) is TensorDataset:
            tensors = dataset.tensors
            if all(_gatherable(tensor) for tensor in tensors):
                # default_collate stacks the rows of every tensor into a list: gather them directly.
                index = torch.from_numpy(indices)
                return [_gather(tensor, index) for tensor in tensors]
        keys = indices.tolist()
        getitems = getattr(dataset, "__getitems__", None)
        if getitems:
            return self.collate_fn(getitems(keys))
        return self.collate_fn([dataset[key] for key in keys])

    def __len__(self) -> int:
        return sum(len(dataset) for dataset in self.datasets.values())  # type: ignore[arg-type]


class _Steps:
    """The inner ``DataLoader``'s batch sampler: the sampler's steps grouped by task."""

    def __init__(self, sampler: MultiTaskSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[str, np.ndarray]]]:
        return self.sampler._iter_steps()

    def __len__(self) -> int:
        return len(self.sampler)


def _collated(batch: dict[str, Any]) -> dict[str, Any]:
    """The inner ``DataLoader``'s ``collate_fn``: :meth:`_TaskDataset.__getitems__` already collated."""
    return batch


class MultiTaskLoader:
    """Iterable over ``{task: batch}`` steps scheduled by a :class:`MultiTaskSampler`.

    Args:
        datasets: one map-style dataset per task, with the sampler's tasks and sizes.
        sampler: the step schedule; also exposed as :attr:`sampler` / :attr:`batch_sampler`.
        collate_fn: collates one task's list of items (default:
            :func:`~torch.utils.data.default_collate`).
        num_workers, pin_memory, worker_init_fn, persistent_workers: passed to the inner
            :class:`~torch.utils.data.DataLoader`.
    """

    def __init__(
        self,
        datasets: Mapping[str, Dataset],
        sampler: MultiTaskSampler,
        collate_fn: Optional[Callable[[list[Any]], Any]] = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        worker_init_fn: Optional[Callable[[int], None]] = None,
        persistent_workers: bool = False,
    ) -> None:
        if list(datasets) != sampler.tasks:
            raise ValueError(f"The datasets' tasks {list(datasets)} differ from the sampler's {sampler.tasks}.")
        for task, dataset in datasets.items():
            if len(dataset) != sampler.sizes[task]:  # type: ignore[arg-type]
                raise ValueError(
                    f"Task {task!r} has {len(dataset)} samples but the sampler expects {sampler.sizes[task]}."  # type: ignore[arg-type]
                )
        # Each step goes through the DataLoader as one `[(task, indices), ...]` group list, fetched
        # and collated per task by `_TaskDataset.__getitems__` (no per-sample `(task, index)` keys).
        self._build(_TaskDataset(datasets, collate_fn), sampler, _Steps(sampler), _collated,
                    num_workers, pin_memory, worker_init_fn, persistent_workers)

    def _build(
        self,
        dataset: Dataset,
        sampler: MultiTaskSampler,
        steps: Any,
        collate_fn: Callable[[Any], Any],
        num_workers: int,
        pin_memory: bool,
        worker_init_fn: Optional[Callable[[int], None]],
        persistent_workers: bool,
    ) -> None:
        # Not `self.dataset`: Lightning rebuilds a loader that has `.dataset` and `.sampler` as a DataLoader with a
        # SequentialSampler under `overfit_batches`, which fails for this one; the data module turns shuffling off.
        self._dataset = dataset
        self.sampler = sampler
        self.dataloader = DataLoader(
            dataset,
            batch_sampler=steps,
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory,
            worker_init_fn=worker_init_fn,
            persistent_workers=persistent_workers and num_workers > 0,
        )
        self._step = 0
        self._step_epoch: Optional[int] = None

    @property
    def batch_sampler(self) -> MultiTaskSampler:
        return self.sampler

    @property
    def tasks(self) -> list[str]:
        return self.sampler.tasks

    @property
    def worker_init_fn(self) -> Optional[Callable[[int], None]]:
        return self.dataloader.worker_init_fn

    @worker_init_fn.setter
    def worker_init_fn(self, fn: Optional[Callable[[int], None]]) -> None:
        # Lightning sets this under `seed_everything(workers=True)`.
        self.dataloader.worker_init_fn = fn

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._iterate()

    def _iterate(self) -> Iterator[dict[str, Any]]:
        self._step = self.sampler.pending_start
        self._step_epoch = self.sampler.epoch
        for batch in self.dataloader:
            self._step += 1
            yield batch

    def _fingerprint(self) -> dict[str, Any]:
        s = self.sampler
        return {
            "tasks": s.tasks,
            "sizes": [s.sizes[t] for t in s.tasks],
            "batch_sizes": [s.batch_sizes[t] for t in s.tasks],
            "sampling": s.sampling,
            "temperature": s.temperature,
            "seed": s.seed,
            "shuffle": s.shuffle,
            "drop_last": s.drop_last,
            "world_size": s.world_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "step", "num_steps", "config"}``: where the schedule stands, and what it was."""
        if self.sampler.pending_start:
            step = self.sampler.pending_start
        elif self._step_epoch == self.sampler.epoch:
            step = self._step
        else:
            step = 0
        return {"epoch": self.sampler.epoch, "step": step, "num_steps": len(self), "config": self._fingerprint()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next iteration resumes the recorded epoch and step.

        A state recorded after the last step of an epoch resumes at the start of the next epoch.
        If the data or sampling configuration changed since the state was recorded, the schedule
        differs and only the position is kept; a warning says so.
        """
        epoch, step = int(state_dict["epoch"]), int(state_dict["step"])
        num_steps = int(state_dict.get("num_steps", len(self)))
        config = state_dict.get("config")
        if config is not None and config != self._fingerprint():
            rank_zero_warn(
                "Resuming a MultiTaskLoader whose data or sampling configuration changed since the "
                f"checkpoint ({config} -> {self._fingerprint()}): the schedule will not continue the "
                "interrupted one; only the epoch and step position are kept."
            )
        if step >= min(num_steps, len(self)):
            epoch, step = epoch + 1, 0
        self.sampler.resume(epoch, step)
        self._step, self._step_epoch = step, epoch


SHARED_INPUT = "shared input"
"""The sampler's one task name for a shared-input dataset (it appears in the loader's checkpoint state)."""


class _SharedInputSteps:
    """The inner ``DataLoader``'s batch sampler for one shared-input dataset: each step's indices."""

    def __init__(self, sampler: MultiTaskSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[int]]:
        for ((_, indices),) in self.sampler._iter_steps():
            yield indices.tolist()

    def __len__(self) -> int:
        return len(self.sampler)


class SharedInputLoader(MultiTaskLoader):
    """Iterable over shared-input batches ``collate_fn([dataset[i], ...])``, resumable like :class:`MultiTaskLoader`.

    A shared-input dataset (items ``(x, {task: y})``) is scheduled as one task named :data:`SHARED_INPUT` in
    ``zip`` mode: the order of an epoch is a pure function of ``(seed, epoch)``, it is sharded across DDP
    processes as ``DistributedSampler`` shards, and the loader's ``state_dict`` puts the position in the
    checkpoint, so ``fit(ckpt_path=...)`` continues the interrupted epoch with the same samples. Items are
    fetched as a plain ``DataLoader`` fetches them (``dataset.__getitems__`` where defined, else one
    ``dataset[i]`` each) and collated by ``collate_fn`` (default :func:`~torch.utils.data.default_collate`).

    Args:
        dataset: a map-style dataset of ``len(dataset) == sampler.sizes[SHARED_INPUT]`` items.
        sampler: a :class:`MultiTaskSampler` whose one task is :data:`SHARED_INPUT`.
        collate_fn, num_workers, pin_memory, worker_init_fn, persistent_workers: as for :class:`MultiTaskLoader`.
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: MultiTaskSampler,
        collate_fn: Optional[Callable[[list[Any]], Any]] = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        worker_init_fn: Optional[Callable[[int], None]] = None,
        persistent_workers: bool = False,
    ) -> None:
        if sampler.tasks != [SHARED_INPUT]:
            raise ValueError(f"A SharedInputLoader needs a sampler whose one task is {SHARED_INPUT!r}, got {sampler.tasks}.")
        if len(dataset) != sampler.sizes[SHARED_INPUT]:  # type: ignore[arg-type]
            raise ValueError(f"The dataset has {len(dataset)} items but the sampler expects {sampler.sizes[SHARED_INPUT]}.")  # type: ignore[arg-type]
        self._build(dataset, sampler, _SharedInputSteps(sampler), collate_fn or default_collate,
                    num_workers, pin_memory, worker_init_fn, persistent_workers)


class EndlessLoader:
    """A :class:`MultiTaskLoader`'s batches without end, positioned by one number: the batches drawn so far.

    Epoch after epoch of ``loader`` (each in its own ``(seed, epoch)`` order); batch ``n`` of the stream is step
    ``n % len(loader)`` of epoch ``n // len(loader)``. The caller keeps the position (a balancer's state, so the
    checkpoint) and :meth:`seek` s to it before drawing: a resumed run draws the batches the interrupted one
    would have drawn. Used for the meta batches of ``MultiTaskDataModule(meta=...)``.
    """

    def __init__(self, loader: MultiTaskLoader) -> None:
        if len(loader) == 0:
            raise ValueError("The loader yields no batch: an endless stream of it would never yield one.")
        self.loader = loader
        self.position = 0
        self._iterator: Optional[Iterator[Any]] = None
        self._epoch: Optional[int] = None

    def seek(self, position: int) -> None:
        """Make the next batch drawn batch ``position`` of the stream (without loading the skipped ones)."""
        if position < 0:
            raise ValueError(f"Cannot seek to batch {position} of a stream.")
        if position != self.position:
            self.position, self._iterator = position, None

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``copy.deepcopy`` of a fitted module) or a pickle drops the live iterator (a generator, which
        cannot be copied) and restarts it at the same position when it next draws."""
        return {**self.__dict__, "_iterator": None, "_epoch": None}

    def __iter__(self) -> "EndlessLoader":
        return self

    def __next__(self) -> Any:
        epoch, step = divmod(self.position, len(self.loader))
        if self._iterator is None or epoch != self._epoch:
            self.loader.sampler.resume(epoch, step)
            self._iterator, self._epoch = iter(self.loader), epoch
        batch = next(self._iterator)
        self.position += 1
        return batch
