"""MultiDigits: a small, bundled, deterministic MultiMNIST-style multi-task dataset.

MultiMNIST (Sabour et al., 2017, "Dynamic Routing Between Capsules"; used for multi-task
learning by Sener & Koltun, 2018, "Multi-Task Learning as Multi-Objective Optimization")
overlays two MNIST digits in one image and asks for the class of each. MultiDigits does the
same with scikit-learn's bundled UCI optical digits (1,797 images of 8×8 pixels, values
0..16), so it needs no download and builds in a fraction of a second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from numbers import Integral

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

_SPLITS = ("train", "val", "test")
_DIGIT = 8
_MAX_VALUE = 16.0
_MAX_ROW_OFFSET = 4
_MAX_LEFT_COLUMN = 3
_MAX_OVERLAP = 4


@lru_cache(maxsize=1)
def _load_sources() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "MultiDigits is built from scikit-learn's bundled digits. "
            "Install it with `pip install lightning-mtl[examples]` or `pip install scikit-learn`."
        ) from error
    digits = load_digits()
    images = digits.images.astype(np.float32) / _MAX_VALUE
    targets = digits.target.astype(np.int64)
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tasks, str):
        raise ValueError(f"`tasks` must be a sequence of task names, got the string {tasks!r}.")
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError(f"`tasks` must name at least one of {MultiDigits.TASKS}.")
    unknown = [task for task in tasks if task not in MultiDigits.TASKS]
    if unknown:
        raise ValueError(f"`tasks` has unknown task(s) {unknown}; choose from {MultiDigits.TASKS}.")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"`tasks` has duplicates: {list(tasks)}.")
    return tasks


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"`{name}` must be in (0, 1), got {value}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"`val_fraction + test_fraction` must be below 1 to leave source images for training, "
            f"got {val_fraction} + {test_fraction}."
        )


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_seed(name: str, value: int) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative int, got {value!r}.")


def _check_size(name: str, value: int) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


class MultiDigits(Dataset):
    """Two UCI digits side by side in one 1×12×20 image, labelled for several tasks.

    Each item is ``(x, {task: y})``: ``x`` is a ``float32`` tensor of shape ``(1, 12, 20)``
    with values in ``[0, 1]``, and the targets are 0-dim tensors:

    - ``"left"``: class of the left digit, ``int64`` in ``0..9``.
    - ``"right"``: class of the right digit, ``int64`` in ``0..9``.
    - ``"sum"``: ``left + right`` as ``float32``. With ``standardize_sum=True`` (default) it is
      ``(left + right - SUM_MEAN) / SUM_STD`` with the fixed constants ``SUM_MEAN = 9`` and
      ``SUM_STD = sqrt(16.5)``, the mean and standard deviation of the sum of two independent
      uniform digits, so every split and seed uses the same scale.

    Composition (MultiMNIST-style): the left digit is placed at a random row offset in
    ``0..4`` and column offset in ``0..3``; the right digit at its own random row offset, with
    its column shifted right of the left one by ``8 - overlap`` pixels, ``overlap`` in
    ``0..4``. The two layers are combined by a pixel-wise maximum.

    Splits are disjoint by *source image*: the 1,797 source images are partitioned per class
    (stratified) by ``split_seed`` into train/val/test pools, and the composites of a split use
    only its own pool, so no digit image is shared across splits. The partition does not depend
    on ``seed``, so splits built with different ``seed`` values never leak into each other.
    ``seed`` picks the composites: the same ``(split, size, seed, split_seed, fractions)`` always
    gives identical tensors, and ``tasks`` only selects which targets are returned.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        size: number of composites; ``None`` uses ``DEFAULT_SIZES[split]``
            (train 10,000, val 2,000, test 2,000).
        seed: seed of the composites (which source images, offsets and overlaps).
        tasks: targets returned by ``__getitem__``, a subset of ``TASKS``.
        val_fraction: fraction of each class's source images reserved for validation.
        test_fraction: fraction of each class's source images reserved for testing.
        split_seed: seed of the source-image partition.
        standardize_sum: whether the ``"sum"`` target is standardised (see above).

    Attributes:
        images: ``float32`` tensor ``(N, 1, 12, 20)``.
        targets: ``{task: tensor (N,)}`` for the selected tasks.
        digits: ``int64`` tensor ``(N, 2)``, the left and right digit classes.
        source_indices: ``int64`` tensor ``(N, 2)``, indices into ``load_digits()`` of the left
            and right source images.
    """

    TASKS: tuple[str, ...] = ("left", "right", "sum")
    NUM_CLASSES: int = 10
    IMAGE_SIZE: tuple[int, int] = (_DIGIT + _MAX_ROW_OFFSET, 2 * _DIGIT + _MAX_LEFT_COLUMN + 1)
    IMAGE_SHAPE: tuple[int, int, int] = (1, *IMAGE_SIZE)
    DEFAULT_SIZES: Mapping[str, int] = {"train": 10_000, "val": 2_000, "test": 2_000}
    SUM_MEAN: float = 9.0
    SUM_STD: float = math.sqrt(16.5)

    def __init__(
        self,
        split: str = "train",
        size: int | None = None,
        seed: int = 0,
        tasks: Sequence[str] = ("left", "right", "sum"),
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        standardize_sum: bool = True,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"`split` must be one of {_SPLITS}, got {split!r}.")
        size = self.DEFAULT_SIZES[split] if size is None else size
        _check_size("size", size)
        _check_seed("seed", seed)
        _check_seed("split_seed", split_seed)
        self.tasks = _check_tasks(tasks)
        self.split = split
        self.seed = seed
        self.standardize_sum = standardize_sum

        sources, classes = _load_sources()
        pool = self.source_partition(val_fraction, test_fraction, split_seed)[split].numpy()
        classes_in_pool = len(np.unique(classes[pool]))
        if classes_in_pool < self.NUM_CLASSES:
            fraction = "1 - val_fraction - test_fraction" if split == "train" else f"`{split}_fraction`"
            raise ValueError(
                f"{fraction} leaves the {split!r} split source images of {classes_in_pool} of the "
                f"{self.NUM_CLASSES} digit classes; raise it (each class gets round(n * fraction) of its n images)."
            )
        rng = np.random.default_rng([seed, _SPLITS.index(split)])
        source_indices = pool[rng.integers(len(pool), size=(size, 2))]
        rows = rng.integers(_MAX_ROW_OFFSET + 1, size=(size, 2))
        left_column = rng.integers(_MAX_LEFT_COLUMN + 1, size=size)
        overlap = rng.integers(_MAX_OVERLAP + 1, size=size)
        columns = np.stack([left_column, left_column + _DIGIT - overlap], axis=1)

        height, width = self.IMAGE_SIZE
        item = np.arange(size)[:, None, None]
        pixel = np.arange(_DIGIT)
        layers = np.zeros((2, size, height, width), dtype=np.float32)
        for side in range(2):
            layer_rows = rows[:, side, None, None] + pixel[None, :, None]
            layer_columns = columns[:, side, None, None] + pixel[None, None, :]
            layers[side][item, layer_rows, layer_columns] = sources[source_indices[:, side]]
        images = np.maximum(layers[0], layers[1])[:, None]

        digits = classes[source_indices]
        total = digits.sum(axis=1).astype(np.float32)
        if standardize_sum:
            total = (total - self.SUM_MEAN) / self.SUM_STD
        all_targets = {
            "left": torch.from_numpy(digits[:, 0].copy()),
            "right": torch.from_numpy(digits[:, 1].copy()),
            "sum": torch.from_numpy(total.astype(np.float32)),
        }
        self.images = torch.from_numpy(images)
        self.targets = {task: all_targets[task] for task in self.tasks}
        self.digits = torch.from_numpy(digits)
        self.source_indices = torch.from_numpy(source_indices)

    @staticmethod
    def source_partition(
        val_fraction: float = 0.15, test_fraction: float = 0.15, split_seed: int = 0
    ) -> dict[str, Tensor]:
        """The sorted ``load_digits()`` indices of the source images of each split.

        Each class is shuffled by ``split_seed`` and cut into test, val and train parts of
        ``round(n * test_fraction)``, ``round(n * val_fraction)`` and the remaining images.
        """
        _check_fractions(val_fraction, test_fraction)
        _check_seed("split_seed", split_seed)
        _, classes = _load_sources()
        rng = np.random.default_rng(split_seed)
        parts: dict[str, list[np.ndarray]] = {split: [] for split in _SPLITS}
        for label in range(MultiDigits.NUM_CLASSES):
            members = rng.permutation(np.flatnonzero(classes == label))
            n_test = round(len(members) * test_fraction)
            n_val = round(len(members) * val_fraction)
            parts["test"].append(members[:n_test])
            parts["val"].append(members[n_test : n_test + n_val])
            parts["train"].append(members[n_test + n_val :])
        return {split: torch.from_numpy(np.sort(np.concatenate(parts[split]))) for split in _SPLITS}

    def task_dataset(
        self, task: str, indices: Sequence[int] | Tensor | None = None
    ) -> TensorDataset:
        """A per-task view with ``(x, y)`` items, optionally restricted to ``indices``."""
        if task not in self.targets:
            raise ValueError(
                f"`task` must be one of this dataset's tasks {self.tasks}, got {task!r}."
            )
        if indices is None:
            return TensorDataset(self.images, self.targets[task])
        index = torch.as_tensor(indices)
        if index.dtype == torch.bool:  # a mask over the items
            if index.shape != (len(self),):
                raise ValueError(f"a boolean `indices` mask must have one entry per item ({len(self)}), got {tuple(index.shape)}.")
            index = index.nonzero().flatten()
        return TensorDataset(self.images[index.long()], self.targets[task][index.long()])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.images[index], {task: target[index] for task, target in self.targets.items()}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, size={len(self)}, seed={self.seed}, "
            f"tasks={self.tasks})"
        )


def multidigits_per_task(
    split: str = "train",
    size: int | Mapping[str, int] | None = None,
    seed: int = 0,
    tasks: Sequence[str] = ("left", "right", "sum"),
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    standardize_sum: bool = True,
) -> dict[str, TensorDataset]:
    """One MultiDigits dataset per task, each with its own composites: the multi-dataset form.

    Every task gets ``(x, y)`` items drawn from disjoint slices of one ``MultiDigits`` build, so
    the tasks see different images (as separate datasets would) while splits stay disjoint by
    source image. ``size`` is the number of items per task: an int for all tasks, a mapping
    ``{task: size}`` naming every task (sizes may differ), or ``None`` for
    ``MultiDigits.DEFAULT_SIZES[split]`` each.
    """
    tasks = _check_tasks(tasks)
    if split not in _SPLITS:
        raise ValueError(f"`split` must be one of {_SPLITS}, got {split!r}.")
    if size is None or _is_int(size):
        sizes = {task: MultiDigits.DEFAULT_SIZES[split] if size is None else size for task in tasks}
    elif not isinstance(size, Mapping):
        raise ValueError(f"`size` must be an int, a mapping {{task: int}} or None, got {size!r}.")
    else:
        missing = [task for task in tasks if task not in size]
        extra = [task for task in size if task not in tasks]
        if missing or extra:
            raise ValueError(
                f"`size` must give a size for exactly the tasks {tasks}; "
                f"missing {missing}, extra {extra}."
            )
        sizes = dict(size)
    for task, task_size in sizes.items():
        _check_size(f"size[{task!r}]", task_size)
    base = MultiDigits(
        split,
        size=sum(sizes.values()),
        seed=seed,
        tasks=tasks,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        split_seed=split_seed,
        standardize_sum=standardize_sum,
    )
    datasets = {}
    start = 0
    for task in tasks:
        datasets[task] = base.task_dataset(task, torch.arange(start, start + sizes[task]))
        start += sizes[task]
    return datasets


class MultiDigitsTask(Dataset):
    """One task of :class:`MultiDigits` as its own dataset of ``(x, y)`` items: the per-task form, for YAML.

    ``MultiTaskDataModule(train={"left": MultiDigitsTask("left", seed=1), "sum": MultiDigitsTask("sum", size=300,
    seed=2)}, sampling=...)`` and the same with ``class_path`` per task in a config. Items are ``x`` of shape
    ``(1, 12, 20)`` and the task's 0-dim target, as in :class:`MultiDigits`. Tasks built with the same ``split``,
    ``size`` and ``seed`` have the same images; any other ``size`` or ``seed`` gives other composites (a smaller
    ``size`` is not a subset of a larger one). Give each task its own ``seed`` for tasks with different images, as
    separate datasets would have. Splits stay disjoint by source image.

    Args:
        task: one of ``MultiDigits.TASKS``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        size: number of items; ``None`` uses ``MultiDigits.DEFAULT_SIZES[split]``.
        seed, split_seed, val_fraction, test_fraction, standardize_sum: as for :class:`MultiDigits`.
    """

    def __init__(
        self,
        task: str,
        split: str = "train",
        size: int | None = None,
        seed: int = 0,
        split_seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        standardize_sum: bool = True,
    ) -> None:
        if not isinstance(task, str) or task not in MultiDigits.TASKS:
            raise ValueError(f"`task` must be one of {MultiDigits.TASKS}, got {task!r}.")
        source = MultiDigits(
            split,
            size=size,
            seed=seed,
            tasks=(task,),
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            split_seed=split_seed,
            standardize_sum=standardize_sum,
        )
        self.task, self.split, self.seed = task, split, seed
        self.images, self.targets = source.images, source.targets[task]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.targets[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        index = torch.as_tensor(indices)
        return list(zip(self.images[index], self.targets[index]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, split={self.split!r}, size={len(self)}, seed={self.seed})"
