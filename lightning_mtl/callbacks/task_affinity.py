"""`TaskAffinity`: lookahead inter-task affinity (Fifty et al. 2021, TAG) and the task grouping it suggests.

Fifty, Amid, Zhao, Yu, Anil, Finn, "Efficiently Identifying Task Groupings via Inter-Task Affinity for
Multi-Task Learning", NeurIPS 2021. The affinity of task i onto task j at a step is how much one SGD step of
the shared parameters along task i's gradient lowers task j's loss on the same batch:

    Z_{i→j} = 1 − L_j(θ_s − η ∇_{θ_s} L_i, θ_j) / L_j(θ_s, θ_j)

positive when i's update helps j, negative when it hurts. Averaged over training it suggests which tasks to
train together (:func:`~lightning_mtl.callbacks.task_grouping.task_groups`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_mtl.callbacks.figures import heatmap, log_figure, require_matplotlib, run_dir, write_json
from lightning_mtl.callbacks.task_grouping import MAX_SEARCH_NODES, TaskGrouping, grouping_score, task_groups  # noqa: F401 - their old home
from lightning_mtl.checks import _one_task_per_step
from lightning_mtl.gradients import parameter_jacobian

# ---------------------------------------------------------------------------------------- the lookahead


class _TaskLosses(nn.Module):
    """The module's task losses on a batch, as a module that holds the model (for ``torch.func.functional_call``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, groups: list) -> tuple[Tensor, Tensor]:
        forward = self.model.task_forward
        _, predictions = forward.run(groups)
        by_name = {}
        for name, prediction, target, maybe_missing in predictions:
            loss = forward.loss(name, prediction, target, maybe_missing)[0]
            if loss is not None:
                by_name[name] = loss
        k = len(forward.task_names)
        if not by_name:
            device = self.model.device
            return torch.zeros(k, device=device), torch.zeros(k, dtype=torch.bool, device=device)
        losses, present = forward.stack_losses(by_name)
        return losses.float(), present


