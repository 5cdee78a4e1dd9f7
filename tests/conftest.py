"""Test-wide settings: never touch the network; one intra-op thread.

Tiny models gain nothing from intra-op parallelism, and when anything else runs on the 2-core machine
OpenMP spin-waiting made one tiny pipeline call take 6 s with 2 threads against 0.06 s with 1 (measured).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
