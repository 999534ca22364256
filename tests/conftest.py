"""Shared fixtures: tiny in-memory data that exercises the training stack in seconds."""
from __future__ import annotations

import importlib.metadata
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

HANG_GUARD_S = 180  # only to turn a deadlock into a failure; not a performance limit
# scripts/install.sh writes this file into the environment it builds with the `ffcv` extra
FFCV_EXPECTED_MARKER = "bam-expects-ffcv"


def ffcv_expected() -> str | None:
    """Why this environment should have FFCV (None: it was set up without it)."""
    if (Path(sys.prefix) / FFCV_EXPECTED_MARKER).is_file():
        return f"scripts/install.sh marked {sys.prefix} with {FFCV_EXPECTED_MARKER}"
    try:
        return f"the ffcv {importlib.metadata.version('ffcv')} distribution is installed"
    except importlib.metadata.PackageNotFoundError:
        return None


def require_ffcv() -> None:
    """Skip an FFCV test only where FFCV was never installed (a user without the `ffcv` extra);
    where the install provided it, an import that fails is a test failure: a broken FFCV build
    must not pass CI as a row of skips."""
    try:
        import ffcv  # noqa: F401
    except Exception as error:  # a broken build raises ImportError, OSError (libturbojpeg), numba errors...
        reason = ffcv_expected()
        if reason is not None:
            pytest.fail(f"FFCV does not import although {reason}: {type(error).__name__}: {error}")
        pytest.skip("FFCV is not installed (pip install -e '.[ffcv]', see README)")


def spawn_gloo_workers(worker: Callable[..., None], world: int, tmp_path: Path) -> None:
    """Run `worker(rank, world, init_file, out_dir)` on `world` processes and wait for them; a
    deadlock (mismatched collectives) fails the test instead of hanging the suite."""
    context = mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + HANG_GUARD_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} gloo processes did not finish within {HANG_GUARD_S} s (deadlock?)")


def run_process_group(command: list[str], timeout: float, **popen: object) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)` in a session of its own: on a hang
    the whole process group (launchers' workers included) is killed, not only the first process,
    and the test fails with the output so far."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **popen)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"{command} did not finish within {timeout} s (hang?):\n{(out or '')[-2000:]}{(err or '')[-2000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def readline_within(stream, timeout: float) -> str:
    """The next line of a child's text pipe, failing the test instead of blocking forever when
    the child hangs before writing it."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            pytest.fail(f"no line from the child process within {timeout} s (hang?)")
    return stream.readline()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine idle-waiting threads cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyCropsDataModule(pl.LightningDataModule):
    """Random images cut into deterministic multi-crop views (2 global + `num_local` local)."""

    def __init__(self, num_images: int = 32, batch_size: int = 8, global_size: int = 32,
                 local_size: int = 16, num_local: int = 2, num_classes: int = 4) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(num_images, 3, global_size, global_size, generator=generator)
        self.labels = torch.arange(num_images) % num_classes
        self.batch_size = batch_size
        self.local_size = local_size
        self.num_local = num_local

    def _views(self, images: torch.Tensor) -> list[torch.Tensor]:
        size = self.local_size
        globals_ = [images, images.flip(-1)]
        locals_ = [images[..., i : i + size, i : i + size] for i in range(self.num_local)]
        return globals_ + locals_

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=self.batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        images, labels = batch
        return self._views(images), labels

    def knn_dataloaders(self) -> tuple[DataLoader, DataLoader]:
        dataset = TensorDataset(self.images, self.labels)
        return DataLoader(dataset, batch_size=16), DataLoader(dataset, batch_size=16)


@pytest.fixture
def tiny_data() -> TinyCropsDataModule:
    return TinyCropsDataModule()
