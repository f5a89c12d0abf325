"""`MultiDigitsDataModule`: the main job's data, shared-input MultiDigits batches for train/val/test/predict."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_mtl.data.datamodule import MultiTaskDataModule
from lightning_mtl.datasets.multidigits import MultiDigits, _check_seed, _check_size, _check_tasks, _is_int


class MultiDigitsDataModule(MultiTaskDataModule):
    """Shared-input ``(x, {task: y})`` batches of :class:`MultiDigits` for train/val/test/predict.

    A :class:`~lightning_mtl.data.MultiTaskDataModule` over one shared-input :class:`MultiDigits` dataset per
    split, so it has that module's guarantees: the training order is a pure function of ``(seed, epoch)``,
    sharded across DDP processes, and ``fit(ckpt_path=...)`` continues the same sample order, from the next
    epoch or the middle of the interrupted one. ``x`` has shape ``(batch_size, 1, 12, 20)``; ``"left"`` and
    ``"right"`` targets are ``int64`` of shape ``(batch_size,)`` and ``"sum"`` is standardised ``float32`` of
    shape ``(batch_size,)``. Validation and test are in dataset order; ``predict`` serves the test split.

    Args:
        batch_size: items per batch.
        train_size: number of training composites.
        val_size: number of validation composites.
        test_size: number of test composites (also used for predict).
        seed: seed of the composites and of the training order.
        num_workers: DataLoader worker processes.
        tasks: tasks whose targets the batches carry, a subset of ``MultiDigits.TASKS``.
        split_seed: seed of the source-image partition between splits.
    """

    def __init__(
        self,
        batch_size: int = 64,
        train_size: int = 10_000,
        val_size: int = 2_000,
        test_size: int = 2_000,
        seed: int = 0,
        num_workers: int = 0,
        tasks: Sequence[str] = ("left", "right", "sum"),
        split_seed: int = 0,
    ) -> None:
        sizes = {"train": train_size, "val": val_size, "test": test_size}
        _check_size("batch_size", batch_size)
        for split, value in sizes.items():
            _check_size(f"{split}_size", value)
        _check_seed("seed", seed)
        _check_seed("split_seed", split_seed)
        if not _is_int(num_workers) or num_workers < 0:
            raise ValueError(f"`num_workers` must be a non-negative int, got {num_workers!r}.")
        tasks = _check_tasks(tasks)
        self.datasets = {
            split: MultiDigits(split, size=size, seed=seed, tasks=tasks, split_seed=split_seed)
            for split, size in sizes.items()
        }
        super().__init__(
            train=self.datasets["train"],
            val=self.datasets["val"],
            test=self.datasets["test"],
            predict=self.datasets["test"],
            batch_size=batch_size,
            seed=seed,
            num_workers=num_workers,
        )
        self.save_hyperparameters()
        self.sizes = sizes
        self.tasks = tasks
        self.split_seed = split_seed
