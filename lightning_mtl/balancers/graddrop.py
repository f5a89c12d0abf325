"""GradDrop: gradient sign dropout (Chen et al., 2020)."""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_mtl.balancers._utils import Seeded, check_range, global_rng
from lightning_mtl.balancers.base import GradientBalancer, check_gradient_matrix

#: Bits of each draw: ``U`` lies on the ``2**16`` odd multiples of ``2**-(DRAW_BITS + 1)`` in (0, 1), exact in float32.
DRAW_BITS = 16


#: Words of the stream drawn at once (1 MiB, 524k draws): a narrow matrix (representation mode) reads many calls' draws
#: from one block, and NumPy's call, 0.05–0.07 ms with the cold caches of a training step, is paid once for them all.
BLOCK_WORDS = 1 << 17


class BlockStream:
    """NumPy's ``SFC64`` raw stream read in blocks: :meth:`integers` returns the next draws of the current block, or of
    a new block of ``max(BLOCK_WORDS, needed)`` words when fewer are left (the rest of the old one is skipped).

    Each int16 integer ``q``, uniform on ``[−2**15, 2**15)``, gives ``V = (q + ½) · 2**-15``, a draw of ``1 − 2U`` for
    ``U`` uniform on the ``2**16`` odd multiples of ``2**-17`` in ``(0, 1)``: strictly inside ``(−1, 1)``, never 0,
    exact in float32 and float64. The integers are the 16-bit quarters of the raw words (which NumPy keeps stable
    across versions; the lowest quarter of each 64-bit word first); a call of ``count`` draws takes ``⌈count / 4⌉``
    words. 0.2 ms for 525k draws, where ``torch.rand``'s Mersenne Twister takes 1.2 ms (``benchmarks/RESULTS.md``).

    Its state (:meth:`state`, :meth:`at`) is the generator's where the current block began, the block's size and
    how much of it is read: a loaded stream redraws the block and continues exactly.
    """

    def __init__(self, seed: int) -> None:
        self.generator = np.random.SFC64(seed)
        self.start: list[int] = self.generator.state["state"]["state"].tolist()
        self._use_block(np.empty(0, dtype=np.uint64))

    def _use_block(self, block: np.ndarray) -> None:
        """Read from ``block`` (raw words) on, through one int16 tensor on its memory: a call then slices a tensor (one
        torch call) instead of making one from NumPy slices (four calls, 30 µs inside a step)."""
        self.block, self.read = block, 0
        self.draws = torch.from_numpy(block.view(np.int16))

    def integers(self, count: int) -> Tensor:
        """The next ``count`` int16 draws, as a tensor sharing memory with the block (consume it before the next call)."""
        words = (count + 3) // 4
        if self.read + words > self.block.size:
            self.start = self.generator.state["state"]["state"].tolist()
            self._use_block(self.generator.random_raw(max(BLOCK_WORDS, words)))
        first = 4 * self.read
        self.read += words
        return self.draws[first : first + count]

    def state(self) -> dict[str, Any]:
        """Python ints only: loads with ``torch.load(weights_only=True)``."""
        return {"start": list(self.start), "words": int(self.block.size), "read": self.read}

    @classmethod
    def at(cls, state: dict[str, Any]) -> BlockStream:
        """The stream of a :meth:`state`: the generator at ``start``, the block redrawn from there, ``read`` words read."""
        stream = cls(0)
        stream.generator.state = {
            "bit_generator": "SFC64",
            "state": {"state": np.array(state["start"], dtype=np.uint64)},
            "has_uint32": 0,
            "uinteger": 0,
        }
        stream.start = list(state["start"])
        stream._use_block(stream.generator.random_raw(state["words"]) if state["words"] else np.empty(0, dtype=np.uint64))
        stream.read = state["read"]
        return stream


def device_integers(seed: int, count: int, device: torch.device) -> Tensor:
    """CUDA: ``count`` such integers from ``torch.randint`` on the device's generator seeded with ``seed`` (the
    global one, restored after). Draw ``j`` may depend on ``count`` (how torch splits Philox's stream), which is the
    same on every DDP rank."""
    with global_rng(seed, device):
        return torch.randint(-(2**15), 2**15, (count,), dtype=torch.int16, device=device)


#: From this many columns on, :func:`scaled_row_sum` adds the rows one by one (both threads; a matrix–vector product
#: runs on one): 1.4–2.5× faster for K = 2…16 at 525k columns, 1.8× slower at K = 10 and 65k (measured 2026-12-02).
ROW_BY_ROW_MIN_COLUMNS = 1 << 18


