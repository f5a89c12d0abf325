"""Pictures of a run through the ``Trainer``'s loggers: one helper for every diagnostic callback.

:func:`log_figure` renders a matplotlib figure once and hands it to each logger of the trainer in the
form that logger shows:

- ``WandbLogger``: a ``wandb.Image`` under the key (and, given ``table``, a ``wandb.Table`` under
  ``{key}_table``);
- ``TensorBoardLogger``: an image under the key (``add_image`` of the rendered figure, what
  ``add_figure`` would draw, without drawing it a second time);
- a ``CSVLogger``, any other logger, or no logger at all: ``figures/{key}/step_{step}.png`` and, given
  ``data``, ``step_{step}.json`` beside it, in the run's log directory (:func:`run_dir`).

Only global rank zero draws and writes; the others return at once. matplotlib is an optional
dependency (``pip install lightning-mtl[plots]``); the callbacks call :func:`require_matplotlib` when
they are built, so a missing install fails before training, not at the first picture. Figures are made
with ``matplotlib.figure.Figure`` (not ``pyplot``): no global figure registry, no GUI backend.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install lightning-mtl[plots]"


def require_matplotlib(what: str = "this callback") -> None:
    """Raise ``ImportError`` with the install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{what} draws its pictures with matplotlib, which is not installed: {INSTALL_HINT}") from error


def logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning gives the loggers for the current training batch (as ``LearningRateMonitor`` does).

    Read in ``on_train_batch_end`` it is the step under which that batch's ``self.log`` values are written, so
    a callback's values line up with ``train/loss`` in every logger.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def run_dir(trainer: pl.Trainer) -> Path:
    """The run's log directory, read without a collective (call it on rank zero only, unlike ``trainer.log_dir``).

    A ``TensorBoardLogger``'s or ``CSVLogger``'s ``log_dir``; for a ``WandbLogger`` the run's files directory (what
    is written there travels with the run); else the first logger's ``save_dir``; without a logger
    ``trainer.default_root_dir``.
    """
    for logger in trainer.loggers:
        if isinstance(logger, (TensorBoardLogger, CSVLogger)):
            return Path(logger.log_dir)
        if isinstance(logger, WandbLogger):
            return Path(logger.experiment.dir)
        if logger.save_dir is not None:
            return Path(logger.save_dir)
    return Path(trainer.default_root_dir)


def log_figure(
    trainer: pl.Trainer,
    key: str,
    figure: "Figure",
    step: Optional[int] = None,
    data: Optional[Mapping[str, Any]] = None,
    table: Optional[tuple[Sequence[str], Sequence[Sequence[Any]]]] = None,
) -> list[Path]:
    """Log ``figure`` under ``key`` through every logger of ``trainer`` (rank zero only); close it.

    Args:
        key: the logged name, ``{stage}/{what}`` (e.g. ``"train/gradients/cosine"``).
        figure: a matplotlib ``Figure``.
        step: the step the picture belongs to; default :func:`logger_step`.
        data: the numbers drawn, JSON-serialisable: written beside the PNG where files are written.
        table: ``(columns, rows)``: a ``wandb.Table`` for a ``WandbLogger``.

    Returns the files written (none when every logger shows pictures itself, or on another rank).
    """
    if not trainer.is_global_zero:
        return []
    step = logger_step(trainer) if step is None else step
    image = _render(figure)
    written: list[Path] = []
    file_dirs: list[Path] = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            _log_wandb(logger, key, image, step, table)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")
        else:
            file_dirs.append(_logger_dir(trainer, logger))
    if not trainer.loggers:
        file_dirs.append(Path(trainer.default_root_dir))
    for directory in dict.fromkeys(file_dirs):  # one copy per directory
        written += _write_files(directory, key, step, image, data)
    return written


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as JSON (NaN as null), creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=1, allow_nan=False))
    return path


# ---------------------------------------------------------------------------------------- drawing


