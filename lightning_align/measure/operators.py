"""Hessian-vector and Gauss-Newton-vector products of a scalar loss, on flat parameter vectors.

Three ways to get ``H v`` (see :func:`hessian_operator` for the choice and why double backward is the
default): double backward (one ``backward(create_graph=True)`` kept alive, then one extra backward per
product), forward-over-reverse (``jvp(jacrev(L))`` over ``torch.func.functional_call`` with the parameters
and buffers passed explicitly, no kept graph; the method curvlinops uses), and finite differences of gradients.

BatchNorm in training mode (``bn_mode="train"``, the objective actually optimised) normalises with
batch statistics. Its in-place running-statistic update cannot run under ``torch.func`` transforms
(pytorch#85533), and must not change the model anyway, so while an operator is open such modules
run with ``track_running_stats=False``: same output, no buffer update. Modules in eval mode read
their running statistics from the explicitly passed buffers.

Use the operators inside their context manager, which also restores buffers, ``.grad``, flags and RNG::

    with hessian_operator(model, loss_fn, (x, y)) as op:
        hv = op.matvec(v)          # v: flat (op.dim,) vector
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp, vjp

from lightning_align.measure.autodiff import batch_statistics_without_update, call_with_fresh_buffers
from lightning_align.measure.autodiff import once_differentiable_functions, twice_differentiable
from lightning_align.measure.state import preserved_state

Method = Literal["auto", "forward", "double_backward", "finite_difference"]
LossFn = Callable[[Any, Any], Tensor]
Reduce = Callable[[Tensor], Tensor]


@dataclass
class FlatParams:
    """Names and shapes of the trainable parameters, and conversions between dicts and flat vectors.

    Example:
        >>> fp = FlatParams.of(nn.Linear(2, 3))
        >>> fp.dim, fp.names
        (9, ['weight', 'bias'])
    """

    names: list[str]
    tensors: list[Tensor]
    dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.dim = sum(t.numel() for t in self.tensors)

    @classmethod
    def of(cls, model: nn.Module) -> FlatParams:
        """The parameters of ``model`` with ``requires_grad=True`` (shared ones once)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                f"{type(model).__name__} has no trainable parameters (none with requires_grad=True): "
                "there is no Hessian to measure; unfreeze some parameters."
            )
        return cls([n for n, _ in named], [p for _, p in named])

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def detached(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in zip(self.names, self.tensors)}

    def flatten(self, parts: Sequence[Tensor | None] | dict[str, Tensor]) -> Tensor:
        """One flat vector from per-parameter tensors (``None`` counts as zeros)."""
        if isinstance(parts, dict):
            parts = [parts[n] for n in self.names]
        return torch.cat(
            [(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(parts, self.tensors)]
        )

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Per-parameter views of a flat vector."""
        if vec.shape != (self.dim,):
            raise ValueError(f"expected a flat vector of shape ({self.dim},), got {tuple(vec.shape)}")
        chunks = torch.split(vec, [t.numel() for t in self.tensors])
        return {n: c.view_as(t) for n, c, t in zip(self.names, chunks, self.tensors)}


@dataclass
class FlatOperator:
    """A symmetric linear operator on flat parameter vectors (``matvec``), plus what it was built from.

    Attributes:
        matvec: ``v -> A v`` on ``(dim,)`` vectors of ``dtype`` on ``device``.
        params: the parameters the vector indexes (see :class:`FlatParams`).
        loss: the loss value at the current parameters (detached scalar).
        method: ``"forward"``, ``"double_backward"``, ``"finite_difference"`` (``"ggn"`` for Gauss-Newton); with
            ``"auto"``, the one in use after the first product.
        gradient: the flat loss gradient when it came for free (double backward), else ``None``. The top
            Hessian eigenvectors are close to the gradient's span early in training (Gur-Ari et al. 2018),
            so it is a good cold start for Lanczos.
        missing: the op without a double backward that made ``"auto"`` leave double backward, else ``None``.
        step_check: what :meth:`consistency` calls (finite-difference products only).

    Example::

        op = hessian_operator(model, loss_fn, (x, y))
        hv = op.matvec(torch.randn(op.params.dim, dtype=op.params.dtype))
    """

    matvec: Callable[[Tensor], Tensor]
    params: FlatParams
    loss: Tensor
    method: str
    num_matvecs: int = 0
    gradient: Tensor | None = None
    missing: str | None = None
    step_check: Callable[[Tensor], float] | None = None

    @property
    def dim(self) -> int:
        return self.params.dim

    @property
    def tensors(self) -> list[Tensor]:
        """The parameters, in the order of the flat vector."""
        return self.params.tensors

    @property
    def dtype(self) -> torch.dtype:
        return self.params.dtype

    @property
    def device(self) -> torch.device:
        return self.params.device

    def __call__(self, v: Tensor) -> Tensor:
        self.num_matvecs += 1
        return self.matvec(v)

    def consistency(self, y: Tensor) -> float:
        """Finite-difference products only: ``|ρ(h/2) − ρ(h)| / |ρ(h)|`` for the Rayleigh quotient of ``y`` with
        the step halved (two more products; :meth:`~lightning_align.measure.sharded.FiniteDifferenceHessian.
        consistency`): ~1e-5 where the loss is smooth at the step's scale, 1e-2 and more where it is not."""
        if self.step_check is None:
            raise ValueError(f"consistency: the {self.method!r} products have no finite-difference step to halve")
        self.num_matvecs += 2
        return self.step_check(y)


def check_scalar_loss(loss: Any, where: str = "loss_fn") -> Tensor:
    """The loss as a 0-d tensor, or a clear error if it is not a scalar tensor."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"{where} returned {type(loss).__name__}; a scalar loss tensor is needed")
    if loss.numel() != 1:
        raise ValueError(
            f"{where} returned a loss of shape {tuple(loss.shape)}; the Hessian needs a scalar (mean) loss: "
            "reduce it (e.g. reduction='mean')."
        )
    if not loss.is_floating_point():
        raise TypeError(f"{where} returned a loss of dtype {loss.dtype}; a floating-point loss is needed")
    return loss.reshape(())


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"batch must be a pair (inputs, targets) with loss_fn(model(inputs), targets) the loss, "
            f"got {type(batch).__name__}"
        )
    return batch[0], batch[1]


def _with_reduce(fn: Callable[[Tensor], Tensor], reduce: Reduce | None) -> Callable[[Tensor], Tensor]:
    if reduce is None:
        return fn
    return lambda v: reduce(fn(v))


@contextlib.contextmanager
def hessian_operator(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    method: Method = "auto",
    reduce: Reduce | None = None,
    owner: str = "hessian_operator",
) -> Iterator[FlatOperator]:
    """Open the Hessian of ``loss_fn(model(inputs), targets)`` as a flat operator ``v -> H v``.

    Args:
        model: the model; its trainable parameters (``requires_grad=True``) index the vectors.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar`` (``inputs`` is passed as one argument).
        batch: ``(inputs, targets)``.
        method: ``"double_backward"`` (one ``create_graph`` backward kept, one backward per product),
            ``"forward"`` (forward-over-reverse ``jvp(jacrev(L))``, no kept graph), ``"finite_difference"`` (central
            differences of two gradients; :meth:`FlatOperator.consistency` checks a result), or ``"auto"``: double
            backward, and through an op without one (``embedding_bag``, an ``@once_differentiable`` backward;
            ``hardsigmoid`` and attention run as exact equivalents) what :mod:`~lightning_align.measure.fallback`
            says, with one warning naming the op. Double backward is the default because it is exact for every op with
            a double backward and 1.8-3.6x faster per product on CPU (the forward pass and the first
            backward are paid once). Forward-over-reverse is wrong in one place in torch 2.14: the
            forward-mode derivative of the weight gradient of ``F.layer_norm``, and of ``F.batch_norm``
            with batch statistics (train-mode BatchNorm, InstanceNorm), with respect to the layer's
            *input*. The Hessian block between such a layer's trainable ``weight`` and every parameter
            before the layer is then wrong and non-symmetric (19% of the largest entry on a 4-5-2
            LayerNorm MLP; ``tests/test_operators.py``), so ``"forward"`` refuses those layers. Eval-mode
            BatchNorm (running statistics), GroupNorm, RMSNorm and norms without a trainable weight are
            exact and allowed.
        reduce: applied to every product (e.g. an all-reduce mean over DDP ranks).
        owner: who is asking (named in warnings and errors: a callback passes its name).

    Yields:
        A :class:`FlatOperator`. Buffers, ``.grad``, flags and RNG are restored on exit.

    Raises:
        ValueError: no trainable parameters, a loss that is not a scalar, ``"forward"`` on a model with a LayerNorm,
            or a BatchNorm/InstanceNorm using batch statistics, whose weight is trainable; ``"double_backward"``
            through an op without a double backward (at the first product).

    Example:
        >>> net = nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> with hessian_operator(net, nn.functional.mse_loss, (x, y)) as op:
        ...     hv = op(torch.ones(op.dim))
        >>> hv.shape
        torch.Size([4])
    """
    if method not in get_args(Method):
        raise ValueError(f"{owner}: method must be one of {', '.join(map(repr, get_args(Method)))}, got {method!r}")
    params = FlatParams.of(model)
    inputs, targets = _split_batch(batch)
    if method == "forward":
        _refuse_affine_norms(model)
    with preserved_state(model), torch.enable_grad(), twice_differentiable(), contextlib.ExitStack() as stack:
        problem = (model, loss_fn, inputs, targets, params)
        if method == "forward":
            op = _forward_operator(*problem)
        else:
            from lightning_align.measure.fallback import auto_operator, finite_difference_operator  # it imports this module
            if method == "finite_difference":
                op = finite_difference_operator(*problem, stack, reduce)
            else:
                op = auto_operator(*problem, stack, reduce, owner, fall_back=method == "auto")
        op.matvec = _with_reduce(op.matvec, reduce)
        if op.gradient is not None and reduce is not None:
            op.gradient = reduce(op.gradient)  # the same start vector on every rank
        yield op


def _forward_mode_wrong_norm(module: nn.Module) -> str | None:
    """The op whose forward-over-reverse Hessian is wrong in ``module`` (torch 2.14), or ``None``.

    The forward-mode derivative of the *weight* gradient of ``native_layer_norm_backward`` and of
    ``native_batch_norm_backward`` with batch statistics, with respect to the layer input, is wrong (every
    other block is right; ``tests/test_operators.py`` checks each case against the dense autograd Hessian).
    It only matters when the weight is differentiated, i.e. trainable.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or not weight.requires_grad:
        return None
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    if isinstance(module, nn.modules.batchnorm._NormBase):  # BatchNorm*, SyncBatchNorm, InstanceNorm*
        batch_statistics = module.training or not module.track_running_stats or module.running_mean is None
        if batch_statistics:
            return "batch_norm with batch statistics" if isinstance(module, nn.modules.batchnorm._BatchNorm) else "instance_norm"
    return None


def _refuse_affine_norms(model: nn.Module) -> None:
    for name, m in model.named_modules():
        op = _forward_mode_wrong_norm(m)
        if op is not None:
            raise ValueError(
                f"method='forward' (forward-over-reverse HVP) gives a wrong Hessian through the affine normalisation "
                f"layer {name!r} ({type(m).__name__}) in torch {torch.__version__.split('+')[0]}: the forward-mode "
                f"derivative of {op}'s weight gradient with respect to the layer input is wrong, so the Hessian between "
                f"{name + '.' if name else ''}weight and the parameters before the layer is; use method='double_backward' "
                "or 'auto' (or freeze that weight)"
            )


def _forward_operator(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, params: FlatParams) -> FlatOperator:
    p0 = params.detached()

    def loss_of(p: dict[str, Tensor]) -> Tensor:
        return check_scalar_loss(loss_fn(call_with_fresh_buffers(model, p, (inputs,)), targets))

    with torch.no_grad(), batch_statistics_without_update(model):
        loss = loss_of(p0).detach()
    grad_fn = jacrev(loss_of)  # not grad(): jvp(grad(mse_loss)) hits "ZeroTensors are immutable" (torch 2.14)

    def matvec(v: Tensor) -> Tensor:
        with batch_statistics_without_update(model), twice_differentiable():
            _, hv = jvp(grad_fn, (p0,), (params.unflatten(v.to(params.dtype)),))
        return params.flatten(hv)

    return FlatOperator(matvec=matvec, params=params, loss=loss, method="forward")


def _double_backward_operator(
    model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, params: FlatParams
) -> FlatOperator:
    loss = check_scalar_loss(loss_fn(model(inputs), targets))
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not depend on any trainable parameter (it carries no gradient), so there is no Hessian "
            "to measure: make sure the loss uses parameters with requires_grad=True (e.g. not only frozen ones)."
        )
    grads = torch.autograd.grad(loss, params.tensors, create_graph=True, allow_unused=True)
    # the per-parameter gradients, not their concatenation: a product then has no cat/split in its backward
    used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    used_grads = [grads[i] for i in used]
    sizes = [t.numel() for t in params.tensors]
    cut = once_differentiable_functions([loss])  # a double backward through one would be silently wrong
    if not used and not cut:
        warnings.warn(
            "lightning_align: the gradient does not depend on the parameters (a loss linear in them, or an op whose "
            "backward is not differentiable): double backward gives H = 0; if the loss is not linear in the "
            "parameters, try method='finite_difference'.",
            stacklevel=3,
        )

    def matvec(v: Tensor) -> Tensor:
        v = v.to(params.dtype)
        if not used:
            return torch.zeros_like(v)
        parts = torch.split(v, sizes)
        outputs = [parts[i].view_as(params.tensors[i]) for i in used]
        hv = torch.autograd.grad(used_grads, params.tensors, grad_outputs=outputs, retain_graph=True, allow_unused=True)
        return params.flatten(list(hv)).detach()

    return FlatOperator(
        matvec=matvec, params=params, loss=loss.detach(), method="double_backward",
        gradient=params.flatten([None if g is None else g.detach() for g in grads]),
        missing=", ".join(cut) if cut else None,
    )


