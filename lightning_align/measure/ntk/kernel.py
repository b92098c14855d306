"""The empirical NTK itself: the kernel, its flattening, its matrix-free product and its exact trace."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_align.measure.ntk.inspection import _slice
from lightning_align.measure.ntk.plan import _Plan
from lightning_align.measure.state import preserved_state


def empirical_ntk(
    model: nn.Module,
    inputs: Any,
    trace_outputs: bool = False,
    *,
    params: Sequence[str] | None = None,
    learning_rates: Mapping[str, float] | None = None,
    chunk_size: int | None = None,
    structured: bool = True,
) -> Tensor:
    """The empirical NTK of ``model`` on ``inputs``.

    Args:
        model: maps a batch of inputs to outputs ``(n, ...)`` sample by sample (the ``c = prod(...)``
            outputs per sample are flattened). BatchNorm must be in eval mode and dropout inactive.
        inputs: a tensor ``(n, ...)`` or a tuple/dict of tensors that all have ``n`` rows (passed to
            ``model`` as one argument).
        trace_outputs: return the ``(n, n)`` kernel summed over outputs ``a = b``.
        params: names or regular expressions (full match) of the parameters to differentiate; default:
            every parameter with ``requires_grad``.
        learning_rates: optional per-parameter factors ``λ_p`` (by name): the kernel becomes
            ``Σ_p λ_p J_p J_pᵀ``, the NTK of gradient descent with those per-parameter learning rates.
        chunk_size: samples per ``vmap`` chunk (bounds the memory of the Jacobian pass).
        structured: use the layer structure (``False``: plain per-sample Jacobian contraction everywhere).

    Returns:
        ``(n, n, c, c)`` tensor ``K[i, j, a, b]``, or ``(n, n)`` with ``trace_outputs=True``; in the
        parameters' dtype, on their device.

    Raises:
        ValueError: inputs the model cannot run on, BatchNorm in train mode, active dropout, an unknown
            parameter name, no trainable parameter.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> empirical_ntk(net, torch.randn(5, 3)).shape
        torch.Size([5, 5, 2, 2])
        >>> empirical_ntk(net, torch.randn(5, 3), trace_outputs=True).shape
        torch.Size([5, 5])
    """
    plan = _Plan.build(model, inputs, params, learning_rates, structured, owner="empirical_ntk")
    with preserved_state(model), torch.no_grad():
        factors = plan.factors(inputs, chunk_size)
        flat = plan.contract(factors, factors, trace_outputs)
    n, c = plan.n, plan.c
    if trace_outputs:
        return flat
    return flat.view(n, c, n, c).permute(0, 2, 1, 3).contiguous()


def flatten_kernel(kernel: Tensor) -> Tensor:
    """A kernel ``(n, n, c, c)`` as the ``(n·c, n·c)`` matrix with row index ``i·c + a`` (2-D kernels as is).

    Example:
        >>> flatten_kernel(torch.zeros(2, 2, 3, 3)).shape
        torch.Size([6, 6])
    """
    if kernel.ndim == 2:
        return kernel
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != kernel.shape[3]:
        raise ValueError(f"a kernel must have shape (n, n) or (n, n, c, c), got {tuple(kernel.shape)}")
    n, _, c, _ = kernel.shape
    return kernel.permute(0, 2, 1, 3).reshape(n * c, n * c)


def ntk_matvec(
    model: nn.Module,
    inputs: Any,
    trace_outputs: bool = False,
    *,
    params: Sequence[str] | None = None,
    learning_rates: Mapping[str, float] | None = None,
) -> tuple[Callable[[Tensor], Tensor], int]:
    """``(v -> K v, size)``: the flattened NTK as a matrix-free operator (two backward passes per product).

    The operator keeps the forward graph of the batch and the graph of a symbolic VJP (the forward is
    linearised once, not re-run per product); call it inside :func:`preserved_state` if the model has
    buffers a forward could touch. With ``trace_outputs`` one product costs ``c`` VJP/JVP pairs.

    Example::

        matvec, size = ntk_matvec(model.eval(), x)
        kv = matvec(torch.ones(size))  # K @ 1 without forming K
    """
    plan = _Plan.build(model, inputs, params, learning_rates, True, owner="ntk_matvec")
    return plan.operator(inputs, trace_outputs), plan.n if trace_outputs else plan.n * plan.c


def ntk_trace(
    model: nn.Module,
    inputs: Any,
    *,
    params: Sequence[str] | None = None,
    learning_rates: Mapping[str, float] | None = None,
    chunk_size: int | None = None,
    max_memory_gb: float = 1.0,
) -> float:
    """``tr K = Σ_{i,a} ‖∂f_a(x_i)/∂θ‖²`` exactly, without building the kernel (diagonal blocks only).

    The same for the full and the output-traced kernel. It costs ``n·c`` per-sample VJPs (batched), so
    for many outputs per sample (a language model's vocabulary) prefer the Hutch++ estimate of
    :func:`ntk_spectrum` (``trace_samples``). ``chunk_size=None`` picks the samples per block so that a
    block's factors and ``vmap(jacrev)`` temporaries stay within ``max_memory_gb`` (one sample at least).

    Example:
        >>> net = nn.Linear(3, 2)
        >>> x = torch.randn(5, 3)
        >>> k = empirical_ntk(net, x)
        >>> abs(ntk_trace(net, x) - flatten_kernel(k).trace().item()) < 1e-4
        True
    """
    plan = _Plan.build(model, inputs, params, learning_rates, True, owner="ntk_trace")
    if chunk_size is None:
        chunk_size = plan.auto_chunk(max_memory_gb * 2**30, with_factors=True)
    total = 0.0
    with preserved_state(model), torch.no_grad():
        for lo in range(0, plan.n, chunk_size):
            part = _slice(inputs, lo, min(lo + chunk_size, plan.n))
            f = plan.factors(part, None)
            total += float(plan.contract(f, f, True).diagonal().double().sum())
    return total