def heatmap(
    matrix: Sequence[Sequence[float]],
    labels: Sequence[str],
    title: str,
    *,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    cmap: str = "RdBu_r",
    xlabel: str = "",
    ylabel: str = "",
    colorbar: str = "",
) -> "Figure":
    """A K × K matrix as a labelled heatmap; up to 8 × 8 each cell is annotated with its value (NaN cells left blank:
    drawing text is most of a picture's cost, and a larger matrix's numbers are in its table or JSON).

    Without ``vmin``/``vmax`` the colour scale is symmetric around 0 (``±`` the largest absolute value), so that
    the diverging colour map shows the sign.
    """
    import numpy as np
    from matplotlib.figure import Figure

    values = np.asarray(matrix, dtype=float)
    if vmin is None or vmax is None:
        finite = np.abs(values[np.isfinite(values)])
        bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        vmin, vmax = (-bound if vmin is None else vmin), (bound if vmax is None else vmax)
    size = len(labels)
    rotate = size > 4
    # Fixed margins sized for the labels (a layout engine would double the drawing time).
    label = max((len(str(name)) for name in labels), default=1) * 0.075
    side = min(2.5 + 0.5 * size, 12.0)
    left, bottom = 0.45 + label + (0.25 if ylabel else 0.0), 0.45 + (label * 0.75 if rotate else 0.15) + (0.25 if xlabel else 0.0)
    width, height = left + side + 1.4, bottom + side + 0.45
    figure = Figure(figsize=(width, height))
    axes = figure.add_axes((left / width, bottom / height, side / width, side / height))
    shown = axes.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax)
    axes.set_xticks(range(size), labels=list(labels), rotation=45 if rotate else 0, ha="right" if rotate else "center")
    axes.set_yticks(range(size), labels=list(labels))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    if size <= 8:
        span = max(abs(vmin), abs(vmax)) or 1.0
        for i in range(size):
            for j in range(size):
                if math.isfinite(values[i, j]):
                    light = abs(values[i, j]) > 0.6 * span
                    axes.text(j, i, f"{values[i, j]:.2g}", ha="center", va="center", fontsize=8, color="white" if light else "black")
    bar = figure.add_axes(((left + side + 0.15) / width, bottom / height, 0.18 / width, side / height))
    figure.colorbar(shown, cax=bar, label=colorbar)
    return figure


def line_chart(x: Sequence[float], series: Mapping[str, Sequence[float]], title: str, xlabel: str, ylabel: str) -> "Figure":
    """One line per entry of ``series`` against ``x``, with a legend: e.g. the K task weights over the steps."""
    from matplotlib.figure import Figure

    names = [str(name) for name in series]
    legend = 0.3 + 0.075 * max((len(name) for name in names), default=0)
    width, height = 7.0 + legend, 4.0
    figure = Figure(figsize=(width, height))
    axes = figure.add_axes((0.8 / width, 0.55 / height, (width - legend - 1.0) / width, (height - 0.95) / height))
    for name, values in series.items():
        axes.plot(list(x), list(values), label=name, linewidth=1.4, marker="o" if len(x) == 1 else None)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if series:
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return figure


# ---------------------------------------------------------------------------------------- loggers


def _render(figure: "Figure") -> Any:
    """The figure as an RGB array (H × W × 3, uint8), drawn once for every logger; the figure is released."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    image = np.array(canvas.buffer_rgba())[:, :, :3]
    figure.clear()
    return image


def _log_wandb(logger: WandbLogger, key: str, image: Any, step: int, table: Optional[tuple[Sequence[str], Sequence[Sequence[Any]]]]) -> None:
    import wandb

    entries: dict[str, Any] = {key: [wandb.Image(image)]}
    if table is not None:
        columns, rows = table
        entries[f"{key}_table"] = wandb.Table(columns=list(columns), data=[list(row) for row in rows])
    logger.log_metrics(entries, step=step)  # one history row; Lightning adds trainer/global_step = step


def _logger_dir(trainer: pl.Trainer, logger: Logger) -> Path:
    directory = getattr(logger, "log_dir", None) or logger.save_dir
    return Path(directory) if directory is not None else Path(trainer.default_root_dir)


def _write_files(directory: Path, key: str, step: int, image: Any, data: Optional[Mapping[str, Any]]) -> list[Path]:
    from matplotlib.image import imsave

    stem = directory / "figures" / _safe_key(key) / f"step_{step:06d}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    png = stem.with_suffix(".png")
    imsave(png, image)
    written = [png]
    if data is not None:
        written.append(write_json(stem.with_suffix(".json"), dict(data, key=key, step=step)))
    return written


def _safe_key(key: str) -> Path:
    """``"train/gradients/cosine"`` → ``train/gradients/cosine`` as a relative path, other characters replaced."""
    parts = [re.sub(r"[^A-Za-z0-9_.\-]+", "_", part) for part in key.split("/") if part not in ("", ".", "..")]
    return Path(*parts) if parts else Path("figure")


def _jsonable(value: Any) -> Any:
    """Tensors and arrays as lists, non-finite floats as None (JSON has no NaN)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