def hvp(model: nn.Module, loss_fn: LossFn, batch: Any, vector: Tensor, *, method: Method = "auto") -> Tensor:
    """One Hessian-vector product ``H v`` (flat ``vector`` over the trainable parameters).

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> x, y = torch.eye(2), torch.zeros(2, 1)
        >>> hvp(net, nn.functional.mse_loss, (x, y), torch.tensor([1.0, 0.0]))  # H = I for this problem
        tensor([1., 0.])
    """
    with hessian_operator(model, loss_fn, batch, method=method) as op:
        return op(vector)


@contextlib.contextmanager
def ggn_operator(model: nn.Module, loss_fn: LossFn, batch: Any, *, reduce: Reduce | None = None) -> Iterator[FlatOperator]:
    """Open the generalised Gauss-Newton matrix ``G = Jᵀ H_out J`` as a flat operator ``v -> G v``.

    ``J`` is the Jacobian of the outputs ``model(inputs)`` with respect to the parameters and
    ``H_out`` the Hessian of ``loss_fn(·, targets)`` in the outputs. ``G`` is positive semi-definite
    for convex losses (cross-entropy, MSE) and equals the Hessian for a model linear in its parameters.
    Cost per product: one JVP, one output-space HVP and one VJP.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> x, y = torch.randn(5, 3), torch.randn(5, 2)
        >>> with ggn_operator(net, nn.functional.mse_loss, (x, y)) as op:
        ...     gv = op(torch.ones(op.dim))
        >>> gv.shape
        torch.Size([8])
    """
    params = FlatParams.of(model)
    inputs, targets = _split_batch(batch)
    with preserved_state(model), torch.enable_grad(), batch_statistics_without_update(model):
        p0 = params.detached()

        def outputs_of(p: dict[str, Tensor]) -> Tensor:
            return call_with_fresh_buffers(model, p, (inputs,))

        with torch.no_grad():
            out0 = outputs_of(p0)
            loss = check_scalar_loss(loss_fn(out0, targets)).detach()
        out_grad = jacrev(lambda o: loss_fn(o, targets))

        def matvec(v: Tensor) -> Tensor:
            with batch_statistics_without_update(model):
                out, jv = jvp(outputs_of, (p0,), (params.unflatten(v.to(params.dtype)),))
                _, hjv = jvp(out_grad, (out.detach(),), (jv,))
                _, pullback = vjp(outputs_of, p0)
                (gv,) = pullback(hjv)
            return params.flatten(gv)

        yield FlatOperator(matvec=_with_reduce(matvec, reduce), params=params, loss=loss, method="ggn")
