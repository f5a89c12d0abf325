"""Task heads that plain ``torch.nn`` layers do not cover from a YAML config."""

from __future__ import annotations

from torch import Tensor, nn


class RegressionHead(nn.Module):
    """``Linear(in_features, 1)`` (after an optional hidden layer) returning one value per sample, shape ``(B,)``.

    A plain ``nn.Linear(in_features, 1)`` returns ``(B, 1)``, which ``MSELoss`` would broadcast against
    ``(B,)`` targets into a ``(B, B)`` loss; this head squeezes the last dimension.
    """

    def __init__(self, in_features: int, hidden: int | None = None) -> None:
        super().__init__()
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        if hidden is not None and hidden <= 0:
            raise ValueError(f"hidden must be positive or None, got {hidden}")
        layers: list[nn.Module] = []
        if hidden is not None:
            layers += [nn.Linear(in_features, hidden), nn.ReLU()]
            in_features = hidden
        layers.append(nn.Linear(in_features, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).squeeze(-1)
