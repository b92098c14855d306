"""Parameters sharded over ranks (FSDP2's ``fully_shard``: ``DTensor`` parameters), in pure PyTorch.

Under FSDP2 each rank holds a slice (``Shard(0)``) of every parameter; a forward pass all-gathers one module's
parameters at a time and a backward pass reduce-scatters (averages) the gradients back into the slices. A
measurement here never gathers the whole parameter vector on one rank:

- sums over parameters (norms, inner products) are summed over the local slices, then over the ranks
  (:meth:`ShardLayout.all_reduce`);
- a weight's spectrum needs the whole matrix: :func:`full` gathers one tensor at a time;
- Hessian-vector products cannot use double backward (autograd reports the sharded parameters unused in the
  second pass) nor ``torch.func`` (the parameters live in FSDP's hooks, not in the module's call): they come
  from two gradients through the model's own backward, by central finite differences
  (:class:`FiniteDifferenceHessian`), and Lanczos runs on the local slices with its ``all_reduce`` argument.

Only data-parallel sharding (one mesh dimension, ``Shard(0)``) is handled; tensor parallelism is refused by
:func:`shard_layout` with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - older torch: nothing can be sharded this way
    DTensor = Shard = None  # type: ignore[assignment,misc]

__all__ = [
    "FiniteDifferenceHessian",
    "ShardLayout",
    "finite_difference_hessian",
    "full",
    "has_sharded_parameters",
    "is_sharded",
    "local",
    "reshard",
    "shard_layout",
    "user_class_name",
]


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter or gradient of a sharded module)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's slice of a ``DTensor`` (a view: in-place changes reach the parameter); ``t`` itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor (all-gathered: a collective every rank must call); ``t`` itself when not sharded."""
    return t.full_tensor() if is_sharded(t) else t


def reshard(module: nn.Module) -> None:
    """Free the whole parameters that FSDP2 gathered for a forward pass, so every parameter is its ``DTensor``
    slice again (no collective; nothing to do for a module that is not sharded).

    FSDP2 keeps the root module's parameters gathered after a forward pass, for the backward it expects; after
    a probe's forward without backward they would stay gathered (a full copy on every rank, and a later
    in-place change of the slices would not be seen by the next forward, which reuses them)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older torch: nothing is sharded this way
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def user_class_name(module: nn.Module) -> str:
    """The class name the user wrote (``fully_shard`` swaps in a subclass named ``FSDP<name>``)."""
    cls = type(module)
    wrapped = cls.__name__[4:] if cls.__name__.startswith("FSDP") else None
    return next((base.__name__ for base in cls.__mro__[1:] if base.__name__ == wrapped), cls.__name__)


def has_sharded_parameters(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor``."""
    return any(is_sharded(p) for p in module.parameters())


