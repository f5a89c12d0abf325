"""`TaskPredictionWriter`: ``predict`` outputs written to disk, one file per task."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from lightning_mtl.runs import run_dir

# (dataloader index, task) -> the task's prediction batches on this process, and their sample indices (or None)
_Share = dict[tuple[int, str], tuple[list[Tensor], list[Optional[list[int]]]]]


class TaskPredictionWriter(BasePredictionWriter):
    """Writes what ``predict`` returns, one file per task, into the run's ``predictions/`` folder.

    ``MultiTaskModule.predict_step`` returns ``{task: prediction}`` for each batch: every task for a shared-input
    batch, the batch's own task for a per-task one. The writer keeps each task's predictions (on the CPU) and
    writes them when prediction ends:

    * ``format="pt"`` (default): ``<task>.pt``, saved with ``torch.save``: one tensor whose rows are the task's
      samples in the order of the predict dataloader (the batches concatenated). If the batches' trailing shapes
      differ (e.g. sequences of different lengths) it holds a list of per-sample tensors instead.
      ``torch.load(path)`` reads it back.
    * ``format="csv"``: ``<task>.csv``, one row per sample: a column ``<task>`` for 1-D predictions, or
      ``<task>_0`` ... ``<task>_<k-1>`` for 2-D ones; other shapes are refused at the first batch.

    Several predict dataloaders give ``<task>-dataloader<i>.pt`` (``.csv``).

    Under several processes each one predicts its share; the shares are gathered on process 0, which writes
    the files. When Lightning knows every sample's index in the dataset (a ``DataLoader``, whose sampler it
    wraps for prediction) the rows are put back in dataset order, so the files equal those of a one-process run.
    When it does not (``MultiTaskDataModule``'s per-task loader), process ``r``'s share goes to
    ``<task>-rank<r>.pt`` in that process's order, as it does when processes do not communicate through
    ``torch.distributed`` (each then writes its own).

    Args:
        output_dir: the folder to write into; ``None`` (default) is ``predictions/`` in the run's own folder,
            beside its ``config.yaml`` and ``checkpoints/`` (see :func:`lightning_mtl.runs.run_dir`).
        format: ``"pt"`` or ``"csv"``.

    The folder must be new or empty: existing predictions are never overwritten (a ``FileExistsError`` at the
    start of ``predict`` names the folder). After writing, :attr:`written` holds the paths of the files.
    """

    def __init__(self, output_dir: Optional[str] = None, format: Literal["pt", "csv"] = "pt") -> None:
        super().__init__(write_interval="batch")
        if format not in ("pt", "csv"):
            raise ValueError(f"format must be 'pt' or 'csv', got {format!r}")
        self.output_dir = output_dir
        self.format = format
        self.written: list[str] = []
        self._folder: Optional[str] = None
        self._share: _Share = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        folder = self.output_dir
        if folder is None:
            folder = os.path.join(trainer.strategy.broadcast(run_dir(trainer)), "predictions")
        used = False
        if trainer.is_global_zero:
            fs = get_filesystem(folder)
            used = fs.isdir(folder) and bool(fs.ls(folder, detail=False))
        if trainer.strategy.broadcast(used):
            raise FileExistsError(
                f"{folder} already holds files: TaskPredictionWriter never overwrites predictions. Give it another "
                "output_dir (--trainer.callbacks with a TaskPredictionWriter and init_args.output_dir), or move the "
                "old predictions away."
            )
        self._folder = folder

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._share = {}
        self.written = []

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Optional[Sequence[int]],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if prediction is None:
            return
        if not isinstance(prediction, Mapping):
            raise TypeError(
                f"TaskPredictionWriter expects predict_step to return {{task: tensor}}, got {type(prediction).__name__}"
            )
        for task, value in prediction.items():
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"task {task!r}: TaskPredictionWriter writes tensors, but predict_step returned a "
                    f"{type(value).__name__}; subclass it and override write_on_batch_end for other outputs"
                )
            if self.format == "csv" and value.ndim not in (1, 2):
                raise ValueError(
                    f"task {task!r}: format='csv' writes 1-D or 2-D predictions, got shape {tuple(value.shape)}; "
                    "use format='pt'"
                )
            rows, indices = self._share.setdefault((dataloader_idx, str(task)), ([], []))
            rows.append(value.detach().cpu())
            known = batch_indices is not None and len(batch_indices) == len(value)
            indices.append(list(batch_indices) if known else None)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        shares = _gather(self._share, trainer)
        self._share = {}
        if shares is None:  # gathered on process 0
            return
        assert self._folder is not None
        fs = get_filesystem(self._folder)
        fs.makedirs(self._folder, exist_ok=True)
        several_loaders = len({loader for share in shares.values() for loader, _ in share}) > 1
        for (loader, task), parts in _merge(shares, trainer.world_size).items():
            for rank, value in parts:
                name = task + (f"-dataloader{loader}" if several_loaders else "")
                name += f"-rank{rank}" if rank is not None else ""
                path = os.path.join(self._folder, f"{name}.{self.format}")
                with fs.open(path, "wb") as file:
                    if self.format == "pt":
                        torch.save(value, file)
                    else:
                        file.write(_csv(task, value).encode())
                self.written.append(path)
        names = ", ".join(os.path.basename(path) for path in self.written)
        rank_zero_info(f"Predictions written to {self._folder}: {names}")


def _gather(share: _Share, trainer: Trainer) -> Optional[dict[int, _Share]]:
    """Every process's share by rank, on process 0 (None on the others). Without ``torch.distributed`` each process
    keeps its own."""
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return {trainer.global_rank: share}
    shares: Optional[list[Any]] = [None] * trainer.world_size if dist.get_rank() == 0 else None
    dist.gather_object(share, shares, dst=0)
    return dict(enumerate(shares)) if shares is not None else None


def _merge(
    shares: dict[int, _Share], world_size: int
) -> dict[tuple[int, str], list[tuple[Optional[int], Union[Tensor, list[Tensor]]]]]:
    """Each (dataloader, task)'s predictions: one part (rank None) in dataloader order when that order is known,
    else one part per process."""
    merged = {}
    for key in sorted({key for share in shares.values() for key in share}):
        held = [(rank, share[key]) for rank, share in shares.items() if key in share]
        if world_size == 1:
            merged[key] = [(None, _rows(held[0][1][0]))]
            continue
        indices = [index for _, (_, batches) in held for index in batches]
        if len(shares) < world_size or any(index is None for index in indices):
            merged[key] = [(rank, _rows(rows)) for rank, (rows, _) in held]
            continue
        order = torch.tensor([i for index in indices for i in index]).argsort(stable=True)
        rows = _rows([batch for _, (batches, _) in held for batch in batches])
        merged[key] = [(None, rows[order] if isinstance(rows, Tensor) else [rows[i] for i in order.tolist()])]
    return merged


def _rows(batches: list[Tensor]) -> Union[Tensor, list[Tensor]]:
    """The batches as one tensor, or as a list of per-sample tensors when their trailing shapes differ."""
    if len({tuple(batch.shape[1:]) for batch in batches}) <= 1:
        return torch.cat(batches) if batches else torch.empty(0)
    return [row for batch in batches for row in batch.unbind(0)]


def _csv(task: str, value: Union[Tensor, list[Tensor]]) -> str:
    if not isinstance(value, Tensor):
        raise ValueError(f"task {task!r}: format='csv' needs predictions of one shape; use format='pt'")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    if value.ndim == 1:
        writer.writerow([task])
        writer.writerows([row] for row in value.tolist())
    else:
        writer.writerow([f"{task}_{j}" for j in range(value.shape[1])])
        writer.writerows(value.tolist())
    return text.getvalue()
