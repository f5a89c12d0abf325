"""Small helpers shared by the balancers: seeded randomness, private optimizer steps, checks."""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

def at_least_float32(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 if it is half precision (the solvers and ``linalg`` need it), else unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def at_least_float32_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype :func:`at_least_float32` gives a tensor of ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_seed(seed: int) -> int:
    """``seed`` as an ``int``; ``ValueError`` unless it is an integer (not a bool; NumPy's are accepted) in
    ``[0, 2**64)``, the seeds ``torch.Generator.manual_seed`` takes."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return int(seed)


def check_range(
    name: str, value: float, low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False
) -> float:
    """``value`` as a ``float``; ``ValueError`` naming ``name`` unless it is a real number in the interval.

    Any ``numbers.Real`` but a bool is accepted (a NumPy scalar too). With no upper bound (``high`` is
    ``inf``) the value must be finite: an infinite setting (``FAMO(lr=inf)``) only gives NaN later.
    """
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    unbounded = high == math.inf
    above = number > low if open_low else number >= low
    below = number < high if open_high or unbounded else number <= high
    if not (above and below):  # NaN (a non-number too) fails both comparisons
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high or unbounded else ']'}"
        kind = "a finite number" if unbounded else "a number"
        raise ValueError(f"{name} must be {kind} in {interval}, got {value!r}")
    return number


class Seeded:
    """Mixin for random methods: a private CPU ``torch.Generator`` seeded by ``seed``.

    Its state is the ``"generator"`` entry of the module's extra state, so it is saved in
    ``state_dict()`` and restored by ``load_state_dict()``: every DDP rank draws the same numbers and a
    resumed run continues the same stream. :meth:`reset` re-seeds it.
    """

    seed: int
    generator: torch.Generator
    #: Seeds owed to the generator by :meth:`skip_draw`, drawn at once before its next use or save.
    _skipped_draws: int = 0

    def _init_generator(self, seed: int) -> None:
        self.seed = check_seed(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def draw_seed(self) -> int:
        """A fresh 62-bit seed drawn from the generator (CPU only: no device synchronisation)."""
        self._catch_up()
        return int(torch.randint(0, 2**62, (1,), generator=self.generator))

    def skip_draw(self) -> None:
        """Advance the stream by one seed that nobody needs, later: the seeds owed are drawn in one call when the
        generator is next used or saved (the same generator state as one draw each: one torch call fewer per step,
        10–40 µs inside a training step, where the stream must still advance as it always did)."""
        self._skipped_draws += 1

    def _catch_up(self) -> None:
        if self._skipped_draws:
            torch.randint(0, 2**62, (self._skipped_draws,), generator=self.generator)
            self._skipped_draws = 0

    def draw_orders(self, k: int) -> Optional[np.ndarray]:
        """Random visiting orders for PCGrad and GradVac: a K × (K − 1) array whose row ``i`` is a uniformly
        random permutation of the other tasks (``None`` for K ≤ 2, where the order is fixed).

        One seed is drawn from the balancer's generator whatever K (so the stream advances by one draw per call), and
        the orders come from a private generator seeded with it: row ``i`` sorts K uniform keys, task ``i``'s own key
        set above the others. For K ≤ 2 the seed is not needed: its draw is deferred (:meth:`skip_draw`).
        """
        if k <= 2:
            self.skip_draw()
            return None
        seed = self.draw_seed()
        if getattr(self, "_order_generator", None) is None:
            self._order_generator = torch.Generator()
        self._order_generator.manual_seed(seed)
        keys = torch.rand(k, k, generator=self._order_generator, dtype=torch.float64).numpy()
        np.fill_diagonal(keys, 2.0)
        return keys.argsort(axis=1)[:, :-1]

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)
        self._skipped_draws = 0

    def get_extra_state(self) -> dict[str, Any]:
        self._catch_up()
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._skipped_draws = 0


@contextmanager
def global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block that draws from the *global* RNG of ``device`` with ``seed``, then restore it.

    torchjd's random methods (GradDrop here; PCGrad and GradVac are native) draw from the global generator. Wrapping
    their call in this block, with a seed drawn from the balancer's own generator, makes them
    reproducible and identical on every rank, and leaves the user's global RNG untouched.
    """
    if device.type not in ("cpu", "cuda"):
        raise NotImplementedError(
            f"random balancers control the CPU and CUDA generators only, got a tensor on {device}; "
            "compute the task gradients on CPU or CUDA"
        )
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def host_float64(gramian: Tensor) -> np.ndarray:
    """The K × K Gramian as a float64 NumPy array on the host, where the native weightings compute.

    K × K problems are a few dozen tiny operations: NumPy runs each in about a microsecond (a torch
    call costs several), and float64 keeps them exact to rounding for ill-conditioned Gramians.
    """
    return gramian.detach().cpu().numpy().astype(np.float64)


def symmetric_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric float64 matrix, computed by torch's LAPACK.

    Not ``np.linalg.eigh``: NumPy's OpenBLAS keeps its own worker threads, which after a call of K ≳ 20
    stay spinning beside torch's OpenMP threads and slow the rest of the training step (on a 2-core
    machine a W-MLP K = 40 step measured 3.7× a static one with IMTL-G instead of 1.35×; benchmarks/RESULTS.md).
    torch's LAPACK runs on torch's own thread pool, for about 3 µs more per call.
    """
    values, vectors = torch.linalg.eigh(torch.from_numpy(matrix))
    return values.numpy(), vectors.numpy()


def rank_tolerance(dtype: torch.dtype, k: int) -> float:
    """Relative eigenvalue below which a K × K Gramian stored in ``dtype`` is taken as singular.

    The Gramian's entries carry the rounding of its dtype (``eps``), so eigenvalues below about
    ``K eps λ_max`` are noise, however precisely the weighting computes afterwards; a margin of 10
    keeps that noise out of a pseudo-inverse.
    """
    return 10.0 * k * torch.finfo(dtype).eps


def loaded_copy(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """A copy of a state tensor read by ``set_extra_state`` (``None`` stays ``None``).

    Like ``load_state_dict`` for parameters and buffers (which copies into them), a loaded extra state
    must not share memory with the dictionary: that dictionary holds the source balancer's live tensors,
    which it keeps updating in place, and it may be loaded into several balancers.
    """
    return None if tensor is None else tensor.clone()


def all_present(present: Tensor) -> bool:
    """Whether every task is present, when that is known without a device synchronisation.

    Loss-level methods take a shorter path (fewer small ops) in the common step where every task has
    data. A CPU mask is read directly (no device to wait for); for a mask on an accelerator this
    returns ``False`` without reading it, and the caller takes its general, mask-aware path, which
    gives the same result.
    """
    return present.device.type == "cpu" and bool(present.all())


def all_true(cached: Optional[Tensor], size: int, device: torch.device) -> Tensor:
    """An all-True mask of ``size`` on ``device``: ``cached`` when it is one, else a new one (to cache)."""
    if cached is None or cached.shape[0] != size or cached.device != device:
        return torch.ones(size, dtype=torch.bool, device=device)
    return cached


def scalarize(fn: Callable[[Tensor], Tensor], losses: Tensor) -> tuple[Tensor, Tensor]:
    """Apply a scalarization ``fn`` to ``losses``; return the loss and the weights ``∂fn/∂L_k``.

    ``fn`` runs once, as a black box, on the losses themselves: the loss is its value, with its graph,
    so back-propagating it gives the model ``Σ_k w_k ∇L_k`` (the chain rule) and ``fn``'s learned
    parameters (UW's log-variances) their exact gradient. The effective weights come from one small
    ``autograd.grad`` that stops at the losses (it never enters the model's graph); losses without a
    graph are differentiated through a detached leaf. That call costs a few percent of a small
    model's step (the autograd engine runs cold after the forward pass), so the built-in methods give
    their weights in closed form and use this only as the generic fallback.
    """
    with torch.enable_grad():
        inputs = losses if losses.requires_grad else losses.detach().requires_grad_(True)
        value = fn(inputs)
        if value.requires_grad:
            (weights,) = torch.autograd.grad(value, inputs, retain_graph=True, allow_unused=True, materialize_grads=True)
        else:
            weights = torch.zeros_like(inputs)
    return value, weights.detach()


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the entries where ``mask`` is true; zeros elsewhere (and everywhere if none is)."""
    # Masked entries get exp(-inf) = 0; with no entry left the softmax is NaN, which the where replaces.
    probabilities = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=0)
    return torch.where(mask, probabilities, 0.0)


def _adam(params: list[Tensor], options: dict[str, Any]) -> torch.optim.Adam:
    """``torch.optim.Adam`` on CPU/CUDA floating-point tensors fused (one kernel: about a quarter less
    time a step on a K-vector than the single-tensor loop), elsewhere the single-tensor implementation."""
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, **({"fused": True} if fused else {"foreach": False}), **options)


