"""Hessian-vector products of a loss whose graph has an op without a double backward.

``hessian_operator(method="auto")`` starts with double backward (:func:`auto_operator`); an op that has no
double backward shows at the first product (torch's "derivative for ... is not implemented"), or before it for a
custom ``autograd.Function`` whose backward is ``@once_differentiable`` (which torch differentiates twice silently
wrong, :func:`~lightning_align.measure.autodiff.once_differentiable_functions`). The products then come from
forward-over-reverse where it is exact and runs, else from central finite differences of two gradients
(:func:`finite_difference_operator`, the FSDP2 route's :class:`~lightning_align.measure.sharded.
FiniteDifferenceHessian`), with one warning naming the op; ``method="double_backward"`` refuses such an op instead.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_align.measure.autodiff import batch_statistics_without_update, missing_double_backward
from lightning_align.measure import operators as ops  # its products by module attribute (tests patch them)
from lightning_align.measure.operators import FlatOperator, FlatParams, LossFn, Reduce, check_scalar_loss
from lightning_align.measure.sharded import finite_difference_hessian


def auto_operator(
    model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, params: FlatParams, stack: contextlib.ExitStack,
    reduce: Reduce | None, owner: str, *, fall_back: bool,
) -> FlatOperator:
    """Double backward; if the graph has an op without a double backward, forward-over-reverse or finite differences
    (``fall_back``) or a clear error.

    The switch happens on the first product (where a missing double backward shows; before it for a
    ``@once_differentiable`` backward, which would not show), so no product is wasted.
    """
    exact = ops._double_backward_operator(model, loss_fn, inputs, targets, params)
    op = FlatOperator(matvec=exact.matvec, params=params, loss=exact.loss, method="double_backward", gradient=exact.gradient)
    inner: list[Callable[[Tensor], Tensor] | None] = [None]  # the products in use, once the first one has chosen

    def leave(missing: str, v: Tensor, try_forward: bool) -> Tensor:
        if not fall_back:
            raise ValueError(
                f"{owner}: method='double_backward' cannot differentiate twice through {missing} (torch "
                f"{torch.__version__.split('+')[0]} has no double backward for it); use method='auto' (finite-difference "
                "products where exact ones are not available) or write that op in a twice-differentiable form."
            )
        op.missing, out = missing, None
        if try_forward and not any(ops._forward_mode_wrong_norm(m) for m in model.modules()):
            try:  # exact where it runs; ops without a double backward mostly have no forward-mode AD either
                forward = ops._forward_operator(model, loss_fn, inputs, targets, params)
                out, inner[0], op.method = forward.matvec(v), forward.matvec, "forward"
            except (RuntimeError, NotImplementedError, ValueError, TypeError):
                out = None
        if out is None:
            fd = finite_difference_operator(model, loss_fn, inputs, targets, params, stack, reduce)
            out, inner[0], op.method, op.step_check = fd.matvec(v), fd.matvec, "finite_difference", fd.step_check
        how = "forward-over-reverse products" if op.method == "forward" else (
            "central finite differences of two gradients, checked by halving the step (FlatOperator.consistency; "
            "Sharpness logs NaN, with a warning, where they disagree on the top eigenvector)"
        )
        warnings.warn(
            f"{owner}: the loss has no double backward through {missing} (torch {torch.__version__.split('+')[0]}), so "
            f"the Hessian-vector products are {how}. Write that op in a twice-differentiable form for exact products, "
            "or pass method='finite_difference' to silence this.",
            stacklevel=3,
        )
        return out

    def matvec(v: Tensor) -> Tensor:
        if inner[0] is not None:
            return inner[0](v)
        if exact.missing is not None:  # a @once_differentiable backward: double backward would be silently wrong
            return leave(exact.missing, v, try_forward=False)
        try:
            out = exact.matvec(v)
        except (NotImplementedError, RuntimeError) as err:
            missing = missing_double_backward(err)
            if missing is None:
                raise
            return leave(missing, v, try_forward=True)
        inner[0] = exact.matvec
        return out

    op.matvec = matvec
    return op


def finite_difference_operator(
    model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, params: FlatParams, stack: contextlib.ExitStack,
    reduce: Reduce | None,
) -> FlatOperator:
    """``H v`` by central differences of two gradients (:class:`~lightning_align.measure.sharded.
    FiniteDifferenceHessian`); the parameters are copied back on ``stack``'s exit."""

    def loss_of() -> Tensor:
        with batch_statistics_without_update(model):
            return check_scalar_loss(loss_fn(model(inputs), targets))

    fd = stack.enter_context(finite_difference_hessian(loss_of, params.tensors, None))

    def step_check(y: Tensor) -> float:
        value = torch.tensor([fd.consistency(y)], dtype=torch.float64, device=params.device)
        return float(value if reduce is None else reduce(value))  # the same decision on every rank

    return FlatOperator(
        matvec=fd, params=params, loss=fd.loss, method="finite_difference", gradient=fd.gradient, step_check=step_check,
    )
