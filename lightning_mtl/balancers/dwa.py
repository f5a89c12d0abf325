"""DWA: dynamic weight average (Liu et al., 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from lightning_mtl.balancers._utils import all_present, check_range
from lightning_mtl.balancers.base import Balancer


class DWA(Balancer):
    """Dynamic weight average, from `End-to-End Multi-Task Learning with Attention
    <https://arxiv.org/abs/1803.10704>`_ (Liu, Johns & Davison, CVPR 2019), Eq. 7.

    With ``L̄_k(t)`` task k's mean training loss over epoch t, the weights during epoch t are
    ``λ(t) = K · softmax(r / T)`` with ``r_k = L̄_k(t−1) / L̄_k(t−2)``: tasks whose loss fell least
    get the most weight. The first two epochs use ``λ = 1``; absent tasks get weight 0 (the others
    are not renormalised, as in :class:`~lightning_mtl.balancers.Static`).

    Implemented here rather than wrapping ``torchjd.scalarization.DWA``, whose history is plain
    attributes (not in ``state_dict``) built from the very losses it weighs: this class keeps the
    epoch sums and the two epoch means in buffers, averages each task over the steps where it is
    present, and accumulates losses reduced over DDP ranks. ``MultiTaskModule`` calls
    :meth:`on_train_epoch_end` to close an epoch.

    Args:
        temperature: ``T > 0``; the paper uses 2.
    """

    forward_changes_state: ClassVar[bool] = True
    supports_one_task_per_step: ClassVar[bool] = True  # from the epochs' loss history, not the step's tasks

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = check_range("temperature", temperature, 0.0, open_low=True)

    def setup(self, task_names: Sequence[str], task_weights: Optional[Sequence[float]] = None) -> None:
        super().setup(task_names, task_weights)
        k = self.num_tasks
        self.register_buffer("loss_sum", torch.zeros(k))
        self.register_buffer("loss_count", torch.zeros(k))
        self.register_buffer("history", torch.full((2, k), float("nan")))  # epoch means: [t-2, t-1]
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))
        self._weights_cache: Optional[tuple[Any, ...]] = None

    def forward(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        self._require_setup(losses)
        weights = self._epoch_weights().to(losses, copy=True)
        mean, seen = self._reduced_losses(losses, present)
        if all_present(seen) and (present is seen or all_present(present)):  # the common step: no masks
            self.loss_sum += mean.to(self.loss_sum.dtype)
            self.loss_count += 1
        else:
            weights = weights * present.to(losses.dtype)
            self.loss_sum += torch.where(seen, mean, 0.0).to(self.loss_sum.dtype)
            self.loss_count += seen.to(self.loss_count.dtype)
        return weights @ losses, weights

    def _epoch_weights(self) -> Tensor:
        """:meth:`current_weights`, recomputed only when the history changes (a new epoch, a reset, a
        loaded state, another device): tracked by the buffers' identity and in-place version counter."""
        history, epochs, cache = self.history, self.epochs, self._weights_cache
        if history.is_inference() or epochs.is_inference():  # no version counter to track
            return self.current_weights()
        if (
            cache is None
            or cache[0] is not history
            or cache[1] != history._version
            or cache[2] is not epochs
            or cache[3] != epochs._version
        ):
            cache = self._weights_cache = (history, history._version, epochs, epochs._version, self.current_weights())
        return cache[4]

    def current_weights(self) -> Tensor:
        """``λ(t)`` for every task, from the last two completed epochs (1 before two epochs)."""
        older, newer = self.history[0], self.history[1]
        valid = torch.isfinite(older) & torch.isfinite(newer) & (older > 0)
        rates = torch.where(valid, newer / torch.where(valid, older, 1.0), 1.0)
        weights = self.num_tasks * torch.softmax(rates / self.temperature, dim=0)
        return torch.where(self.epochs >= 2, weights, torch.ones_like(weights))

    def on_train_epoch_end(self) -> None:
        mean = torch.where(self.loss_count > 0, self.loss_sum / self.loss_count.clamp_min(1), self.history[1])
        self.history.copy_(torch.stack([self.history[1], mean]))
        self.epochs += 1
        self.loss_sum.zero_()
        self.loss_count.zero_()

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.loss_count.zero_()
        self.history.fill_(float("nan"))
        self.epochs.zero_()
