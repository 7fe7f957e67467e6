"""Shared fixtures. One Ray session per test module that asks for it (never one per test)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="module")
def ray_session():
    """A 2-CPU local Ray session shared by the tests of one module."""
    from wam.datasets.distributed import ray_session as session

    with session(num_cpus=2):
        yield


# One intra-op thread: the suite shares 2 cores with Ray workers, and oversubscribed torch threads
# slow small models down by orders of magnitude. Results are also more reproducible this way.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything_one_thread():
    """Seeded RNGs, and one torch thread again after any test that changed it."""
    torch.manual_seed(0)
    np.random.seed(0)
    yield
    torch.set_num_threads(1)
