"""Optimizer plumbing (measure/optim.py): group splitting, schedulers following it, optimizer kinds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_align.measure import hessian
from lightning_align.measure.optim import (
    ADAM_LIKE,
    ENTRYWISE_ADAPTIVE,
    follow_split,
    split_param_groups,
    update_family,
)
from lightning_align.parametrize import optimizer_family


def _params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))]


def _lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [g["lr"] for g in opt.param_groups]


def test_split_keeps_settings_order_state_and_empty_groups() -> None:
    w1, b1, w2, b2 = _params()
    opt = torch.optim.AdamW([{"params": [w1, b1, w2], "lr": 0.1}, {"params": []}, {"params": [b2], "lr": 0.3}], lr=0.2, weight_decay=0.05)
    (w1.sum() + b1.sum() + w2.sum() + b2.sum()).backward()
    opt.step()
    state_before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in (w1, b1, w2, b2)}
    keep = opt.param_groups

    origin = split_param_groups(opt, lambda p: p.ndim)

    assert origin == [(0, 2), (0, 1), (1, None), (2, 1)]
    assert opt.param_groups is keep  # split in place: the same list object
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(w1), id(w2)], [id(b1)], [], [id(b2)]]
    assert _lrs(opt) == [0.1, 0.1, 0.2, 0.3]
    assert all(g["weight_decay"] == 0.05 and g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    for p in (w1, b1, w2, b2):
        assert all(torch.equal(opt.state[p][k], v) for k, v in state_before[id(p)].items())
    opt.step()  # torch accepts the split groups


def test_split_changes_nothing_when_the_key_raises() -> None:
    w, b = _params()[:2]
    opt = torch.optim.SGD([w, b], lr=0.1)
    groups = [dict(g) for g in opt.param_groups]

    def key(p: torch.Tensor) -> int:
        if p.ndim == 1:
            raise ValueError("no role")
        return 0

    with pytest.raises(ValueError, match="no role"):
        split_param_groups(opt, key)
    assert [dict(g) for g in opt.param_groups] == groups


def test_scheduler_follows_split_relative_to_each_group() -> None:
    w1, b1, w2, b2 = _params()
    opt = torch.optim.SGD([{"params": [w1, b1]}, {"params": [w2, b2], "lr": 0.4}], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.5**s, lambda s: 1.0 / (1 + s)])
    opt.step()
    sched.step()  # scheduler state from before the split: last_epoch 1
    origin = [gi for gi, _ in split_param_groups(opt, lambda p: p.ndim)]
    assert origin == [0, 0, 1, 1]
    follow_split(sched, origin, scale_lr=lambda i, lr: lr / 4 if i % 2 == 0 else lr)  # matrices at 1/4
    assert sched.base_lrs == [0.25, 1.0, 0.1, 0.4]
    assert len(sched.lr_lambdas) == 4 and sched.last_epoch == 1
    opt.step()
    sched.step()  # step 2: each group's own LR times its old group's factor
    assert _lrs(opt) == pytest.approx([0.25 * 0.25, 1.0 * 0.25, 0.1 / 3, 0.4 / 3])


def test_chained_scheduler_children_follow() -> None:
    w, b = _params()[:2]
    opt = torch.optim.SGD([w, b], lr=1.0)
    first = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2)
    second = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    seq = torch.optim.lr_scheduler.SequentialLR(opt, [first, second], milestones=[2])
    origin = [gi for gi, _ in split_param_groups(opt, lambda p: p.ndim)]
    assert origin == [0, 0]
    follow_split(seq, origin, scale_lr=lambda i, lr: lr * (i + 1))
    assert first.base_lrs == [1.0, 2.0] and second.base_lrs == [1.0, 2.0] and len(seq._last_lr) == 2


def test_short_scheduler_list_raises_and_changes_nothing() -> None:
    """A scheduler list shorter than the groups (groups added after the scheduler) cannot be split: it raises.

    Skipping it instead would leave torch zipping the list against the new groups: new group i would get the
    entry of old group i (another group's LR) and the groups beyond the list would not be scheduled at all.
    """
    w1, b1, w2, _ = _params()
    opt = torch.optim.SGD([w1, b1], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    opt.add_param_group({"params": [w2], "lr": 0.1})  # the scheduler knows one group, the optimizer two
    before = (list(sched.base_lrs), list(sched.lr_lambdas), list(sched._last_lr))
    origin = [gi for gi, _ in split_param_groups(opt, lambda p: p.ndim)]
    with pytest.raises(ValueError, match=r"LambdaLR: its base_lrs has 1 entries for 2 param groups"):
        follow_split(sched, origin)
    assert (sched.base_lrs, sched.lr_lambdas, sched._last_lr) == before


def test_longer_scheduler_list_raises() -> None:
    w, b = _params()[:2]
    opt = torch.optim.SGD([w, b], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    sched.base_lrs = [1.0, 1.0]  # one group, two entries
    with pytest.raises(ValueError, match="2 entries for 1 param groups"):
        follow_split(sched, [0, 0])


def test_retarget_scheduler_is_follow_split_with_the_lr_factors() -> None:
    from lightning_align.parametrize.apply import retarget_scheduler
    from lightning_align.parametrize.rules import ParamRule, Scale

    w, b = _params()[:2]
    opt = torch.optim.SGD([w, b], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    split_param_groups(opt, lambda p: p.ndim)
    retarget_scheduler(sched, [(0, ParamRule(lr=Scale(div=4.0))), (0, ParamRule())])
    assert sched.base_lrs == [0.25, 1.0] and sched._last_lr == [0.25, 1.0]


def test_optimizer_kinds_in_one_place() -> None:
    p = [nn.Parameter(torch.zeros(1))]
    assert hessian.ADAM_LIKE is ADAM_LIKE  # the name callbacks import from measure.hessian
    assert set(ADAM_LIKE) <= set(ENTRYWISE_ADAPTIVE)
    for cls in ENTRYWISE_ADAPTIVE:
        assert update_family(cls(p)) == optimizer_family(cls(p)) == "adam"
    assert update_family(torch.optim.ASGD(p)) == "sgd"

    class MyFusedAdam(torch.optim.SGD):  # a third-party Adam that is not a torch subclass
        pass

    assert update_family(MyFusedAdam(p, lr=0.1)) == "adam"
    assert update_family(torch.optim.LBFGS(p)) is None
    with pytest.raises(ValueError, match="LBFGS is not supported"):
        optimizer_family(torch.optim.LBFGS(p))
