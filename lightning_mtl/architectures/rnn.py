"""A recurrent backbone (LSTM or GRU) over variable-length sequences."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lightning_mtl.architectures.base import check_positive_int

SequenceInput = Union[Tensor, tuple[Tensor, Union[Tensor, Sequence[int]]], list]
_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
_POOLINGS = ("last", "mean", "max")
_LAYOUTS = ("sequence", "image_columns")


class RNNEncoder(nn.Module):
    """An LSTM or GRU encoding a sequence into one feature vector, for hard sharing across task heads.

    Inputs are either a padded batch ``(batch, time, input_size)`` whose sequences all have full
    length, or a pair ``(padded, lengths)`` with ``lengths`` (a tensor or list of ints, one per
    sequence, ``1 <= length <= time``): the padded steps are then skipped by packing
    (``pack_padded_sequence``), so a sequence gives the same features alone or padded in a batch.

    With ``input_layout="image_columns"`` inputs are images ``(batch, channels, height, width)`` read
    as sequences of ``width`` pixel columns of ``channels * height`` features each, left to right;
    e.g. a :class:`~lightning_mtl.datasets.MultiDigits` image is 20 steps of 12 features.

    ``pooling`` turns the per-step outputs into one vector: ``"last"`` the final hidden state of the
    top layer (for a bidirectional RNN, the forward direction's state at each sequence's last valid
    step and the backward direction's at its first, concatenated), ``"mean"``/``"max"`` the mean/max
    of the top layer's outputs over the valid steps.

    Args:
        input_size: features per time step.
        hidden_size: hidden units per direction.
        cell: ``"lstm"`` or ``"gru"``.
        num_layers: stacked recurrent layers.
        bidirectional: whether each layer also runs right-to-left.
        pooling: ``"last"``, ``"mean"`` or ``"max"``.
        dropout: dropout between stacked layers (needs ``num_layers > 1`` to act).
        input_layout: ``"sequence"`` (``(batch, time, features)``) or ``"image_columns"``.

    Attributes:
        out_features: ``hidden_size * (2 if bidirectional else 1)``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        cell: Literal["lstm", "gru"] = "lstm",
        num_layers: int = 1,
        bidirectional: bool = False,
        pooling: Literal["last", "mean", "max"] = "last",
        dropout: float = 0.0,
        input_layout: Literal["sequence", "image_columns"] = "sequence",
    ) -> None:
        super().__init__()
        check_positive_int("input_size", input_size)
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("num_layers", num_layers)
        if cell not in _CELLS:
            raise ValueError(f"`cell` must be one of {tuple(_CELLS)}, got {cell!r}.")
        if pooling not in _POOLINGS:
            raise ValueError(f"`pooling` must be one of {_POOLINGS}, got {pooling!r}.")
        if input_layout not in _LAYOUTS:
            raise ValueError(f"`input_layout` must be one of {_LAYOUTS}, got {input_layout!r}.")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be a float in [0, 1), got {dropout!r}.")
        self.input_size = input_size
        self.cell = cell
        self.pooling = pooling
        self.input_layout = input_layout
        self.bidirectional = bool(bidirectional)
        self.out_features = hidden_size * (2 if bidirectional else 1)
        self.rnn = _CELLS[cell](
            input_size,
            hidden_size,
            num_layers=num_layers,
            bidirectional=self.bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
            batch_first=True,
        )

    def forward(self, x: SequenceInput) -> Tensor:
        """Features ``(batch, out_features)`` of a padded batch or a pair ``(padded, lengths)``."""
        padded, lengths = self._unpack_input(x)
        if lengths is None:
            outputs, state = self.rnn(padded)
            mask = None
        else:
            packed = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False)
            packed_outputs, state = self.rnn(packed)
            outputs, _ = pad_packed_sequence(packed_outputs, batch_first=True, total_length=padded.shape[1])
            steps = torch.arange(padded.shape[1], device=outputs.device)
            mask = (steps.unsqueeze(0) < lengths.to(outputs.device).unsqueeze(1)).unsqueeze(-1)  # (B, T, 1)
        if self.pooling == "last":
            hidden = state[0] if self.cell == "lstm" else state  # (layers * directions, B, H)
            if self.bidirectional:
                return torch.cat([hidden[-2], hidden[-1]], dim=-1)
            return hidden[-1]
        if self.pooling == "mean":
            if mask is None:
                return outputs.mean(dim=1)
            return (outputs * mask).sum(dim=1) / mask.sum(dim=1).to(outputs.dtype)
        if mask is None:
            return outputs.amax(dim=1)
        return outputs.masked_fill(~mask, float("-inf")).amax(dim=1)

    def _unpack_input(self, x: SequenceInput) -> tuple[Tensor, Union[Tensor, None]]:
        lengths = None
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError(
                    f"RNNEncoder: a sequence input is a padded tensor or a pair (padded, lengths); got a "
                    f"{type(x).__name__} of {len(x)} items."
                )
            x, lengths = x
        if not isinstance(x, Tensor):
            raise TypeError(f"RNNEncoder: the padded input must be a tensor, got {type(x).__name__}.")
        if self.input_layout == "image_columns":
            if x.ndim != 4:
                raise ValueError(
                    f"RNNEncoder(input_layout='image_columns') expects images (batch, channels, height, width), "
                    f"got shape {tuple(x.shape)}."
                )
            x = x.flatten(1, 2).transpose(1, 2)  # (B, W, C*H): one step per pixel column
        if x.ndim != 3 or x.shape[-1] != self.input_size:
            raise ValueError(
                f"RNNEncoder: expected a padded batch (batch, time, {self.input_size}), got shape {tuple(x.shape)}."
            )
        if lengths is None:
            return x, None
        lengths = torch.as_tensor(lengths).reshape(-1)
        if lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise TypeError(f"RNNEncoder: `lengths` must be integers, got dtype {lengths.dtype}.")
        if lengths.numel() != x.shape[0]:
            raise ValueError(
                f"RNNEncoder: `lengths` has {lengths.numel()} entries for a batch of {x.shape[0]} sequences."
            )
        lengths = lengths.cpu().long()
        bad = (lengths < 1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"RNNEncoder: `lengths` must be >= 1; sequence(s) {bad} have length "
                f"{lengths[bad].tolist()} (an empty sequence has no features; drop it from the batch)."
            )
        too_long = (lengths > x.shape[1]).nonzero().flatten().tolist()
        if too_long:
            raise ValueError(
                f"RNNEncoder: `lengths` exceed the padded length {x.shape[1]} for sequence(s) {too_long}."
            )
        return x, lengths
