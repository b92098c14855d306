"""Edge-of-stability thresholds against real optimizer runs on a 1-D quadratic (and Adam's recurrence)."""

from __future__ import annotations

import pytest
import torch

from lightning_align.measure.hessian import stability_threshold


def _diverges(opt_factory, sharpness: float, steps: int = 800) -> bool:
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = opt_factory([w])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * sharpness * w**2).sum().backward()
        opt.step()
    return abs(float(w)) > 1.0


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(momentum=0.9), dict(momentum=0.5, dampening=0.5), dict(momentum=0.9, nesterov=True)],
)
def test_sgd_threshold(kwargs: dict) -> None:
    lr = 0.1
    factory = lambda p: torch.optim.SGD(p, lr=lr, **kwargs)  # noqa: E731
    thr = stability_threshold(factory([torch.nn.Parameter(torch.zeros(1))]))
    assert not _diverges(factory, 0.95 * thr / lr)
    assert _diverges(factory, 1.05 * thr / lr)


def test_adam_threshold_from_its_frozen_preconditioner_recurrence() -> None:
    # Adam with v frozen is heavy-ball EMA momentum on the preconditioned problem: x_{t+1} = x_t - h m_t,
    # m_t = b1 m_{t-1} + (1 - b1) x_t with h = lr * lambda / P. Stable iff h < threshold.
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, betas=(0.9, 0.999))
    thr = stability_threshold(opt)
    assert thr == pytest.approx(38.0)
    b1 = 0.9
    for h, stable in ((0.99 * thr, True), (1.01 * thr, False)):
        m = torch.tensor([[1 - (1 - b1) * h, -b1], [(1 - b1) * h, b1]], dtype=torch.float64)
        radius = float(torch.linalg.eigvals(m).abs().max())
        assert (radius < 1) == stable
