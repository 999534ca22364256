"""Shared fixtures; the helpers they build on live in tests/helpers/ (on the path via setup.cfg)."""
from __future__ import annotations

import pytest
import torch

from tiny_runs import TinyCropsDataModule

# tiers: `--fast` (the fast tier), and a test that starts a child process must carry a process
# marker (docs/testing.md); pytester: tests/test_tiers.py runs pytest on generated tests to check both
pytest_plugins = ("tiers", "pytester")


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


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `gpu` needs CUDA: skipped without it (tests/gpu/check.sh runs them on GPUs)."""
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs CUDA: run on a GPU machine with bash tests/gpu/check.sh")
