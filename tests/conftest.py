"""Test configuration: make ``tests.helpers`` importable and keep Lightning quiet."""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

import torch  # noqa: E402

# One thread per test process: the suite's budget is set for 2 CPU cores; more threads only contend.
torch.set_num_threads(1)