@dataclass(frozen=True)
class ShardLayout:
    """How a list of parameters is split over ranks: the process group that holds the slices."""

    group: Any

    def all_reduce(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks of the group (a new tensor; every rank must call)."""
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def sum_of_squares(self, tensors: Sequence[Tensor]) -> Tensor:
        """``Σ ‖t‖²`` over whole tensors, from the local slices (float64; one all-reduce for all of them)."""
        parts = torch.stack([local(t).detach().double().square().sum() for t in tensors])
        return self.all_reduce(parts)


def shard_layout(params: Sequence[Tensor], owner: str) -> ShardLayout | None:
    """The layout of ``params`` (``None`` when none is sharded).

    Raises:
        ValueError: naming ``owner``, when only some parameters are sharded, or when the sharding is not
            FSDP2's data-parallel one (one mesh dimension, ``Shard(0)``), e.g. tensor parallelism.
    """
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return None
    if len(sharded) != len(params):
        raise ValueError(
            f"{owner}: {len(params) - len(sharded)} of {len(params)} trainable parameters are not sharded while the "
            "others are: call fully_shard on the root module too (in configure_model), so every parameter is a DTensor."
        )
    mesh = sharded[0].device_mesh
    for p in sharded:
        if p.device_mesh.ndim != 1 or p.device_mesh != mesh or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f"{owner}: only data-parallel FSDP2 sharding (one mesh dimension, Shard(0)) is supported; found a "
                f"parameter with placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh (tensor "
                "parallelism or HSDP). Train with ModelParallelStrategy(tensor_parallel_size=1) and a 1-D mesh, "
                f"or remove {owner} from the callbacks."
            )
    return ShardLayout(mesh.get_group())


class FiniteDifferenceHessian:
    """``v ↦ H v`` of a loss by central differences of two gradients through the model's own backward.

    ``H v ≈ (g(θ + h v) − g(θ − h v)) / (2h)`` with ``h = step · (1 + ‖θ‖/√P) / ‖v‖`` (``‖θ‖/√P`` the RMS of
    the parameters, so the perturbation is ``step`` relative to their scale); the truncation error is
    ``O(h²)`` and the rounding error ``O(ε ‖g‖ / h)``; the default ``step = 0.2 ε^(1/3)`` (ε the dtype's machine
    epsilon: ~1e-3 in float32) sits below the balance point because the top eigendirection can have a far larger
    third derivative than a random one (a tiny GPT-2: λmax 6% off at 1e-2, 6e-4 at 1e-3).
    ``richardson=True`` combines the steps ``h`` and ``h/2`` (``(4 D(h/2) − D(h)) / 3``, error ``O(h⁴)``,
    default ``step = 2 ε^(1/5)``) at twice the cost. The parameters are written in
    place and copied back from a saved copy after every gradient (bit-exact); sharded, ``.grad`` is cleared for the
    evaluations (the caller restores it: :func:`finite_difference_hessian`); not sharded, the gradients come from
    ``torch.autograd.grad`` (``.grad`` untouched; also the products of a one-process Hessian through an op without
    a double backward, :func:`~lightning_align.measure.operators.hessian_operator`).

    Works on plain and on sharded parameters (vectors are then the concatenated local slices, and
    :attr:`layout` sums inner products over ranks). ``dim`` is the local size; ``global_dim`` the whole one.
    """

    def __init__(
        self, loss_of: Callable[[], Tensor], params: Sequence[Tensor], layout: ShardLayout | None, *,
        step: float | None = None, richardson: bool = False,
    ) -> None:
        self.loss_of, self.tensors, self.layout = loss_of, list(params), layout
        self.richardson = bool(richardson)
        self._saved = [local(p).detach().clone() for p in self.tensors]
        eps = torch.finfo(self._saved[0].dtype).eps
        self.step = float(step) if step is not None else (2 * eps ** 0.2 if richardson else 0.2 * eps ** (1 / 3))
        self._sizes = [t.numel() for t in self._saved]
        self.dim = sum(self._sizes)
        sq = self._sum(torch.stack([t.double().square().sum() for t in self._saved]).sum().reshape(1))
        self.global_dim = int(self._sum(torch.tensor([float(self.dim)], dtype=torch.float64, device=self.device)).item())
        self._theta_rms = math.sqrt(float(sq) / max(self.global_dim, 1))
        self.num_matvecs = 0
        self.loss, self.gradient = self._gradient()

    @property
    def dtype(self) -> torch.dtype:
        return self._saved[0].dtype

    @property
    def device(self) -> torch.device:
        return self._saved[0].device

    @property
    def all_reduce(self) -> Callable[[Tensor], Tensor] | None:
        """The sum over ranks for Lanczos on local slices (``None`` when not sharded)."""
        return None if self.layout is None else self.layout.all_reduce

    def __call__(self, v: Tensor) -> Tensor:
        self.num_matvecs += 1
        v_norm = float(self._sum(v.double().square().sum().reshape(1)).sqrt())
        if v_norm == 0.0:
            return torch.zeros_like(v)
        h = self.step * (1.0 + self._theta_rms) / v_norm
        out = self._central(v, h)
        if self.richardson:
            out = (4 * self._central(v, h / 2) - out) / 3
        return out.to(v.dtype)

    def consistency(self, y: Tensor) -> float:
        """``|ρ(h/2) − ρ(h)| / |ρ(h)|`` for the Rayleigh quotients of ``y`` with the step halved (two more
        gradients): ~1e-5 where the loss is smooth at the scale of ``h``, 1e-2 and more where it is not (e.g.
        ReLU units changing pattern between ``θ ± h y``, or float32 rounding swamping the difference), so a
        value computed from these products cannot be trusted there."""
        self.num_matvecs += 4 if self.richardson else 2
        y = y.to(self.dtype)
        y_norm = float(self._sum(y.double().square().sum().reshape(1)).sqrt())
        h = self.step * (1.0 + self._theta_rms) / y_norm
        full_step = self._central(y, h) if not self.richardson else (4 * self._central(y, h / 2) - self._central(y, h)) / 3
        half = self._central(y, h / 2) if not self.richardson else (4 * self._central(y, h / 4) - self._central(y, h / 2)) / 3
        yd = y.double()
        rho, rho_half = self._sum(torch.stack([(yd * full_step).sum(), (yd * half).sum()])).tolist()
        return abs(rho_half - rho) / max(abs(rho), 1e-30)

    def _central(self, v: Tensor, h: float) -> Tensor:
        plus = self._gradient_at(v, h)
        minus = self._gradient_at(v, -h)
        return (plus.double() - minus.double()) / (2 * h)

    def _gradient_at(self, v: Tensor, h: float) -> Tensor:
        parts = v.to(self.dtype).split(self._sizes)
        with torch.no_grad():
            for p, part in zip(self.tensors, parts):
                local(p).add_(part.view_as(local(p)), alpha=h)
        try:
            return self._gradient()[1]
        finally:
            self.restore()

    def restore(self) -> None:
        """Copy the saved parameters back (bit-exact)."""
        with torch.no_grad():
            for p, saved in zip(self.tensors, self._saved):
                local(p).copy_(saved)

    def _gradient(self) -> tuple[Tensor, Tensor]:
        if self.layout is None:  # plain tensors: no .grad written, no gradient-accumulation hook run (DDP's, a user's)
            with torch.enable_grad():
                loss = self.loss_of()
                grads = torch.autograd.grad(loss, self.tensors, allow_unused=True) if loss.requires_grad else None
            parts = [torch.zeros(size, dtype=self.dtype, device=self.device) if g is None else g.detach().reshape(-1)
                     for g, size in zip(grads or [None] * len(self._sizes), self._sizes)]
            return loss.detach(), torch.cat(parts)
        for p in self.tensors:
            p.grad = None
        with torch.enable_grad():
            loss = self.loss_of()
            loss.backward()
        parts = []
        for p, size in zip(self.tensors, self._sizes):
            g = None if p.grad is None else local(p.grad).detach()
            parts.append(torch.zeros(size, dtype=self.dtype, device=self.device) if g is None else g.reshape(-1))
            p.grad = None
        return loss.detach(), torch.cat(parts)

    def _sum(self, t: Tensor) -> Tensor:
        return t if self.layout is None else self.layout.all_reduce(t)


@contextmanager
def finite_difference_hessian(
    loss_of: Callable[[], Tensor], params: Sequence[Tensor], layout: ShardLayout | None, **options: Any
) -> Iterator[FiniteDifferenceHessian]:
    """A :class:`FiniteDifferenceHessian` whose parameters and ``.grad`` are as before on exit (``options``:
    ``step``, ``richardson``)."""
    grads = [p.grad for p in params]
    op = None
    try:
        op = FiniteDifferenceHessian(loss_of, params, layout, **options)
        yield op
    finally:
        if op is not None:
            op.restore()
        for p, g in zip(params, grads):
            p.grad = g
