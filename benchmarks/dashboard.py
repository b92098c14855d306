"""Overhead of the terminal view (headline bookkeeping + progress-bar values) per measurement.

Peer, measured side by side in the same run: writing the same metrics with ``TensorBoardLogger.log_metrics``
(what every measurement does anyway). Reported as a ratio: headline cost / TensorBoard write cost.

    OMP_NUM_THREADS=1 python benchmarks/dashboard.py
"""

from __future__ import annotations

import tempfile
import time

from lightning.pytorch.loggers import TensorBoardLogger

from lightning_align.headlines import HeadlineHistory, progress_bar_values


def metrics_for(layers: int) -> dict[str, float]:
    out: dict[str, float] = {"sharpness/max_eig": 3.0, "sharpness/lr_x_max_eig": 0.3, "elr/spread": 2.0}
    for i in range(layers):
        for what in ("align/cos", "align/speed", "rank/weight_stable", "rank/repr_effective", "coord/rms", "coord/delta"):
            out[f"{what}/blocks.{i}.fc"] = 0.1 * (i + 1)
        out[f"elr/blocks.{i}.fc"] = 0.01 * (i + 1)
    return out


def best_of(fn, repeat: int = 5, number: int = 20) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return min(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        logger = TensorBoardLogger(root, name="bench")
        for layers in (4, 32, 128):
            metrics = metrics_for(layers)
            history = HeadlineHistory()
            step = iter(range(10**9))

            def headlines() -> None:
                history.add(next(step), metrics)
                progress_bar_values(metrics)

            def tensorboard() -> None:
                logger.log_metrics(metrics, step=next(step))

            t_h, t_tb = best_of(headlines), best_of(tensorboard)
            print(f"{len(metrics):5d} tags: headlines {t_h * 1e3:7.3f} ms, TensorBoard log_metrics {t_tb * 1e3:7.3f} ms, ratio {t_h / t_tb:.2f}")


if __name__ == "__main__":
    main()
