"""A multi-layer perceptron, usable as a shared backbone or as a task head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


class MLP(nn.Module):
    """``[Flatten] -> (Linear -> activation -> [Dropout]) * len(hidden) -> [Linear]``.

    Every hidden width is followed by the activation (and dropout when ``dropout > 0``). With
    ``out_features`` a final ``Linear`` without activation is added, so the MLP can also serve
    as a head; without it the output is the activated last hidden layer, as a backbone's
    features should be.

    Args:
        in_features: size of the input (after flattening, when ``flatten=True``).
        hidden: widths of the hidden layers; may be empty when ``out_features`` is given.
        out_features: width of a final linear layer without activation, or ``None``.
        activation: one of ``"relu"``, ``"gelu"``, ``"silu"``, ``"elu"``, ``"leaky_relu"``,
            ``"tanh"``, ``"sigmoid"``.
        dropout: dropout probability after each hidden activation, in ``[0, 1)``.
        flatten: whether inputs ``(batch, ...)`` are flattened to ``(batch, in_features)``
            first (e.g. images); otherwise the layers act on the last dimension.

    Attributes:
        out_features: width of the output, ``out_features`` or else ``hidden[-1]``.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        flatten: bool = True,
    ) -> None:
        super().__init__()
        _check_positive_int("in_features", in_features)
        if isinstance(hidden, str) or not isinstance(hidden, Sequence):
            raise ValueError(f"`hidden` must be a sequence of positive ints, got {hidden!r}.")
        for width in hidden:
            _check_positive_int("hidden", width, f" (all entries of {list(hidden)})")
        if out_features is not None:
            _check_positive_int("out_features", out_features)
        if len(hidden) == 0 and out_features is None:
            raise ValueError(
                "MLP needs at least one layer: give `hidden` widths or `out_features`."
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"`activation` must be one of {sorted(_ACTIVATIONS)}, got {activation!r}."
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise ValueError(f"`dropout` must be a float in [0, 1), got {dropout!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be a float in [0, 1), got {dropout!r}.")

        layers: list[nn.Module] = [nn.Flatten()] if flatten else []
        previous = in_features
        for width in hidden:
            layers += [nn.Linear(previous, width), _ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            previous = width
        if out_features is not None:
            layers.append(nn.Linear(previous, out_features))
            previous = out_features
        self.layers = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_features = previous

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def _check_positive_int(name: str, value: object, detail: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}{detail}.")
