"""Shared fixtures; the helpers they build on live in tests/helpers/ (on the path via setup.cfg)."""
from __future__ import annotations

import pytest
import torch

from tiny_runs import TinyCropsDataModule


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine idle-waiting threads cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_data() -> TinyCropsDataModule:
    return TinyCropsDataModule()