def sum_scale(k: int) -> float:
    """``c``, the factor GradDrop's sums are taken with: ½ up to two rows, else ``2**-m`` for the least ``m`` with
    ``2**m ≥ 2K``, so that ``c Σ_k |g_k|`` and every quantity formed from it (up to ``2 c Σ_k |g_k|``) stay below the
    dtype's maximum (at K ≤ 2 what can overflow is the result itself). A power of two scales exactly."""
    return 0.5 if k <= 2 else 2.0 ** -(2 * k - 1).bit_length()


def scaled_row_sum(rows: Tensor, scale: float) -> Tensor:
    """``scale · Σ_k rows[k]`` of a K × P float32/float64 matrix (``scale`` a power of two, at most ``1/K``: see
    :func:`sum_scale`), with a rounding error of about ``scale · eps · Σ_k |rows[k]|`` and no overflow.

    Two rows (any width) or wide matrices: the first row times ``scale``, then ``add_`` of each further row times
    ``scale``, each pass on both CPU threads; the same operations on ``|rows|`` round a one-signed column exactly like
    its sum, so ``S = ±A`` holds exactly there. Otherwise one product with a vector of ``scale``. (Not
    ``lerp(a, b, ½)``, one pass fewer: it forms ``b − a``, which overflows for opposite entries whose half sum is
    finite; found by review. Not ``½`` for more than two rows: ``½ Σ_k |g_k|`` overflowed for three entries near
    float32's maximum, and the decision became ``inf − inf``: NaN; found by review.)
    """
    if rows.shape[0] > 2 and rows.shape[1] < ROW_BY_ROW_MIN_COLUMNS:
        return rows.new_full((rows.shape[0],), scale) @ rows
    first, *rest = rows.unbind()  # one call for the rows (indexing makes one per row: each costs 10-40 µs in a step)
    total = first * scale
    for row in rest:
        total.add_(row, alpha=scale)
    return total


