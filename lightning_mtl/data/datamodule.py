"""`MultiTaskDataModule`: the data side of multi-task training.

Two forms of data, chosen per split by what you pass:

**Shared input** -- a single ``Dataset`` whose items are ``(x, {task: y})``: every sample carries
labels for all tasks. Batches are ``collate_fn`` of the items (default collate), so ``(x, {task: y})``.
Only ``sampling="zip"`` means something here; any other mode raises ``ValueError``, as does a
``batch_size`` mapping. A map-style training dataset is read through a
:class:`~lightning_mtl.data.loader.SharedInputLoader`: its order is a pure function of ``(seed, epoch)``
(``shuffle=False`` keeps the dataset order), it is sharded across DDP processes the way
``DistributedSampler`` shards (unless ``Trainer(use_distributed_sampler=False)``: then every process
reads its whole dataset, its own shard on purpose), and its position is in the checkpoint, so resume is
exact, as for per-task data (see *Resume*). Validation, test and predict use a plain
:class:`~torch.utils.data.DataLoader` in dataset order, into which Lightning injects its
``DistributedSampler`` under DDP. An ``IterableDataset`` yields its own order: it is read by a plain
``DataLoader`` for every split and carries no resumable position.

Default collation turns tuples into lists, so "``(x, y)``" below is a two-element list
``[x_batch, y_batch]``; ``x, y = batch[task]`` unpacks either.

**Per-task inputs** -- a mapping ``{task: Dataset}`` whose items are ``(x, y)``: each task has its own
samples. Every batch is a dict ``{task: (x, y)}`` holding the tasks scheduled for that step (a
subset; one task for the single-task modes). The splits become:

* ``train_dataloader()``: a :class:`~lightning_mtl.data.loader.MultiTaskLoader` scheduled by
  ``sampling`` (``zip``, ``zip_shortest``, ``round_robin``, ``proportional``, ``temperature``,
  ``sequential``; see :mod:`lightning_mtl.data.sampler` for what each does and the epoch length).
* ``val_dataloader()`` / ``test_dataloader()``: a ``MultiTaskLoader`` in ``sequential`` mode
  without shuffling, so each epoch evaluates every task's whole split, one task per batch:
  ``validation_step(batch, batch_idx)`` receives ``{task: (x, y)}`` with exactly one key. It is a
  single loader, so there is no ``dataloader_idx`` argument and logged names get no
  ``/dataloader_idx_N`` suffix; ``batch_idx`` runs across tasks. ``limit_val_batches`` cuts the
  sequence (the last tasks first).
* ``predict_dataloader()``: the same as validation but without DDP padding (see below); the
  per-task dataset items may be anything ``collate_fn`` accepts (e.g. ``x`` alone). Lightning
  cannot record prediction batch indices for it (``BasePredictionWriter`` gets none).

A split may be ``None``: Lightning then sees no hook for it (no validation/test/predict stage). The splits need not share a form: e.g.
per-task training with a shared-input ``predict`` set. A per-task evaluation split may hold a
subset of the training tasks, never an unknown task.

``collate_fn`` is applied to the list of items of one task (per-task form) or of the batch
(shared-input form). ``batch_size`` may be a mapping ``{task: int}`` naming every task (per-task form
only); it applies to all splits.

DDP
---
Per-task loaders shard every task across processes themselves and are not ``DataLoader``
subclasses, so Lightning passes them through untouched whatever ``use_distributed_sampler`` is. At
each training step all processes run the same task(s) on disjoint shards and all have the same
number of steps, however uneven the datasets. Rank and world size come from
``trainer.distributed_sampler_kwargs`` when the data module is attached to a ``Trainer`` (the same
numbers Lightning would give a ``DistributedSampler``, data-parallel only under model-parallel
strategies), otherwise from :mod:`torch.distributed` at iteration time. Validation and test pad
each task's split to a multiple of the world size by repeating a few samples, exactly like
``DistributedSampler`` (metrics on those duplicates count twice, as with Lightning's default);
prediction does not pad, so processes may run different numbers of prediction steps.

All of this assumes every process holds the same datasets. If one process's are longer it can have
more steps than the others: with validation the run hangs; without it gradient syncs pair steps of
different epochs and a process dies, or the command exits 0. So under a multi-process strategy
(``trainer.world_size > 1``) :meth:`setup`, which Lightning calls on every process, all-gathers the
dataset lengths of the splits the stage uses (``fit``: train and val; otherwise the stage's split;
prediction would not hang but skip or repeat samples) and raises ``ValueError`` on every process if
they differ, naming the split, each task and its length on each rank. Build the same datasets on
every process (same files, same seed for a random split) and let them be sharded; a subclass that
overrides ``setup`` should call ``super().setup(stage)``. A shared-input dataset is checked as well
when it is sharded (``use_distributed_sampler=True``, the default): the sharding pads the *local*
length, so different lengths give different step counts too. It is not checked with
``use_distributed_sampler=False`` (each process may hold its own shard on purpose), nor when it is
an ``IterableDataset`` (no length).

``Trainer(overfit_batches=n)`` trains on the first ``n`` batches of every epoch; the training loaders are then
built without shuffling (Lightning turns shuffling off the same way for a ``DataLoader``, which these loaders
are not), so ``zip``, ``zip_shortest``, ``round_robin`` and ``sequential`` repeat the same batches every epoch.
The one-task draws of ``proportional`` and ``temperature`` still change with the epoch.

Resume
------
The training loader (``MultiTaskLoader``, or ``SharedInputLoader`` for a shared-input dataset) implements ``state_dict``/``load_state_dict``; Lightning's fit loop
stores it in the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and restores it, so
``fit(ckpt_path=...)`` continues the same schedule and the same per-task sample order, from the
start of the next epoch or from the middle of the interrupted one; skipped steps load no data.
The data module itself keeps no state (``state_dict()`` stays empty): the position belongs to the
loader, and storing it twice could skip steps twice.

Meta batches
------------
``meta`` is an optional split of held-out batches for a balancer that learns from them during training
(:class:`~lightning_mtl.balancers.AutoLambda`, whose task weights follow the loss on these batches after a
one-step lookahead). It is not a Lightning stage: the model draws from :meth:`MultiTaskDataModule.meta_dataloader`
itself, one batch per meta step. Either form works (per-task datasets may hold a subset of the training tasks, e.g.
only the primary ones). Every meta batch holds every task of the split (``zip``: a shorter task cycles), with the
training ``batch_size`` and ``shuffle``; the order is a pure function of ``(seed, meta epoch)``, in a stream of its
own (``meta`` may be the training dataset itself: its batches are then drawn in another order than the training
batches), and it is sharded across DDP processes like training data (a shared-input ``meta`` dataset like the
shared-input training one: not under ``use_distributed_sampler=False``). The stream runs on from epoch to epoch
of the meta split, independently of the training epochs; its position is one number, the meta batches drawn so
far, which the balancer keeps in its state (so in the checkpoint) and the model seeks to when it draws
(:class:`~lightning_mtl.data.loader.EndlessLoader`). Under DDP its lengths are checked with the training split's.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from functools import partial
from typing import Any, Callable, Optional, Union

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_mtl.data.loader import SHARED_INPUT, MultiTaskLoader, SharedInputLoader
from lightning_mtl.data.sampler import (
    MultiTaskSampler,
    Sampling,
    _check_batch_size,
    _check_sampling,
    _check_task_name,
    _check_temperature,
    _resolve_batch_sizes,
)

Split = Union[Dataset, Mapping[str, Dataset]]
_EVAL_SPLITS = ("val", "test", "predict")
_STAGE_SPLITS = {"fit": ("train", "val", "meta"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
#: The meta stream's permutations are drawn with ``seed + META_SEED_OFFSET``: another stream than training's.
META_SEED_OFFSET = zlib.crc32(b"meta") << 32


def _check_columns(what: str, data: Any) -> None:
    """A tuple of tensors with one first dimension, ``(X, y)``, is columns, not a dataset of items: it would be read
    as a dataset of len(tuple) items and fail later in collation. Refuse it, with the wrapping that works."""
    if (
        isinstance(data, tuple)
        and len(data) >= 2
        and all(isinstance(column, torch.Tensor) and column.ndim >= 1 for column in data)
        and len({column.shape[0] for column in data}) == 1
    ):
        shapes = ", ".join(str(tuple(column.shape)) for column in data)
        raise TypeError(
            f"{what} is a tuple of {len(data)} tensors ({shapes}), i.e. columns (X, y), not a Dataset of items; "
            f"it would be read as a dataset of {len(data)} items. Wrap it: torch.utils.data.TensorDataset(X, y)."
        )


def _check_split(split: str, data: Optional[Split]) -> None:
    if data is None:
        return
    if not isinstance(data, Mapping):
        _check_columns(f"The `{split}` dataset", data)
        if not isinstance(data, IterableDataset) and hasattr(data, "__len__") and len(data) == 0:
            raise ValueError(f"The `{split}` dataset is empty.")
        return
    if not data:
        raise ValueError(f"`{split}` is an empty mapping; give at least one task's dataset.")
    for task, dataset in data.items():
        _check_task_name(task)
        _check_columns(f"The `{split}` dataset of task {task!r}", dataset)
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"The `{split}` dataset of task {task!r} must be map-style (indexable, with a length) "
                f"to be scheduled and sharded; got {type(dataset).__name__}."
            )
        if len(dataset) == 0:
            raise ValueError(f"The `{split}` dataset of task {task!r} is empty.")


def _on_ranks(lengths: list[int]) -> str:
    """``"96 on rank 0; 97 on ranks 1, 2"``."""
    ranks: dict[int, list[int]] = {}
    for rank, length in enumerate(lengths):
        ranks.setdefault(length, []).append(rank)
    return "; ".join(
        f"{length} on rank{'s' if len(group) > 1 else ''} {', '.join(map(str, group))}"
        for length, group in ranks.items()
    )


def _check_lengths_across_processes(
    lengths: Mapping[tuple[str, Optional[str]], int],
    all_gather: Callable[[torch.Tensor], torch.Tensor],
    device: Optional[torch.device] = None,
) -> None:
    """Raise ``ValueError`` on every process unless all processes hold the same dataset lengths.

    ``lengths`` maps ``(split, task)`` (``task=None`` for a shared-input dataset) to this process's
    dataset length; ``all_gather`` stacks a tensor from every process (``strategy.all_gather``).
    Every process must call this with the same keys in the same order: the first gather (entry
    count and a checksum of the keys) makes sure of it before the second gathers the lengths, whose
    shape must agree on every process. Both outcomes are decided from gathered values, identical on
    every process, so all processes raise or none does and no collective is left waiting.
    """
    keys = list(lengths)
    checksum = zlib.crc32(repr(keys).encode())
    header = all_gather(torch.tensor([len(keys), checksum], dtype=torch.int64, device=device)).tolist()
    if any(row != header[0] for row in header):
        raise ValueError(
            f"The processes hold different splits or tasks (datasets per rank: {[row[0] for row in header]}); "
            f"this process has {keys} as (split, task). Build the same datasets on every process."
        )
    if not keys:
        return
    gathered = all_gather(torch.tensor(list(lengths.values()), dtype=torch.int64, device=device))
    per_rank = gathered.reshape(len(header), len(keys)).T.tolist()
    mismatched = [
        f"  `{split}` " + ("dataset" if task is None else f"task {task!r}") + f": {_on_ranks(column)}"
        for (split, task), column in zip(keys, per_rank)
        if any(length != column[0] for length in column)
    ]
    if mismatched:
        raise ValueError(
            f"Dataset lengths differ across the {len(header)} processes, which would then run different "
            "numbers of steps (a hang, or gradient syncs pairing different steps):\n"
            + "\n".join(mismatched)
            + "\nBuild the same datasets on every process (the same files, the same seed for any random split) "
            "and let them be sharded across processes (MultiTaskDataModule shards training data, Lightning's "
            "DistributedSampler shared-input evaluation data) instead of splitting the data per process."
        )


class MultiTaskDataModule(LightningDataModule):
    """Multi-task data for a Lightning ``Trainer``: shared-input or per-task datasets.

    See the module docstring for the batch forms, DDP behaviour and resume.

    Args:
        train: a shared-input ``Dataset`` of ``(x, {task: y})`` or a mapping ``{task: Dataset}`` of
            ``(x, y)``.
        val, test, predict: the evaluation splits, in either form, or ``None``.
        meta: held-out data drawn during training by a balancer that learns from it (``AutoLambda``), in
            either form, or ``None`` (see *Meta batches* in the module docstring).
        batch_size: one batch size, or ``{task: batch_size}`` for per-task datasets.
        sampling: how training steps pick tasks; one of
            :data:`~lightning_mtl.data.sampler.SAMPLING_MODES`.
        temperature: ``T`` of ``temperature`` sampling (probability ∝ ``size ** (1/T)``).
        num_workers, pin_memory: passed to the DataLoader(s).
        seed: seed of the training schedule and permutations (with the epoch).
        shuffle: shuffle training data; evaluation data is never shuffled.
        drop_last: drop incomplete training batches (per task, per process).
        collate_fn: collates a list of items (of one task, for per-task datasets).
    """

    def __init__(
        self,
        train: Split,
        val: Optional[Split] = None,
        test: Optional[Split] = None,
        predict: Optional[Split] = None,
        batch_size: Union[int, Mapping[str, int]] = 32,
        sampling: Sampling = "zip",
        temperature: float = 2.0,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        pin_memory: bool = False,
        collate_fn: Optional[Callable[[list[Any]], Any]] = None,
        meta: Optional[Split] = None,
    ) -> None:
        super().__init__()
        if train is None:
            raise ValueError("`train` is required: a shared-input Dataset or a mapping {task: Dataset}.")
        self.splits: dict[str, Optional[Split]] = {
            "train": train, "val": val, "test": test, "predict": predict, "meta": meta,
        }  # fmt: skip
        for split, data in self.splits.items():
            _check_split(split, data)
        self.sampling = _check_sampling(sampling)
        self.temperature = _check_temperature(temperature)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be a non-negative integer, got {num_workers!r}.")
        if not isinstance(train, Mapping) and sampling != "zip":
            raise ValueError(
                f"sampling={sampling!r} needs per-task datasets; `train` is a single shared-input dataset "
                "whose every batch holds all tasks (only sampling='zip' applies). Pass a mapping "
                "{task: Dataset} to schedule tasks."
            )
        train_tasks = list(train) if isinstance(train, Mapping) else None
        for split in (*_EVAL_SPLITS, "meta"):
            data = self.splits[split]
            if train_tasks is not None and isinstance(data, Mapping):
                unknown = [task for task in data if task not in train_tasks]
                if unknown:
                    raise ValueError(
                        f"`{split}` has task(s) {unknown} that `train` lacks; the training tasks are {train_tasks}."
                    )
        if isinstance(batch_size, Mapping):
            shared = [split for split, data in self.splits.items() if data is not None and not isinstance(data, Mapping)]
            if shared:
                raise ValueError(
                    f"A `batch_size` mapping needs per-task datasets, but {shared} is a single shared-input "
                    "dataset; give one integer batch size."
                )
            _resolve_batch_sizes(batch_size, train_tasks)  # type: ignore[arg-type]
        else:
            _check_batch_size(batch_size, "`batch_size`")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.collate_fn = collate_fn
        for split in _EVAL_SPLITS:
            hook = f"{split}_dataloader"
            if self.splits[split] is None and getattr(type(self), hook) is getattr(MultiTaskDataModule, hook):
                # Lightning runs a stage only if its hook is overridden; the base hook (as a partial,
                # which pickles) marks the split absent, as `LightningDataModule.from_datasets` does.
                setattr(self, hook, partial(getattr(LightningDataModule, hook), self))

    @property
    def task_names(self) -> Optional[list[str]]:
        """The training tasks of per-task datasets, or ``None`` for a shared-input dataset."""
        train = self.splits["train"]
        return list(train) if isinstance(train, Mapping) else None

    def _replicas(self) -> tuple[Optional[int], Optional[int]]:
        trainer = self.trainer
        kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
        if kwargs:
            return int(kwargs["rank"]), int(kwargs["num_replicas"])
        return None, None

    def setup(self, stage: str) -> None:
        """Under a multi-process strategy, check that every process holds the same dataset lengths.

        Lightning calls ``setup`` on every process, so the check's collectives line up; it raises
        ``ValueError`` on every process if the lengths of a split the stage uses differ (see the
        module docstring). A subclass overriding ``setup`` should call ``super().setup(stage)``.
        """
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return
        # A shared-input dataset is sharded across processes only with this option (see the module docstring).
        distributed_sampler = self._lightning_shards_shared_input()
        lengths: dict[tuple[str, Optional[str]], int] = {}
        for split in _STAGE_SPLITS.get(stage, tuple(self.splits)):
            data = self.splits[split]
            if isinstance(data, Mapping):
                for task, dataset in data.items():
                    lengths[(split, task)] = len(dataset)  # type: ignore[arg-type]
            elif (
                data is not None
                and distributed_sampler
                and not isinstance(data, IterableDataset)
                and hasattr(data, "__len__")
            ):
                lengths[(split, None)] = len(data)  # type: ignore[arg-type]
        _check_lengths_across_processes(lengths, trainer.strategy.all_gather, trainer.strategy.root_device)

    def _loader(self, split: str) -> Any:
        data = self.splits[split]
        if data is None:
            return []
        training = split == "train"
        if not isinstance(data, Mapping):
            if training and not isinstance(data, IterableDataset):
                return self._shared_input_training_loader(data)
            # Evaluation in dataset order; an IterableDataset yields its own order (a DataLoader refuses any
            # shuffle option for it) and carries no resumable position.
            return DataLoader(
                data,
                batch_size=self.batch_size,  # type: ignore[arg-type]
                drop_last=training and self.drop_last,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                collate_fn=self.collate_fn,
            )
        batch_size = self.batch_size
        if isinstance(batch_size, Mapping):
            batch_size = {task: batch_size[task] for task in data}
        rank, world_size = self._replicas()
        sampler = MultiTaskSampler(
            {task: len(dataset) for task, dataset in data.items()},  # type: ignore[arg-type]
            batch_size=batch_size,
            sampling=self.sampling if training else "sequential",
            temperature=self.temperature,
            seed=self.seed,
            shuffle=training and self.shuffle and not self._overfitting(),
            drop_last=training and self.drop_last,
            pad=split != "predict",
            rank=rank,
            world_size=world_size,
        )
        return MultiTaskLoader(
            data,
            sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def _shared_input_training_loader(self, data: Dataset) -> SharedInputLoader:
        """A resumable loader over a map-style shared-input dataset, sharded by us as Lightning would shard it."""
        rank, world_size = self._replicas()
        if self.trainer is not None and not self._lightning_shards_shared_input():
            rank, world_size = 0, 1  # use_distributed_sampler=False: each process reads its whole dataset
        sampler = MultiTaskSampler(
            {SHARED_INPUT: len(data)},  # type: ignore[arg-type]
            batch_size=self.batch_size,  # type: ignore[arg-type]
            sampling="zip",
            seed=self.seed,
            shuffle=self.shuffle and not self._overfitting(),
            drop_last=self.drop_last,
            rank=rank,
            world_size=world_size,
        )
        return SharedInputLoader(
            data, sampler, collate_fn=self.collate_fn, num_workers=self.num_workers, pin_memory=self.pin_memory
        )

    def _overfitting(self) -> bool:
        """``Trainer(overfit_batches=...)``: the same first batches every epoch, so no shuffling (Lightning's rule)."""
        return self.trainer is not None and bool(self.trainer.overfit_batches)

    def _lightning_shards_shared_input(self) -> bool:
        """Whether the Trainer's ``use_distributed_sampler`` asks for a shared-input dataset to be sharded."""
        return bool(getattr(self.trainer._accelerator_connector, "use_distributed_sampler", False))

    def meta_dataloader(self) -> Union[MultiTaskLoader, SharedInputLoader]:
        """The ``meta`` split's loader, for a balancer that learns from held-out batches (see *Meta batches*).

        ``ValueError`` when there is no ``meta`` split, naming the argument to set.
        """
        data = self.splits["meta"]
        if data is None:
            raise ValueError(
                f"{type(self).__name__} has no `meta` split, which the balancer draws held-out batches from during "
                "training: pass MultiTaskDataModule(meta=...) (a held-out shared-input Dataset or {task: Dataset}, "
                "e.g. a slice of the training data set aside; the training dataset itself also works)."
            )
        if isinstance(data, IterableDataset):
            raise TypeError(
                "The `meta` dataset is an IterableDataset; it must be map-style (indexable, with a length) to be drawn "
                "in a resumable, sharded order."
            )
        rank, world_size = self._replicas()
        shared = not isinstance(data, Mapping)
        if shared and self.trainer is not None and not self._lightning_shards_shared_input():
            rank, world_size = 0, 1  # as for shared-input training data
        sizes = {SHARED_INPUT: len(data)} if shared else {task: len(dataset) for task, dataset in data.items()}  # type: ignore[arg-type, union-attr]
        batch_size = self.batch_size
        if isinstance(batch_size, Mapping):
            batch_size = {task: batch_size[task] for task in sizes}
        sampler = MultiTaskSampler(
            sizes,
            batch_size=batch_size,
            sampling="zip",
            seed=self.seed + META_SEED_OFFSET,
            shuffle=self.shuffle,
            rank=rank,
            world_size=world_size,
        )
        options = dict(collate_fn=self.collate_fn, num_workers=self.num_workers, pin_memory=self.pin_memory)
        if shared:
            return SharedInputLoader(data, sampler, **options)  # type: ignore[arg-type]
        return MultiTaskLoader(data, sampler, **options)  # type: ignore[arg-type]

    def train_dataloader(self) -> Any:
        return self._loader("train")

    def val_dataloader(self) -> Any:
        return self._loader("val")

    def test_dataloader(self) -> Any:
        return self._loader("test")

    def predict_dataloader(self) -> Any:
        return self._loader("predict")
