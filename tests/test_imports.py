"""The math layers stand alone: importing them loads neither Lightning nor a callback."""

from __future__ import annotations

import subprocess
import sys


def test_measure_and_parametrize_import_without_lightning() -> None:
    code = (
        "import sys, lightning_align.measure, lightning_align.parametrize\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')"
        " or m.startswith('lightning_align.callbacks'))\n"
        "print(loaded)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_callbacks_are_reachable_from_the_package() -> None:
    import lightning_align

    assert lightning_align.Sharpness.__module__ == "lightning_align.callbacks.sharpness"
    assert set(lightning_align.__all__) <= set(dir(lightning_align))
