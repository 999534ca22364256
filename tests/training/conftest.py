"""Runs that several files of tests/training read."""
from __future__ import annotations

from pathlib import Path

import pytest

from safety_runs import pretrain
from shared_runs import made_once


def _pretrain_four_steps(run_dir: Path) -> None:
    status, _, err = pretrain(run_dir, "--trainer.max_steps=4")
    assert status == 0, err[-3000:]


@pytest.fixture(scope="session")
def four_step_run(tmp_path_factory) -> Path:
    """A tiny `bam pretrain` (safety_runs) of 4 steps at lr 1e-3: checkpoints after steps 2 and 4,
    and last.ckpt; made once for the resume and bit-rot tests, which copy what they change."""
    return made_once(tmp_path_factory, "four_step_run", _pretrain_four_steps)
