"""The synthetic two-task regression data of Ma et al. (2018), with controlled task correlation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _check_real(name: str, value: object, minimum: float = 0.0, strict: bool = False) -> float:
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"`{name}` must be {'>' if strict else '>='} {minimum}, got {value!r}.")
    return float(value)


def _check_sinusoids(
    alphas: Sequence[float] | None, betas: Sequence[float] | None, num_sinusoids: int
) -> tuple[np.ndarray, np.ndarray] | None:
    if alphas is None and betas is None:
        return None
    if alphas is None or betas is None:
        raise ValueError("`alphas` and `betas` must be given together (or neither, to draw them).")
    arrays = []
    for name, values in (("alphas", alphas), ("betas", betas)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ValueError(f"`{name}` must be a sequence of finite numbers, got {values!r}.")
        for value in values:
            _check_real(name, value, minimum=-math.inf)
        if len(values) != num_sinusoids:
            raise ValueError(f"`{name}` must have `num_sinusoids` = {num_sinusoids} values, got {len(values)}.")
        arrays.append(np.asarray(values, dtype=np.float64))
    return arrays[0], arrays[1]


class SyntheticMMoE(Dataset):
    """Two regression tasks whose weight vectors have cosine similarity ``correlation``.

    The procedure of Ma et al. (2018), "Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts", KDD, Sec. 3.2:

    1. two orthogonal unit vectors ``u₁, u₂ ∈ R^dim`` (Gram-Schmidt on two Gaussian draws);
    2. ``w₁ = c·u₁`` and ``w₂ = c·(p·u₁ + sqrt(1 - p²)·u₂)``, so ``cos(w₁, w₂) = p = correlation``;
    3. inputs ``x ~ N(0, I_dim)``;
    4. labels ``yᵢ = wᵢᵀx + Σ_{j=1..m} sin(αⱼ wᵢᵀx + βⱼ) + εᵢ``, ``εᵢ ~ N(0, 0.01)``.

    The paper calls ``αⱼ, βⱼ`` "given parameters that control the shape of the sinusoidal functions"
    and gives no values for them (Google Research's public generator of this data notes the same).
    Defaults here: ``c = scale = 1`` and ``m = num_sinusoids = 10`` (that generator's defaults), and
    ``αⱼ, βⱼ ~ N(0, sinusoid_std²)`` with ``sinusoid_std = 1``, drawn once per task pair from ``seed``.
    Pass ``alphas``/``betas`` to fix them for every seed instead, e.g.
    ``*SyntheticMMoE.GOOGLE_RESEARCH_SINUSOIDS`` (that generator's ``αⱼ = j``, ``βⱼ = (j - 1)²``).
    ``N(0, 0.01)`` is read as variance 0.01, i.e. ``noise_std = 0.1`` (that generator uses a standard
    deviation of 0.01; either way the noise is small next to the labels' variance).
    ``docs/architectures.md`` says why these values.

    ``seed`` fixes the task pair (``u₁, u₂`` and the drawn ``αⱼ, βⱼ``); ``sample_seed`` fixes the
    inputs and noise. Build the train and test sets with the same ``seed`` and different
    ``sample_seed`` to get the same tasks on different samples. Items are ``(x, {"t1": y₁, "t2": y₂})``,
    ``float32``, with ``x`` of shape ``(dim,)`` and 0-dim targets.

    Args:
        n: number of samples.
        correlation: ``p``, the cosine similarity of ``w₁`` and ``w₂``, in ``[-1, 1]``.
        dim: input dimension ``d`` (the paper uses 100).
        seed: seed of the task pair.
        sample_seed: seed of inputs and noise; ``None`` derives it from ``seed`` alone.
        scale: ``c``.
        num_sinusoids: ``m``.
        sinusoid_std: standard deviation of the ``αⱼ, βⱼ`` draws.
        noise_std: standard deviation of ``εᵢ``.
        alphas, betas: fixed ``αⱼ`` and ``βⱼ`` (both or neither, ``num_sinusoids`` values each), used
            for every seed instead of drawing them.

    Attributes:
        x: inputs ``(n, dim)``.
        targets: ``{"t1": (n,), "t2": (n,)}``.
        weights: ``(2, dim)``, ``w₁`` and ``w₂``.
        alphas, betas: ``(m,)`` sinusoid parameters.
    """

    TASKS: tuple[str, str] = ("t1", "t2")
    #: ``(alphas, betas)`` of Google Research's public generator of this data (google-research
    #: repository): ``αⱼ = j`` and ``βⱼ = (j - 1)²`` for ``j = 1..10``; it notes the paper gives none.
    GOOGLE_RESEARCH_SINUSOIDS: tuple[tuple[float, ...], tuple[float, ...]] = (
        tuple(float(j) for j in range(1, 11)),
        tuple(float((j - 1) ** 2) for j in range(1, 11)),
    )

    def __init__(
        self,
        n: int,
        correlation: float,
        dim: int = 100,
        seed: int = 0,
        sample_seed: int | None = None,
        scale: float = 1.0,
        num_sinusoids: int = 10,
        sinusoid_std: float = 1.0,
        noise_std: float = 0.1,
        alphas: Sequence[float] | None = None,
        betas: Sequence[float] | None = None,
    ) -> None:
        n = _check_int("n", n, 1)
        dim = _check_int("dim", dim, 2)
        seed = _check_int("seed", seed, 0)
        if sample_seed is not None:
            sample_seed = _check_int("sample_seed", sample_seed, 0)
        correlation = _check_real("correlation", correlation, minimum=-1.0)
        if correlation > 1.0:
            raise ValueError(f"`correlation` must be in [-1, 1], got {correlation!r}.")
        scale = _check_real("scale", scale)
        num_sinusoids = _check_int("num_sinusoids", num_sinusoids, 0)
        sinusoid_std = _check_real("sinusoid_std", sinusoid_std)
        noise_std = _check_real("noise_std", noise_std)
        given = _check_sinusoids(alphas, betas, num_sinusoids)
        self.correlation, self.seed, self.sample_seed = correlation, seed, sample_seed

        tasks = np.random.default_rng([seed, 0])
        draws = tasks.standard_normal((2, dim))
        u1 = draws[0] / np.linalg.norm(draws[0])
        u2 = draws[1] - (draws[1] @ u1) * u1  # Gram-Schmidt
        u2 /= np.linalg.norm(u2)
        w1 = scale * u1
        w2 = scale * (correlation * u1 + math.sqrt(1.0 - correlation**2) * u2)
        if given is None:
            alphas = tasks.normal(0.0, sinusoid_std, num_sinusoids)
            betas = tasks.normal(0.0, sinusoid_std, num_sinusoids)
        else:
            alphas, betas = given

        samples = np.random.default_rng([seed, 1] if sample_seed is None else [seed, 2, sample_seed])
        x = samples.standard_normal((n, dim))
        noise = samples.normal(0.0, noise_std, (2, n))
        labels = []
        for w, eps in zip((w1, w2), noise):
            z = x @ w
            labels.append(z + np.sin(np.outer(z, alphas) + betas).sum(axis=1) + eps)

        self.x = torch.from_numpy(x.astype(np.float32))
        self.targets = {task: torch.from_numpy(y.astype(np.float32)) for task, y in zip(self.TASKS, labels)}
        self.weights = torch.from_numpy(np.stack([w1, w2]).astype(np.float32))
        self.alphas = torch.from_numpy(alphas.astype(np.float32))
        self.betas = torch.from_numpy(betas.astype(np.float32))

    def label_correlation(self) -> float:
        """Pearson correlation of the two tasks' labels (Fig. 2 of the paper plots it against ``p``)."""
        return float(torch.corrcoef(torch.stack(list(self.targets.values())))[0, 1])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.x[index], {task: y[index] for task, y in self.targets.items()}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self)}, correlation={self.correlation}, dim={self.x.shape[1]}, "
            f"seed={self.seed}, sample_seed={self.sample_seed})"
        )