class _SameRandomness:
    """Replays the random state of the moment it was made before each forward, and puts it back at the end.

    Every forward of the lookahead then draws the same dropout masks (the ones the training step itself will
    draw), and the training's random stream is left as it was.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None

    def rewind(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)


def lookahead_affinity(
    module: Any,
    batch: Any,
    lr: Union[float, dict[int, float]],
    all_reduce: Optional[Any] = None,
    loss_scale: float = 1.0,
) -> Tensor:
    """One step's lookahead affinity ``Z`` (K × K, float64; ``Z[i, j] = Z_{i→j}``) of a ``MultiTaskModule`` on ``batch``.

    The shared parameters are the backbone's trainable ones. Task i's gradient of them is one row of the
    Jacobian of the K task losses (one batched backward, :func:`~lightning_mtl.gradients.parameter_jacobian`);
    the backbone then runs K more times without gradients, through ``torch.func.functional_call`` with its
    parameters moved by ``-lr * grad_i`` (heads unchanged), giving every task's loss after each task's step.
    ``lr`` is one learning rate, or ``{id(parameter): lr}``. The module is left exactly as it was: parameters
    are never written, buffers (BatchNorm statistics) are put back, and every forward replays the same random
    state (same dropout masks), which is then restored.

    ``all_reduce(tensor, op)`` (DDP): the Jacobian, the losses before and after the lookahead and the tasks
    present are reduced over processes, so that ``Z`` is that of the global batch (the global loss of a task
    being the mean of the processes' losses, as in the module's own reduction), identical on every process.
    NaN where undefined: a task absent from the (global) batch, or with a zero loss.
    """
    named = [(name, p) for name, p in module.backbone.named_parameters() if p.requires_grad]
    k = len(module.task_names)
    groups = module.task_forward.groups(batch)
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    randomness = _SameRandomness(module.device)
    try:
        losses_of = _TaskLosses(module)
        randomness.rewind()
        losses, present = losses_of(groups)
        params = [p for _, p in named]
        if losses.requires_grad and params:
            eye = torch.eye(k, dtype=losses.dtype, device=losses.device) * loss_scale
            rows = parameter_jacobian([losses], [eye], params)
            if loss_scale != 1.0:
                rows = [row / loss_scale for row in rows]
        else:  # nothing labelled on this process (or a frozen backbone): zero rows, still part of the reduction
            rows = [p.new_zeros((k, *p.shape)) for p in params]
        base, present = losses.detach().double(), present.double()
        if all_reduce is not None:
            flat = all_reduce(torch.cat([row.reshape(k, -1) for row in rows], dim=1), "mean") if rows else None
            if flat is not None:
                rows = [part.reshape(row.shape) for part, row in zip(flat.split([p.numel() for p in params], dim=1), rows)]
            base, present = all_reduce(base, "mean"), all_reduce(present, "sum")
        after = torch.empty(k, k, dtype=torch.float64, device=base.device)
        with torch.no_grad():
            for i in range(k):
                moved = {
                    f"model.backbone.{name}": p - (lr[id(p)] if isinstance(lr, dict) else lr) * row[i]
                    for (name, p), row in zip(named, rows)
                }
                randomness.rewind()
                after[i] = torch.func.functional_call(losses_of, moved, (groups,), strict=False)[0].double()
        if all_reduce is not None:
            after = all_reduce(after, "mean")
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        randomness.rewind()
    affinity = 1.0 - after / base.unsqueeze(0)
    defined = (present > 0) & (base != 0) & torch.isfinite(base)
    affinity[~(defined.unsqueeze(0) & defined.unsqueeze(1))] = float("nan")
    return affinity


# ---------------------------------------------------------------------------------------- the callback


class TaskAffinity(pl.Callback):
    """Lookahead inter-task affinity (Fifty et al., NeurIPS 2021), averaged over training, and the grouping it suggests.

    Every ``every_n_steps`` training steps, before the step's own forward, it measures on the step's batch
    ``Z_{i→j} = 1 − L_j(θ_s − η ∇_{θ_s} L_i) / L_j(θ_s)`` for every ordered pair of tasks
    (:func:`lookahead_affinity`: one forward and one batched backward of the K task losses, then K forwards
    with the shared parameters moved; the training step is not changed in any way). ``θ_s`` are the backbone's
    trainable parameters; the heads stay put. ``Z`` is averaged over the sampled steps (entry by entry; pairs
    undefined in a step, e.g. a task without labels, are left out of that step).

    ``η`` (``lr``): by default the optimizer's current learning rate of each shared parameter's group (read at
    each sample, so schedulers are followed), which is the paper's lookahead when the optimizer is SGD. With
    Adam and a small learning rate (1e-3) the SGD lookahead is a small step and the affinities are small (of
    the order of ``lr · |∇L|²/L``); their signs and order, which decide the grouping, are what to read. Give
    ``lr`` to fix η.

    At the end of every ``every_n_epochs``-th training epoch with new samples it logs the average so far as a heatmap
    (``train/task_affinity``; rows: the task stepped on, "from"; columns: the task measured, "onto"; the colour
    scale is set by the off-diagonal entries, as the self-affinities can be much larger) through
    :func:`~lightning_mtl.callbacks.figures.log_figure`, and writes ``task_affinity.json`` in the run's log
    directory (:func:`~lightning_mtl.callbacks.figures.run_dir`; for a ``WandbLogger`` the run's files, which
    W&B keeps with the run): the matrix and the number of samples. At the end of fit the file also holds, for
    each ``num_groups``, the grouping of :func:`task_groups` (the partition with the largest total affinity,
    with its score), which is printed too; :meth:`groupings` gives them at any time.

    DDP: exact. Each process computes its batch's Jacobian and losses; the Jacobian (K × P), the losses before
    (K) and after (K × K) the lookahead are all-reduced (mean) on the sampled steps, so ``Z`` is that of the
    global batch and the same on every process. Every process samples the same steps (by
    ``trainer.global_step``). Sharded strategies (FSDP, DeepSpeed) are refused: the backbone's parameters are
    not whole on a process. Data that holds one task per step (round-robin, proportional, temperature,
    sequential sampling) is refused too: ``L_j`` must be measured on a batch that holds task j after task i's step.

    Cost per sample: K + 1 forwards and a K-row batched backward of the backbone, about 2 (K = 2) to 6 (K = 10)
    training steps of a W-MLP; the default interval keeps that near 3 % of the run (``benchmarks/RESULTS.md``).

    Args:
        every_n_steps: sample every this many optimizer steps (steps 0, N, 2N, ...).
        lr: the lookahead step size η; default: the optimizer's learning rate.
        num_groups: the group count(s) for which a grouping is suggested (default: 1 to 4, below K; comparing
            their scores shows whether splitting the tasks gains anything: all tasks apart score 0).
        heatmap: log the heatmap (needs matplotlib: ``pip install lightning-mtl[plots]``).
        every_n_epochs: write the JSON file and draw the heatmap at the end of every this many training epochs
            (0: only at the end of fit, which always reports).
        filename: the JSON file's name in the run's log directory.
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        lr: Optional[float] = None,
        num_groups: Union[int, Sequence[int], None] = None,
        heatmap: bool = True,
        every_n_epochs: int = 1,
        filename: str = "task_affinity.json",
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be a non-negative integer, got {every_n_epochs!r}")
        if lr is not None and not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive number or None (the optimizer's), got {lr!r}")
        counts = [num_groups] if isinstance(num_groups, int) else list(num_groups or [])
        if any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in counts):
            raise ValueError(f"num_groups must be a positive integer or a sequence of them, got {num_groups!r}")
        if heatmap:
            require_matplotlib("TaskAffinity(heatmap=True)")
        self.every_n_steps = every_n_steps
        self.lr = lr
        self.num_groups = None if num_groups is None else counts
        self.heatmap = heatmap
        self.every_n_epochs = every_n_epochs
        self.filename = filename
        self.task_names: tuple[str, ...] = ()
        self._sum: Optional[Tensor] = None
        self._count: Optional[Tensor] = None
        self._samples = 0
        self._reported = 0  # samples in the last report
        self._done: Optional[int] = None

    # ---------------------------------------------------------------- set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not all(hasattr(pl_module, name) for name in ("task_forward", "backbone", "task_names")):
            raise ValueError(
                f"TaskAffinity measures the tasks of a MultiTaskModule (backbone, heads, task losses); "
                f"{type(pl_module).__name__} is not one."
            )
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise ValueError(
                f"TaskAffinity moves the backbone's parameters along each task's gradient, which needs the whole "
                f"parameters on every process; {strategy} shards them. Use DDP (exact) or one device."
            )
        sampling = _one_task_per_step(getattr(trainer, "datamodule", None))
        if stage == "fit" and sampling is not None:
            raise ValueError(
                f"TaskAffinity needs every task labelled in the same steps (task j's loss after task i's step, on "
                f"one batch); sampling={sampling!r} holds one task per step. Use sampling='zip' or 'zip_shortest'."
            )
        if self.num_groups is not None and any(g > len(pl_module.task_names) for g in self.num_groups):
            raise ValueError(
                f"num_groups {self.num_groups}: the model has {len(pl_module.task_names)} tasks, so at most that many groups"
            )
        self.task_names = tuple(pl_module.task_names)

    # ---------------------------------------------------------------- sampling
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._done:
            return
        self._done = step
        all_reduce = None
        if trainer.world_size > 1:
            strategy = trainer.strategy

            def all_reduce(tensor: Tensor, op: str) -> Tensor:
                return strategy.reduce(tensor, reduce_op=op)

        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        with trainer.precision_plugin.forward_context():
            z = lookahead_affinity(pl_module, batch, self._learning_rates(trainer), all_reduce, scale)
        defined = torch.isfinite(z)
        if self._sum is None:
            self._sum, self._count = torch.zeros_like(z), torch.zeros_like(z)
        self._sum = self._sum.to(z.device) + torch.where(defined, z, 0.0)
        self._count = self._count.to(z.device) + defined.double()
        self._samples += 1

    def _learning_rates(self, trainer: pl.Trainer) -> Union[float, dict[int, float]]:
        if self.lr is not None:
            return float(self.lr)
        rates = {id(p): float(group["lr"]) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        if not rates:
            raise ValueError("TaskAffinity(lr=None) reads the optimizer's learning rate, but the trainer has no optimizer")
        return _DefaultZero(rates)

    # ---------------------------------------------------------------- results
    @property
    def affinity(self) -> Optional[Tensor]:
        """The mean affinity so far (K × K, float64, on the CPU; ``[i, j] = Z_{i→j}``; NaN for a pair never measured)."""
        if self._sum is None:
            return None
        return (self._sum / self._count).cpu()

    def groupings(self) -> dict[int, TaskGrouping]:
        """The suggested grouping for each group count (:func:`task_groups` on :attr:`affinity`)."""
        affinity, k = self.affinity, len(self.task_names)
        if affinity is None:
            return {}
        counts = self.num_groups if self.num_groups is not None else list(range(1, min(k, 5)))
        return {g: task_groups(affinity, g, self.task_names) for g in counts}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._samples != self._reported and self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._report(trainer, final=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, final=True)

    def _report(self, trainer: pl.Trainer, final: bool) -> None:
        """The JSON file and the heatmap (when there are new samples); at the end of fit also the groupings."""
        affinity, new_samples = self.affinity, self._samples != self._reported
        self._reported = self._samples
        if not trainer.is_global_zero:
            return
        if affinity is None:
            if final:
                rank_zero_warn(f"TaskAffinity: no step was sampled (every_n_steps={self.every_n_steps}); nothing to report.")
            return
        names = list(self.task_names)
        groupings: dict[int, TaskGrouping] = {}
        if final:
            try:
                groupings = self.groupings()
            except ValueError as error:  # a pair never measured together
                rank_zero_warn(f"TaskAffinity: no grouping: {error}")
        data = {
            "task_names": names,
            "affinity": affinity.tolist(),
            "samples": self._samples,
            "every_n_steps": self.every_n_steps,
            "lr": self.lr if self.lr is not None else "optimizer",
            "definition": "affinity[i][j] = Z_{i->j} = 1 - L_j(shared - lr * grad L_i) / L_j(shared), mean over samples",
            "groupings": {
                str(g): {"groups": [list(group) for group in grouping.groups], "score": grouping.score,
                         "task_scores": grouping.task_scores, "exact": grouping.exact}
                for g, grouping in groupings.items()
            },
        }  # fmt: skip
        write_json(run_dir(trainer) / self.filename, data)
        if self.heatmap and new_samples:
            off_diagonal = affinity[~torch.eye(len(names), dtype=torch.bool)]
            finite = off_diagonal[torch.isfinite(off_diagonal)].abs()
            bound = float(finite.max()) if finite.numel() and finite.max() > 0 else None  # the diagonal may be far larger
            figure = heatmap(
                affinity.tolist(),
                names,
                f"Lookahead task affinity, mean of {self._samples} sample{'s' if self._samples > 1 else ''}",
                vmin=None if bound is None else -bound,
                vmax=bound,
                xlabel="onto task j",
                ylabel="from task i (stepped on)",
                colorbar="Z(i→j) (scale: off-diagonal)",
            )
            rows = [[name, *row] for name, row in zip(names, affinity.tolist())]
            log_figure(trainer, "train/task_affinity", figure, data=data, table=(["from \\ onto", *names], rows))
        if groupings:
            lines = [
                f"  {g} group{'s' if g > 1 else ''} (score {grouping.score:.3g}): " + " | ".join(", ".join(group) for group in grouping.groups)
                for g, grouping in groupings.items()
            ]
            rank_zero_info("TaskAffinity: task groupings with the largest total lookahead affinity\n" + "\n".join(lines))

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"sum": self._sum, "count": self._count, "samples": self._samples, "task_names": list(self.task_names)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._sum, self._count, self._samples = state_dict["sum"], state_dict["count"], state_dict["samples"]
        self._reported = self._samples
        self.task_names = tuple(state_dict["task_names"])


class _DefaultZero(dict):
    """``{id(parameter): lr}`` where a parameter no optimizer holds is not moved (lr 0)."""

    def __missing__(self, key: int) -> float:
        return 0.0