class PrivateAdam:
    """A method's private ``torch.optim.Adam`` on one tensor (FAMO's logits, GradNorm's weights), kept from step to step.

    It lives outside ``configure_optimizers`` (an extra Lightning optimizer would advance
    ``global_step``). The optimizer is built once, and rebuilt, carrying its state over, only when the
    tensor it updates is another object (the balancer was moved to another device or dtype, or its
    state was loaded). :meth:`state_dict` / :meth:`load_state_dict` go in the
    method's extra state; a loaded state is applied when the optimizer is next built.
    """

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.optimizer: Optional[torch.optim.Adam] = None
        self.pending: Optional[dict[str, Any]] = None

    def step(self, tensor: Tensor, grad: Tensor) -> None:
        """One Adam step on ``tensor`` (in place) along ``grad``."""
        optimizer = self.optimizer
        if optimizer is None or optimizer.param_groups[0]["params"][0] is not tensor:
            state = optimizer.state_dict() if optimizer is not None else self.pending
            optimizer = _adam([tensor], self.options)
            if state is not None:
                optimizer.load_state_dict(state)  # casts the moments to the tensor's device and dtype
            self.optimizer, self.pending = optimizer, None
        tensor.grad = grad.to(tensor.dtype)
        optimizer.step()
        tensor.grad = None

    def state_dict(self) -> Optional[dict[str, Any]]:
        """A copy of the optimizer's state (``None`` before the first step)."""
        if self.optimizer is None:
            return self.pending
        return copy.deepcopy(self.optimizer.state_dict())

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """Resume from ``state`` (applied at the next step); a copy is kept, so the optimizer never shares its
        moments with ``state`` (``torch.optim`` keeps a loaded tensor as is when its device and dtype match)."""
        self.optimizer, self.pending = None, copy.deepcopy(state)

    def reset(self) -> None:
        self.optimizer = self.pending = None
