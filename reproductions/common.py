"""Plumbing shared by the reproduction scripts: arguments, output files, a quiet Trainer.

Every script is ``python reproductions/<name>.py [--quick] --out DIR`` and writes ``DIR/<name>.json`` (the
numbers), ``DIR/<name>.png`` (the figure) and TensorBoard logs under ``DIR/tb/``. The numbers come from the
library's callbacks and ``measure`` functions; this module only handles files and settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from lightning_align.logging import MemoryLogger  # noqa: F401  (for the scripts: common.MemoryLogger)

REPO = Path(__file__).resolve().parents[1]


def parse_args(name: str, description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """``--quick`` (about a minute on 2 CPU cores), ``--out DIR`` (default ``runs/<name>``), ``--seed``."""
    parser = argparse.ArgumentParser(prog=f"reproductions/{name}.py", description=description)
    parser.add_argument("--quick", action="store_true", help="small settings that finish in about a minute on 2 CPU cores")
    parser.add_argument("--out", type=Path, default=Path("runs") / name, help="output folder (JSON, PNG, TensorBoard logs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", type=str, default=None, help="folder with MNIST/CIFAR-10 for full runs (optional)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def quiet() -> None:
    """Silence Lightning's per-fit chatter (GPU/TPU lines, tips, model summaries)."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def trainer(
    out: Path, run_name: str, callbacks: list[pl.Callback], extra_loggers: tuple[Logger, ...] = (), **kwargs: Any
) -> pl.Trainer:
    """A CPU Trainer logging to TensorBoard under ``out/tb/run_name`` (and to ``extra_loggers``, e.g. a
    :class:`MemoryLogger`), without progress bar or checkpoints."""
    quiet()
    settings: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=[TensorBoardLogger(out / "tb", name=run_name, default_hp_metric=False), *extra_loggers],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    settings.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **settings)


def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_results(out: Path, name: str, results: dict[str, Any], figure: Any) -> Path:
    """Write ``out/<name>.json`` and ``out/<name>.png`` (the matplotlib figure is closed); returns the JSON path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = out / f"{name}.json"
    path.write_text(json.dumps(_finite(results), indent=2))
    figure.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    print(f"wrote {path} and {out / (name + '.png')}", file=sys.stderr)
    return path
