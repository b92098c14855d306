"""Per-step cost of a parametrization: SP vs ours (forward hooks) vs microsoft/mup (MuReadout + MuAdam).

Run by hand (never in tests):

    OMP_NUM_THREADS=1 python benchmarks/parametrization.py [--width 1024] [--repeats 25] [--steps 4]

Each model is trained for ``--steps`` Adam steps on a fixed batch; the three variants are timed
interleaved (round-robin, best of the repeats) in the same process, so the ratios compare like with
like. Our μP adds one scalar multiply per hooked module (readout input, and residual branches for
depth schemes); the optimizer has a few more param groups (one per distinct factor).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from mup import MuAdam, set_base_shapes
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from param_nets import DepthNet, MLPNet, TinyGPT  # noqa: E402

from lightning_align.parametrize.auto import auto_parametrize  # noqa: E402


def _variants(kind: str, width: int, base: int) -> dict:
    torch.manual_seed(0)
    if kind == "mlp":
        data = (torch.randn(64, 20), torch.randint(0, 10, (64,)))
        sp = MLPNet(width=width)
        ours = MLPNet(width=width)
        theirs = MLPNet(width=width, mu=True)
        with torch.device("meta"):
            set_base_shapes(theirs, MLPNet(width=base, mu=True), delta=MLPNet(width=2 * base, mu=True))
        p = auto_parametrize(ours, "mup", base_width=base)
    elif kind == "gpt":
        idx = torch.randint(0, 32, (16, 9))
        data = (idx[:, :-1], idx[:, 1:])
        sp, ours = TinyGPT(width=width, depth=4), TinyGPT(width=width, depth=4)
        theirs = TinyGPT(width=width, depth=4, mu=True)
        with torch.device("meta"):
            set_base_shapes(theirs, TinyGPT(width=base, depth=4, mu=True), delta=TinyGPT(width=2 * base, depth=4, mu=True))
        p = auto_parametrize(ours, "mup", base_width=base)
    else:  # depth: residual MLP with depth-μP branch hooks (no mup peer: mup has no depth scaling)
        data = (torch.randn(64, 20), torch.randint(0, 10, (64,)))
        sp, ours = DepthNet(width=width, depth=16), DepthNet(width=width, depth=16)
        p = auto_parametrize(ours, "depth_mup", base_width=base, base_depth=2)
        theirs = None
    out = {
        "sp": (sp, torch.optim.Adam(sp.parameters(), lr=1e-3)),
        "ours": (ours, p.rewrite_optimizer(torch.optim.Adam(ours.parameters(), lr=1e-3))),
    }
    if theirs is not None:
        out["mup"] = (theirs, MuAdam(theirs.parameters(), lr=1e-3))
    return {"data": data, "variants": out}


def _steps(model, opt, data, n: int) -> float:
    x, y = data
    t0 = time.perf_counter()
    for _ in range(n):
        out = model(x)
        loss = F.cross_entropy(out.flatten(0, -2) if out.ndim == 3 else out, y.flatten() if out.ndim == 3 else y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / n


def _setup_cost(repeats: int) -> None:
    """One-off cost of the callback's setup: two meta-device re-instantiations, role table, init rescale."""
    from example_modules import GPT

    for width in (256, 1024):
        model = GPT(width=width, depth=4, heads=4, block_size=64)
        t_build = min(_timed(lambda: GPT(width=width, depth=4, heads=4, block_size=64)) for _ in range(repeats))
        t_param = min(_timed(lambda: auto_parametrize(GPT(width=width, depth=4, heads=4, block_size=64), "completep",
                                                       base_width=64, base_depth=2)) for _ in range(repeats))  # fmt: skip
        n = sum(p.numel() for p in model.parameters())
        print(f"setup  GPT width {width} ({n / 1e6:.1f} M params): build {1e3 * t_build:.1f} ms, "
              f"build + auto_parametrize {1e3 * t_param:.1f} ms (once per fit)")  # fmt: skip


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--base", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, width {args.width}, base {args.base}")
    for kind in ("mlp", "gpt", "depth"):
        setup = _variants(kind, args.width if kind != "gpt" else args.width // 4, args.base if kind != "gpt" else args.base // 4)
        times: dict[str, list[float]] = {k: [] for k in setup["variants"]}
        for name, (model, opt) in setup["variants"].items():  # warm-up
            _steps(model, opt, setup["data"], 3)
        for _ in range(args.repeats):
            for name, (model, opt) in setup["variants"].items():
                times[name].append(_steps(model, opt, setup["data"], args.steps))
        med = {k: min(v) for k, v in times.items()}  # min over repeats: robust to other load on the machine
        line = ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in med.items())
        ratios = ", ".join(f"{k}/sp {v / med['sp']:.3f}" for k, v in med.items() if k != "sp")
        print(f"{kind:6s} step: {line} | {ratios}")
    _setup_cost(max(args.repeats // 2, 1))


if __name__ == "__main__":
    main()
