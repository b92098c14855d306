"""The NTK as a matrix-free operator ``K = J Λ Jᵀ`` (the forward linearised once) and its Hutch++ trace."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import jvp

from lightning_align.measure.autodiff import call_with_fresh_buffers, math_attention, twice_differentiable

if TYPE_CHECKING:
    from lightning_align.measure.ntk.plan import _Plan


class _KernelOperator:
    """``K = J Λ Jᵀ`` on a fixed batch as a matrix-free operator, the forward linearised once.

    The forward runs once with its graph kept: ``Jᵀc`` is one backward on it; ``J u`` is one backward
    through the graph of ``g(c) = Jᵀc`` for a symbolic cotangent ``c`` (built once with ``create_graph``;
    ``g`` is linear in ``c``, so ``∂(g·u)/∂c = J u``). A product is two backward passes and never
    re-runs the forward. An op without a double backward (rare: a custom ``autograd.Function`` whose
    backward is ``once_differentiable`` cuts the symbolic graph, silently) is caught on the first product,
    where ``cotᵀ(J Λ Jᵀ cot)`` must equal ``‖Λ^½ Jᵀ cot‖²``; the operator then falls back to a
    ``torch.func.jvp`` per product, with a warning.
    """

    def __init__(self, plan: _Plan, inputs: Any, traced: bool) -> None:
        self.n, self.c, self.traced = plan.n, plan.c, traced
        self.dtype, self.device = plan.dtype, plan.device
        self.names = list(plan.selected)
        self.scales = [plan.lr[k] for k in self.names]
        self.primals = [plan.selected[k].detach().requires_grad_() for k in self.names]
        frozen = {k: p.detach() for k, p in plan.model.named_parameters() if k not in plan.selected}
        model, n, c, names = plan.model, plan.n, plan.c, self.names

        def f(values: Sequence[Tensor]) -> Tensor:
            return call_with_fresh_buffers(model, {**frozen, **dict(zip(names, values))}, (inputs,)).reshape(n, c)

        self._f = f
        with torch.enable_grad(), twice_differentiable():  # the graph a symbolic JVP differentiates twice
            self.out = f(self.primals)
        self._symbolic: tuple[Tensor, list[Tensor], list[int]] | None = None
        self._functional = False
        self._checked = False

    def __call__(self, v: Tensor) -> Tensor:
        v = v.to(self.dtype)
        if not self.traced:
            return self._product(v.reshape(self.n, self.c)).reshape(-1)
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        for a in range(self.c):  # Σ_a J_a Λ J_aᵀ v
            cot = torch.zeros(self.n, self.c, dtype=self.dtype, device=self.device)
            cot[:, a] = v
            out += self._product(cot)[:, a]
        return out

    def _product(self, cot: Tensor) -> Tensor:
        """``J Λ Jᵀ cot``; the first product also checks the symbolic JVP against the VJP (both give ``cotᵀKcot``)."""
        pulled = self.vjp(cot)
        u = self._scaled(pulled)
        out = self.jvp(u)
        if not self._checked and not self._functional:
            self._checked = True
            direct = float((cot * out).sum())
            adjoint = float(sum(float((a * b).sum()) for a, b in zip(pulled, u) if a is not None))
            if abs(direct - adjoint) > 1e-3 * max(abs(adjoint), 1e-30):
                # a backward that cannot be differentiated (e.g. @once_differentiable) cut the symbolic graph
                self._fall_back(f"the symbolic JVP disagrees with the VJP ({direct:.6g} vs {adjoint:.6g})")
                out = self.jvp(u)
        return out

    def _fall_back(self, why: str) -> None:
        import warnings

        warnings.warn(
            f"lightning_align: the NTK's outputs have no usable double backward ({why[:200]}); using torch.func.jvp, "
            "which re-runs the forward at every product.",
            stacklevel=4,
        )
        self._functional, self._symbolic = True, None

    def quadratic(self, z: Tensor) -> float:
        """``zᵀ K z = Σ_p λ_p ‖J_pᵀ z‖²``: VJPs only."""
        z = z.to(self.dtype)
        cots = [z.reshape(self.n, self.c)] if not self.traced else []
        for a in range(self.c if self.traced else 0):
            cot = torch.zeros(self.n, self.c, dtype=self.dtype, device=self.device)
            cot[:, a] = z
            cots.append(cot)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for cot in cots:
            for u, lr in zip(self.vjp(cot), self.scales):
                if u is not None:
                    total += lr * u.double().pow(2).sum()
        return float(total)

    def vjp(self, cot: Tensor) -> list[Tensor | None]:
        if not self.out.requires_grad:  # outputs independent of the parameters: J = 0
            return [None] * len(self.primals)
        return list(torch.autograd.grad(self.out, self.primals, cot, retain_graph=True, allow_unused=True))

    def _scaled(self, u: list[Tensor | None]) -> list[Tensor | None]:
        return [t if t is None or lr == 1.0 else t * lr for t, lr in zip(u, self.scales)]

    def jvp(self, tangents: list[Tensor | None]) -> Tensor:
        zero = torch.zeros(self.n, self.c, dtype=self.dtype, device=self.device)
        if not self.out.requires_grad:
            return zero
        if not self._functional:
            try:
                return self._jvp_symbolic(tangents, zero)
            except (NotImplementedError, RuntimeError) as err:
                message = str(err).lower()
                if not any(hint in message for hint in ("derivative", "not implemented", "double backward", "twice")):
                    raise
                self._fall_back(str(err))
        primals = [p.detach() for p in self.primals]
        tangents = [torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents)]
        with math_attention():  # the fused CPU/GPU attention kernels have no forward-mode AD
            return jvp(lambda *ps: self._f(ps), tuple(primals), tuple(tangents))[1]

    def _jvp_symbolic(self, tangents: list[Tensor | None], zero: Tensor) -> Tensor:
        if self._symbolic is None:
            c = torch.zeros_like(self.out, requires_grad=True)
            with torch.enable_grad(), twice_differentiable():
                g = torch.autograd.grad(self.out, self.primals, c, create_graph=True, allow_unused=True)
            used = [i for i, t in enumerate(g) if t is not None and t.requires_grad]
            self._symbolic = (c, [g[i] for i in used], used)
        c, g, used = self._symbolic
        pairs = [(gi, tangents[i]) for gi, i in zip(g, used) if tangents[i] is not None]
        if not pairs:
            return zero
        (ju,) = torch.autograd.grad([p[0] for p in pairs], c, [p[1] for p in pairs], retain_graph=True, allow_unused=True)
        return zero if ju is None else ju


def _hutchpp(op: _KernelOperator, basis: Tensor, krylov_trace: float, samples: int, generator: torch.Generator | None) -> tuple[float, float]:
    """``tr K`` = ``tr(QᵀKQ)`` (exact, from Lanczos) + Hutchinson on the complement of ``Q``, with its standard error.

    ``Q`` does not depend on the Rademacher vectors drawn here, so the estimate is unbiased; its variance is that
    of Hutchinson on ``K`` with the top of the spectrum removed. ``z·Kz`` is ``‖Λ^½ Jᵀz‖²``: one VJP per sample.
    """
    size = basis.shape[1]
    if basis.shape[0] >= size:
        return krylov_trace, 0.0
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    values = []
    for _ in range(samples):
        z = torch.randint(0, 2, (size,), generator=gen, device=gen.device).to(device=basis.device, dtype=basis.dtype) * 2 - 1
        z = z - basis.T @ (basis @ z)
        values.append(op.quadratic(z))
    vals = torch.tensor(values, dtype=torch.float64)
    stderr = float(vals.std() / math.sqrt(samples)) if samples > 1 else math.inf
    return krylov_trace + float(vals.mean()), stderr