class GradDrop(Seeded, GradientBalancer):
    """Gradient sign dropout, from `Just Pick a Sign: Optimizing Deep Multitask Models with Gradient
    Sign Dropout <https://arxiv.org/abs/2010.06808>`_ (Chen et al., NeurIPS 2020), Algorithm 1.

    For every coordinate, the positive-sign purity ``P = ½ (1 + Σ_k g_k / Σ_k |g_k|)`` is compared to
    a uniform draw ``U``: if ``P > U`` only the positive task components of that coordinate are kept,
    otherwise only the negative ones; the kept components are summed. The mask acts coordinate by
    coordinate on the gradients' signs, so the result is *not* a combination ``Gᵀ w`` of the task
    gradients and cannot be computed from the Gramian: GradDrop needs the gradients
    (``needs = "gradients"``). The paper applies it to the gradients at a shared activation layer;
    it applies here to whatever gradients the module provides.

    Native, in a few passes over ``G``: with ``S = Σ_k g_k`` and ``A = Σ_k |g_k|`` per coordinate, the sum of the
    positive components is ``(S + A) / 2`` and of the negative ones ``(S − A) / 2`` (rounding error ``eps · A``, the
    order of the rounding of ``S`` itself), and ``P > U`` is ``S + A · V > 0`` with ``V = 1 − 2U``: with ``s = sign(S + A · V)``
    the result is ``(S + A · s) / 2`` where ``s ≠ 0`` (in float32 for float16 ``G``, float64 for bfloat16, whose sums can overflow
    float32). A coordinate where every gradient is 0 gives 0, and so does a tie ``S + A · V = 0`` (``P = U``: the
    paper's and torchjd's masks keep neither sign there). ``V`` is never ±1, so a one-signed coordinate keeps its
    sum whole, as long as ``c A · V`` is a normal number (``c`` = :func:`sum_scale`, ½ up to two tasks): for ``A``
    above ``2⁻¹⁰⁹`` ≈ 1.5e-33 in float32 at K ≤ 2, ``2⁻¹⁰⁷`` at K ≤ 4, ``2⁻¹⁰⁵`` ≈ 2.5e-32 at K ≤ 16 (3e-303 in
    float64); below that the product loses bits and the choice drifts from ``P`` (coordinates whose update is that
    small). ``torchjd.aggregation.GradDrop``, which loops over the K rows with a dozen operations each, is the test
    oracle under the same uniforms.

    The uniforms (16 bits each) come, on the CPU, from the balancer's own ``SFC64`` stream read in blocks
    (:class:`BlockStream`), seeded at the first call with a seed drawn from its ``torch`` generator and read on from
    there by every call (its position is saved in the checkpoint with the generator); on CUDA, from a seed drawn from the generator at
    every call (:func:`device_integers`). Every DDP rank draws the same ones and a resumed run continues the stream.
    ``U`` takes ``2**16`` values, so a coordinate keeps its positive part with probability ``P`` rounded to the
    nearest multiple of ``2**-16``: within ``2**-17`` ≈ 7.6e-6 of ``P``. Until 2026-12-02 the uniforms were
    ``torch.rand``'s (24 bits, the same as torchjd's under that seed), then a new ``SFC64`` per call; a run's masks
    differ from an older release's.

    Args:
        leak: fraction ``ℓ ∈ [0, 1]`` of every task gradient that passes unmasked (0 in the paper's
            default; 1 gives the plain sum).
        seed: seed of the balancer's generator.
    """

    fresh_direction: ClassVar[bool] = True  # forward returns a new tensor in every branch

    def __init__(self, leak: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.leak = check_range("leak", leak, 0.0, 1.0)
        self._init_generator(seed)
        #: The CPU draws' stream, seeded from the generator at its first use (a new one cost 0.15 ms of a W-MLP step).
        self.stream: Optional[BlockStream] = None

    def forward(self, G: Tensor) -> Tensor:  # type: ignore[override]
        check_gradient_matrix(G)
        if G.device.type not in ("cpu", "cuda"):
            raise NotImplementedError(
                f"GradDrop draws its uniforms on the CPU and CUDA only, got a tensor on {G.device}; compute the task gradients "
                "on CPU or CUDA"
            )
        if G.shape[0] == 0 or G.shape[1] == 0:
            return torch.zeros(G.shape[1], dtype=G.dtype, device=G.device)
        scale = sum_scale(G.shape[0])  # c: total, magnitude = c S, c A
        if G.dtype in (torch.float16, torch.bfloat16):  # S ± A can overflow where each sign's sum does not
            wide = torch.float32 if G.dtype == torch.float16 else torch.float64  # bfloat16's range is float32's
            total, magnitude = G.sum(dim=0, dtype=wide).mul_(scale), G.abs().sum(dim=0, dtype=wide).mul_(scale)
        else:
            total, magnitude = scaled_row_sum(G, scale), scaled_row_sum(G.abs(), scale)
        if G.device.type == "cpu":
            if self.stream is None:
                self.stream = BlockStream(self.draw_seed())
            integers = self.stream.integers(G.shape[1])
        else:
            integers = device_integers(self.draw_seed(), G.shape[1], G.device)
        # sign(S + A·V) with V = (q + ½) · 2**-15, as (cS + cA · 2**-16) + cA · q · 2**-15 (the int16 q promoted in the
        # product): +1 keeps the positive part. Rounding aside the same number; a tie S + A·V = 0 stays exact
        side = torch.add(total, magnitude, alpha=2.0**-DRAW_BITS).addcmul_(magnitude, integers, value=2.0 ** (1 - DRAW_BITS))
        side.sign_()
        # 2c × the kept part: side · (cA + side · cS), 2c (S + A)/2 or 2c (S − A)/2, and 0 at a tie (side 0) and where A = 0
        kept = torch.addcmul(magnitude, total, side).mul_(side)
        if self.leak == 1.0:  # the plain sum, 2c S (not 0 · kept: NaN where kept overflowed, at K ≤ 2)
            kept = total * 2.0
        elif self.leak:  # 2c (ℓ S + (1 − ℓ) kept part), in the scaled domain: no inf − inf
            kept = (1.0 - self.leak) * kept + (2.0 * self.leak) * total
        if scale != 0.5:
            kept.mul_(0.5 / scale)  # exact: a power of two; overflows only where the result does
        return kept if kept.dtype == G.dtype else kept.to(G.dtype)

    def reset(self) -> None:
        super().reset()
        self.stream = None

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "stream": None if self.stream is None else self.stream.state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        stream = state.get("stream")  # absent from a checkpoint of a release before 2026-12-02: seeded at the next call
        self.stream = None if stream is None else BlockStream.at(stream)
