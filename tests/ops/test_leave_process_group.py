"""`leave_process_group`: the end of a stage on several processes. A process must not tear its
process group down while a peer is still finishing (rank 0 writing results): that aborted rank 1
at exit ("terminate called without an active exception", exit -6) under torchrun."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch.distributed as dist

from bam.ops.distributed import leave_process_group


def _finish_stage(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    still_writing = Path(out_dir) / "rank0_still_writing"
    if rank == 0:
        time.sleep(1.0)  # the last rank to finish: results are being written
        still_writing.write_text("done")
    leave_process_group()
    # no process leaves before every process has finished its own work
    assert still_writing.read_text() == "done"
    assert not dist.is_initialized()


@pytest.mark.distributed
def test_no_process_leaves_the_group_before_the_last_one_finished(tmp_path):
    # imported here, not at the top: both spawned workers import this module, and need no Lightning
    from tiny_runs import spawn_gloo_workers

    spawn_gloo_workers(_finish_stage, 2, tmp_path)


def test_without_a_process_group_it_does_nothing():
    leave_process_group()
    assert not dist.is_initialized()
