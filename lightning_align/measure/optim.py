"""Optimizer plumbing (pure PyTorch): one place for what every control and measurement needs of an optimizer.

- **What it holds per parameter**: :func:`learning_rates_by_parameter`.
- **What kind it is**: :data:`ADAM_LIKE` (Adam's second moment and β's in its state: the preconditioned
  sharpness and its threshold), :data:`ENTRYWISE_ADAPTIVE` and :data:`SGD_LIKE` (μP's two learning-rate
  families), :func:`update_family`.
- **Preconditioners and thresholds** of the edge of stability: :func:`adam_preconditioner`,
  :func:`lr_preconditioner`, :func:`stability_threshold`.
- **Splitting param groups** in place, every other hyper-parameter kept (:func:`split_param_groups`), and LR
  schedulers built before the split following it (:func:`follow_split`).

Example:
    >>> w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    >>> opt = torch.optim.SGD([w, b], lr=0.1, momentum=0.9)
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    >>> origin = split_param_groups(opt, lambda p: p.ndim)  # matrices and vectors apart
    >>> follow_split(sched, [i for i, _ in origin])
    >>> [(len(g["params"]), g["momentum"]) for g in opt.param_groups], len(sched.lr_lambdas)
    ([(1, 0.9), (1, 0.9)], 2)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_align.measure.sharded import local

#: Optimizer classes whose state holds Adam's second moment ``exp_avg_sq`` and whose groups hold ``betas``:
#: :func:`adam_preconditioner` and the Adam branch of :func:`stability_threshold` apply to them.
ADAM_LIKE: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.Adam, torch.optim.AdamW)
#: Optimizers whose update is normalised entry-wise (μP's "Adam" learning-rate rules): Adam-like ones and
#: their relatives whose state holds another second-moment statistic.
ENTRYWISE_ADAPTIVE: tuple[type[torch.optim.Optimizer], ...] = (
    *ADAM_LIKE, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adagrad, torch.optim.RMSprop,
)  # fmt: skip
#: Optimizers whose update is the (momentum) gradient itself (μP's "SGD" learning-rate rules).
SGD_LIKE: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.SGD, torch.optim.ASGD)

#: LR-valued per-group lists of LR schedulers (scaled with their groups' LRs when groups are split).
SCHEDULER_LR_LISTS = ("base_lrs", "_last_lr", "min_lrs", "max_lrs")
#: Other per-group lists of LR schedulers (repeated as they are).
SCHEDULER_PLAIN_LISTS = ("lr_lambdas",)


def learning_rates_by_parameter(optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer]) -> dict[int, float]:
    """``{id(parameter): lr of its param group}`` over one or several optimizers.

    Example:
        >>> w, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))
        >>> lrs = learning_rates_by_parameter(torch.optim.SGD([{"params": [w], "lr": 0.5}, {"params": [b]}], lr=0.1))
        >>> lrs[id(w)], lrs[id(b)]
        (0.5, 0.1)
    """
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    return {id(p): float(group["lr"]) for opt in optimizers for group in opt.param_groups for p in group["params"]}


# --------------------------------------------------------------------------------------------------
# What kind of optimizer
# --------------------------------------------------------------------------------------------------
def update_family(optimizer: torch.optim.Optimizer) -> Literal["adam", "sgd"] | None:
    """``"adam"`` for an entry-wise adaptive optimizer, ``"sgd"`` for an SGD-like one, else ``None``.

    Entry-wise adaptive: :data:`ENTRYWISE_ADAPTIVE` and any class whose name contains "adam" (e.g. a fused or
    third-party Adam). SGD-like: :data:`SGD_LIKE`.

    Example:
        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> update_family(torch.optim.RMSprop(p)), update_family(torch.optim.SGD(p, lr=0.1)), update_family(torch.optim.LBFGS(p))
        ('adam', 'sgd', None)
    """
    if isinstance(optimizer, ENTRYWISE_ADAPTIVE) or "adam" in type(optimizer).__name__.lower():
        return "adam"
    if isinstance(optimizer, SGD_LIKE):
        return "sgd"
    return None


# --------------------------------------------------------------------------------------------------
# Preconditioners and thresholds of the edge of stability
# --------------------------------------------------------------------------------------------------
def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> Tensor | None:
    """Flat ``D = (lr / (sqrt(v̂) + eps))^{1/2}`` for ``params`` from an Adam/AdamW optimizer's state.

    With a frozen preconditioner ``P = diag(sqrt(v̂) + eps)``, Adam with momentum ``β1`` is stable on
    a quadratic while ``lr · λ_max(P^{-1} H) < 2 (1 + β1) / (1 - β1)`` (Cohen et al., "Adaptive
    gradient methods at the edge of stability", 2022). ``λ(D H D) = λ(lr · P^{-1} H)``; each
    parameter uses the ``lr`` and ``eps`` of its own param group, and ``v̂`` is the bias-corrected
    second moment (``max_exp_avg_sq`` with ``amsgrad``). Parameters the optimizer does not update get
    ``D = 0``. Sharded (``DTensor``) parameters give this rank's slice of ``D``.

    Returns:
        The flat ``D`` in the order of ``params``, or ``None`` while the optimizer has no state yet
        (before its first step there is no preconditioner).

    Raises:
        TypeError: if ``optimizer`` is not Adam or AdamW.

    Example::

        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        ...  # a few training steps, so that Adam's second moments exist
        d = adam_preconditioner(opt, model.parameters())  # None before the first step
    """
    if not isinstance(optimizer, ADAM_LIKE):
        raise TypeError(
            f"the preconditioned sharpness needs Adam or AdamW, got {type(optimizer).__name__}; "
            "use the raw sharpness for other optimizers"
        )
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    any_state = False
    for p in params:
        group, state = group_of.get(id(p)), optimizer.state.get(p, {})
        if group is None:
            parts.append(torch.zeros(local(p).numel(), dtype=p.dtype, device=p.device))
            continue
        if "exp_avg_sq" not in state:
            parts.append(None)
            continue
        any_state = True
        beta2 = group["betas"][1]
        step = float(state["step"])
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        v_hat = local(v).detach().to(p.dtype) / (1 - beta2**step)
        lr = float(group["lr"])
        parts.append((lr / (v_hat.sqrt() + group["eps"])).sqrt().reshape(-1))
    if not any_state or any(x is None for x in parts):
        return None
    return torch.cat(parts)


def lr_preconditioner(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> Tensor | None:
    """Flat ``D = sqrt(lr)`` per parameter (its param group's ``lr``), or ``None`` when all groups share one ``lr``.

    With per-group learning rates (μP, per-layer control) gradient descent is stable on a quadratic while
    ``λ_max(D H D) = λ_max(P H) < 2`` with ``P = diag(lr)``; ``lr · λ_max(H)`` of a single group is then the
    wrong figure. Parameters the optimizer does not update get ``D = 0``. Sharded (``DTensor``) parameters give
    this rank's slice of ``D``.

    Example:
        >>> w, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([{"params": [w], "lr": 0.25}, {"params": [b], "lr": 1.0}])
        >>> lr_preconditioner(opt, [w, b])
        tensor([0.5000, 0.5000, 1.0000])
        >>> lr_preconditioner(torch.optim.SGD([w, b], lr=0.1), [w, b]) is None
        True
    """
    lr_of = learning_rates_by_parameter(optimizer)
    params = list(params)
    lrs = [lr_of.get(id(p), 0.0) for p in params]
    if len(set(lrs)) <= 1:
        return None
    return torch.cat([torch.full((local(p).numel(),), lr**0.5, dtype=p.dtype, device=p.device) for p, lr in zip(params, lrs)])


def stability_threshold(optimizer: torch.optim.Optimizer) -> float:
    """Edge-of-stability threshold of ``lr · λ_max`` (raw for SGD, preconditioned for Adam/AdamW).

    - SGD, heavy-ball momentum ``μ`` and dampening ``d``: ``2 (1 + μ) / (1 - d)`` (2 without momentum);
      Nesterov: ``2 (1 + μ) / ((1 + 2μ)(1 - d))``.
    - Adam/AdamW: ``2 (1 + β1) / (1 - β1)`` for the preconditioned sharpness.
    - Other optimizers: 2 (the gradient-descent value).

    Uses the first param group. Derived from the linear recurrence on a 1-D quadratic
    (Cohen et al. 2021, 2022); see ``tests/test_hessian_threshold.py``.

    Example:
        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> stability_threshold(torch.optim.SGD(p, lr=0.1)), round(stability_threshold(torch.optim.SGD(p, lr=0.1, momentum=0.9)), 6)
        (2.0, 3.8)
    """
    group = optimizer.param_groups[0]
    if isinstance(optimizer, ADAM_LIKE):
        beta1 = group["betas"][0]
        return 2 * (1 + beta1) / (1 - beta1)
    if isinstance(optimizer, torch.optim.SGD):
        mu, damp = group.get("momentum", 0.0), group.get("dampening", 0.0)
        if mu == 0:
            return 2.0
        base = 2 * (1 + mu) / (1 + 2 * mu) if group.get("nesterov") else 2 * (1 + mu)
        return base / (1 - damp)
    return 2.0


# --------------------------------------------------------------------------------------------------
# Splitting param groups, schedulers following
# --------------------------------------------------------------------------------------------------
def split_param_groups(optimizer: torch.optim.Optimizer, key: Callable[[Tensor], Hashable]) -> list[tuple[int, Hashable]]:
    """Split each param group of ``optimizer`` by ``key(parameter)``, in place; every other setting is kept.

    The parameters of one group with equal keys form one new group (in order of first appearance, parameter
    order kept), a copy of the old group's settings (``lr``, ``initial_lr``, ``weight_decay``, ``betas``, ...).
    An empty group is kept as it is. Nothing changes if ``key`` raises. The optimizer's state is keyed by
    parameter, so it carries over; schedulers built on the optimizer follow with :func:`follow_split`.

    Returns:
        ``[(old group index, key)]`` per new group (key ``None`` for an empty group).

    Example:
        >>> w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.Adam([{"params": [w, b], "lr": 0.1}, {"params": []}], lr=0.2)
        >>> split_param_groups(opt, lambda p: "matrix" if p.ndim == 2 else "vector")
        [(0, 'matrix'), (0, 'vector'), (1, None)]
        >>> [g["lr"] for g in opt.param_groups]
        [0.1, 0.1, 0.2]
    """
    new_groups: list[dict[str, Any]] = []
    origin: list[tuple[int, Hashable]] = []
    for gi, group in enumerate(optimizer.param_groups):
        if not group["params"]:
            new_groups.append(group)
            origin.append((gi, None))
            continue
        buckets: dict[Hashable, list[Tensor]] = {}
        for p in group["params"]:
            buckets.setdefault(key(p), []).append(p)
        for k, params in buckets.items():
            new_groups.append({**{name: v for name, v in group.items() if name != "params"}, "params": params})
            origin.append((gi, k))
    optimizer.param_groups[:] = new_groups
    return origin


def follow_split(scheduler: Any, origin: Sequence[int], scale_lr: Callable[[int, Any], Any] | None = None) -> None:
    """Make an LR scheduler built before :func:`split_param_groups` follow the new groups (new group ``i`` came
    from old group ``origin[i]``).

    Its per-group lists (:data:`SCHEDULER_LR_LISTS`, :data:`SCHEDULER_PLAIN_LISTS`) are repeated for the new
    groups, LR-valued ones passed through ``scale_lr(new group index, value)`` when given (e.g. μP's per-group
    factor); chained/sequential schedulers follow through their children. ``last_epoch`` and everything else
    are kept, so schedules stay relative to each group's own LR.

    Raises:
        ValueError: if a per-group list does not hold one entry per old group (e.g. groups added with
            ``add_param_group`` after the scheduler was built): torch would then schedule the new groups
            with the wrong entries, or not at all. Nothing is changed then.

    Example:
        >>> w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([w, b], lr=1.0)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        >>> origin = [i for i, _ in split_param_groups(opt, lambda p: p.ndim)]
        >>> follow_split(sched, origin, scale_lr=lambda i, lr: lr / 4 if i == 0 else lr)
        >>> sched.base_lrs
        [0.25, 1.0]
    """
    origin = list(origin)
    if not origin:
        return
    groups = max(origin) + 1
    schedulers = _with_children(scheduler)
    for s in schedulers:  # check everything before changing anything
        for attr in SCHEDULER_LR_LISTS + SCHEDULER_PLAIN_LISTS:
            old = getattr(s, attr, None)
            if isinstance(old, list) and old and len(old) != groups:
                raise ValueError(
                    f"cannot split the param groups under the LR scheduler {type(s).__name__}: its {attr} has "
                    f"{len(old)} entries for {groups} param groups (were groups added to the optimizer after the "
                    "scheduler was built?); build the scheduler after the optimizer has all its groups"
                )
    for s in schedulers:
        for attr in SCHEDULER_LR_LISTS + SCHEDULER_PLAIN_LISTS:
            old = getattr(s, attr, None)
            if not isinstance(old, list) or not old:
                continue
            if attr in SCHEDULER_LR_LISTS and scale_lr is not None:
                setattr(s, attr, [scale_lr(i, old[o]) for i, o in enumerate(origin)])
            else:
                setattr(s, attr, [old[o] for o in origin])


def _with_children(scheduler: Any) -> list[Any]:
    """The scheduler and, recursively, the schedulers it chains (``SequentialLR``, ``ChainedScheduler``), each once."""
    out: dict[int, Any] = {}
    todo = [scheduler]
    while todo:
        s = todo.pop(0)
        if id(s) not in out:
            out[id(s)] = s
            todo.extend(getattr(s, "_schedulers", None) or [])
    return list(out.values())
