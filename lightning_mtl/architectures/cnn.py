"""A small convolutional backbone, the shared trunk of MultiMNIST-style experiments."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

_POOLED_GRID = (2, 2)


class SmallCNN(nn.Module):
    """Conv blocks followed by a linear layer: a shared feature extractor for hard sharing.

    Each block is ``Conv2d(kernel_size, padding="same") -> [BatchNorm2d] -> ReLU ->
    MaxPool2d(2)``, so every block halves the spatial size (rounding down). The last feature
    maps are flattened and mapped by ``Linear -> ReLU`` to a vector of ``out_features``, on
    which task heads (e.g. ``nn.Linear(out_features, 10)``) are placed. This is the shape of the
    small LeNet-style trunk used for MultiMNIST by Sener & Koltun (2018), "Multi-Task Learning
    as Multi-Objective Optimization".

    The flatten size is computed, not inferred lazily, so the module has all its parameters as
    soon as it is built (DDP and checkpoint loading need that):

    - with ``input_size=(height, width)`` the feature maps are flattened as they are, keeping
      the full spatial layout; inputs must then have exactly that size.
    - with ``input_size=None`` the feature maps are first adaptively average-pooled to a
      2×2 grid, so any input size large enough for the pooling works and the coarse layout
      (left/right, top/bottom) is kept.

    For :class:`~lightning_mtl.datasets.MultiDigits` use ``in_channels=1, input_size=(12, 20)``.

    Args:
        in_channels: channels of the input images.
        channels: output channels of each conv block, in order.
        out_features: size of the feature vector returned by ``forward``.
        input_size: ``(height, width)`` of the inputs, or ``None`` (see above).
        kernel_size: odd kernel size of the convolutions.
        batch_norm: whether each convolution is followed by ``BatchNorm2d``.

    Attributes:
        out_features: size of the output feature vector.
        feature_channels: channels of the maps returned by ``forward_features``.
        feature_size: ``(height, width)`` of those maps, or ``None`` without ``input_size``.
        blocks: the conv blocks, an ``nn.ModuleList`` (for architectures that tap each stage).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64),
        out_features: int = 128,
        input_size: tuple[int, int] | None = None,
        kernel_size: int = 3,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("out_features", out_features)
        if isinstance(channels, str) or not isinstance(channels, Sequence) or len(channels) == 0:
            raise ValueError(
                f"`channels` must be a non-empty sequence of positive ints, got {channels!r}."
            )
        for width in channels:
            _check_positive_int("channels", width, f" (all entries of {list(channels)})")
        _check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(
                f"`kernel_size` must be odd to keep the spatial size, got {kernel_size}."
            )

        self.in_channels = in_channels
        self.out_features = out_features
        self.feature_channels = channels[-1]
        self.input_size = _check_input_size(input_size, len(channels))
        if self.input_size is None:
            self.feature_size = None
            grid = _POOLED_GRID
        else:
            height, width = self.input_size
            self.feature_size = (height >> len(channels), width >> len(channels))
            grid = self.feature_size

        blocks = []
        previous = in_channels
        for width in channels:
            layers: list[nn.Module] = [
                nn.Conv2d(previous, width, kernel_size, padding=kernel_size // 2)
            ]
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            blocks.append(nn.Sequential(*layers))
            previous = width
        self.blocks = nn.ModuleList(blocks)

        pooling = nn.Identity() if self.input_size is not None else nn.AdaptiveAvgPool2d(grid)
        self.head = nn.Sequential(
            pooling,
            nn.Flatten(),
            nn.Linear(self.feature_channels * grid[0] * grid[1], out_features),
            nn.ReLU(),
        )

    def forward_features(self, x: Tensor) -> Tensor:
        """The last conv feature maps, ``(batch, feature_channels, *feature_size)``."""
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(
                f"SmallCNN was built for inputs of size {self.input_size}, "
                f"got {tuple(x.shape[-2:])}; set `input_size` to the image size, "
                "or to None to pool any size."
            )
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Feature vectors ``(batch, out_features)`` of images ``(batch, in_channels, H, W)``."""
        return self.head(self.forward_features(x))


def _check_positive_int(name: str, value: object, detail: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}{detail}.")


def _check_input_size(
    input_size: tuple[int, int] | None, n_blocks: int
) -> tuple[int, int] | None:
    if input_size is None:
        return None
    if isinstance(input_size, str) or not isinstance(input_size, Sequence) or len(input_size) != 2:
        raise ValueError(f"`input_size` must be (height, width) or None, got {input_size!r}.")
    for side in input_size:
        _check_positive_int("input_size", side, f" in {tuple(input_size)}")
    smallest = 2**n_blocks
    if min(input_size) < smallest:
        raise ValueError(
            f"`input_size` {tuple(input_size)} is too small for {n_blocks} pooling blocks: "
            f"both sides must be at least {smallest}. Use fewer `channels` or larger inputs."
        )
    return (int(input_size[0]), int(input_size[1]))
