"""One linear layer's block of the task-gradient Gramian, from its inputs and its K output cotangents.

A linear layer (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``) called with input rows ``A`` (N × in; for a
convolution the unfolded patches, one row per sample and position) and receiving the task cotangents
``D_k`` (N × out) at its output has the weight gradients ``D_kᵀ A`` (and the bias gradients ``1ᵀ D_k``).
Their Gramian block is formed in one of two ways, the one with fewer operations (:func:`block_cost`):

- the **kernel** form ``G_kl = Σ_{r,r'} (D_k D_lᵀ)_{rr'} (A Aᵀ + 1)_{rr'} = <D_k, (A Aᵀ + 1) D_l>`` (the ``+ 1``
  is the bias): ``N²·in + K·N·out·(N + K)`` operations, holding the N × N kernel (up to
  :data:`KERNEL_MAX_ROWS` rows);
- the **explicit** block ``<D_kᵀ A, D_lᵀ A>``, formed a slice of output features at a time (at most
  :data:`WORKSPACE` entries a slice; a convolution's slice by ``convolution_backward``, task by task):
  ``K·in·out·(N + K)`` operations.

A module called several times contributes the rows of all its calls (its weight's gradient is their sum).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mtl.gradients import row_products

#: Elements one slice of an explicit per-layer block may hold (K × slice): 16 MB in float32.
WORKSPACE = 1 << 22
#: The kernel form is used only up to this many rows (its N × N kernel is held whole).
KERNEL_MAX_ROWS = 4096


def has_kernel_rule(module: nn.Module) -> bool:
    """Whether the module computes ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` of its input with its own weight and
    bias parameters, as torch's classes do (not through a parametrization, e.g. weight normalisation)."""
    if "weight" not in module._parameters or "bias" not in module._parameters:
        return False
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    for base in (nn.Conv1d, nn.Conv2d):
        if isinstance(module, base):
            return (
                type(module).forward is base.forward
                and type(module)._conv_forward is base._conv_forward
                and module.groups == 1
                and hasattr(module, "_reversed_padding_repeated_twice")
            )
    return False


def _trainable(module: nn.Module) -> list[Tensor]:
    return [p for p in (module.weight, module.bias) if p is not None and p.requires_grad]


def trainable_parameters(module: nn.Module) -> list[Tensor]:
    return [p for p in (module.weight, module.bias) if p is not None and p.requires_grad]


def block_cost(n: int, fan_in: int, fan_out: int, k: int) -> int:
    """Operations for one layer's Gramian block: the kernel form's, if it applies and is cheaper, else the explicit one's."""
    explicit = k * fan_in * fan_out * (n + k)
    kernel = n * n * fan_in + k * n * fan_out * (n + k)
    return min(kernel, explicit) if n <= KERNEL_MAX_ROWS else explicit


def _conv_geometry(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...], Any, Any, Any]:
    """The convolution's (batched, padded) input and its kernel size, stride, padding, dilation."""
    spatial = 1 if isinstance(module, nn.Conv1d) else 2
    if x.dim() == spatial + 1:  # an unbatched input
        x = x.unsqueeze(0)
    padding = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":  # padded as the module's forward does
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    return x, module.kernel_size, module.stride, padding, module.dilation


def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The rows ``A`` (N × in) whose products with the output cotangents give the weight gradient."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    x, size, stride, padding, dilation = _conv_geometry(module, x)
    if isinstance(module, nn.Conv1d):  # as a 2-d convolution of height 1
        x, size, stride, dilation = x.unsqueeze(2), (1, *size), (1, *stride), (1, *dilation)
        padding = (0, *padding) if isinstance(padding, tuple) else (0, padding)
    columns = F.unfold(x, size, dilation=dilation, padding=padding, stride=stride)
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


def output_rows(module: nn.Module, d: Tensor) -> Tensor:
    """The K output cotangents as rows, ``(K, N, out)``, in the order of :func:`input_rows`."""
    k = d.shape[0]
    if isinstance(module, nn.Linear):
        return d.reshape(k, -1, d.shape[-1])
    spatial = 1 if isinstance(module, nn.Conv1d) else 2
    if d.dim() == spatial + 2:  # an unbatched call
        d = d.unsqueeze(1)
    return d.movedim(2, -1).reshape(k, -1, d.shape[2])


def input_width(module: nn.Module) -> int:
    """Entries of one output feature's weights (in, or in_channels × kernel size)."""
    return module.weight[0].numel()


def _weight_slice(module: nn.Module, x: Tensor, d: Tensor, start: int, stop: int) -> Tensor:
    """Rows ``(K, (stop - start)·in)`` of the Jacobian of output features ``start:stop`` of the weight, for one call."""
    k = d.shape[0]
    if isinstance(module, nn.Linear):
        rows = output_rows(module, d)[:, :, start:stop]
        return torch.matmul(rows.transpose(1, 2), input_rows(module, x)).reshape(k, -1)
    x, _, stride, padding, dilation = _conv_geometry(module, x)
    d = d if d.dim() == x.dim() + 1 else d.unsqueeze(1)
    size = (stop - start, *module.weight.shape[1:])
    weight_grad = torch.nn.grad.conv1d_weight if isinstance(module, nn.Conv1d) else torch.nn.grad.conv2d_weight
    return torch.stack([weight_grad(x, size, d[j, :, start:stop], stride, padding, dilation) for j in range(k)]).reshape(k, -1)


def _cat(tensors: list[Tensor], dim: int = 0) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def layer_gramian(module: nn.Module, pieces: list[tuple[Tensor, Tensor]], dtype: torch.dtype) -> Tensor:
    """The K × K Gramian of a linear layer's trainable parameters, from its calls' ``(input, cotangents (K, *out))``."""
    pieces = [(x.to(dtype), d.to(dtype)) for x, d in pieces]
    k = pieces[0][1].shape[0]
    weight = module.weight.requires_grad
    bias = module.bias is not None and module.bias.requires_grad
    fan_in, fan_out = input_width(module), module.weight.shape[0]
    n = sum(output_rows(module, d).shape[1] for _, d in pieces)
    if weight and block_cost(n, fan_in, fan_out, k) < k * fan_in * fan_out * (n + k):
        a = _cat([input_rows(module, x) for x, _ in pieces])
        d = _cat([output_rows(module, d) for _, d in pieces], dim=1)
        kernel = a @ a.T
        if bias:
            kernel += 1
        return row_products(d.reshape(k, -1), torch.matmul(kernel, d).reshape(k, -1))
    gramian = pieces[0][1].new_zeros(k, k)
    if bias:
        sums = sum(output_rows(module, d).sum(dim=1) for _, d in pieces)
        gramian += sums @ sums.T
    if weight:
        step = max(1, WORKSPACE // (k * fan_in))
        for start in range(0, fan_out, step):
            block = sum(_weight_slice(module, x, d, start, min(start + step, fan_out)) for x, d in pieces)
            gramian += row_products(block)
    return gramian
