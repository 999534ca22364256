"""Items 3 and 9 of issue 14: on resume the settings given for the run win over the checkpoint's
(lr included, as the optimiser really uses it), a checkpoint URL is fetched and resumed like a
file, and `--ckpt_path last` falls back to the newest complete checkpoint."""
from __future__ import annotations

import csv
import functools
import http.server
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch

from bam.training.run_cli import find_last_checkpoint
from safety_runs import dead_pid, pretrain


def _lr_by_step(run_dir: Path) -> dict[int, float]:
    (metrics,) = run_dir.glob("csv/version_*/metrics.csv")
    with metrics.open() as file:
        return {int(row["step"]): float(row["train/lr"]) for row in csv.DictReader(file) if row.get("train/lr")}


@pytest.mark.process
def test_lr_given_on_resume_from_a_checkpoint_url_is_the_lr_used(four_step_run, tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(four_step_run / "checkpoints"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/epoch=0-step=2.ckpt"
        status, _, err = pretrain(tmp_path, "--trainer.max_steps=4", "--ckpt_path", url, "--model.lr=5e-4")
    finally:
        server.shutdown()
        server.server_close()
    assert status == 0, err[-3000:]
    assert "model.init_args.lr: 0.0005 (checkpoint: 0.001)" in err  # the difference is named
    resumed, uninterrupted = _lr_by_step(tmp_path), _lr_by_step(four_step_run)
    assert sorted(resumed) == [2, 3]  # continued after step 2
    for step in (2, 3):  # the warm-up is linear in the peak lr: half the lr, half at every step
        assert resumed[step] == pytest.approx(uninterrupted[step] / 2, rel=1e-9)
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert final["hyper_parameters"]["lr"] == 5e-4


@pytest.mark.process
def test_ckpt_path_last_falls_back_to_the_newest_complete_checkpoint(four_step_run, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(four_step_run / "checkpoints", checkpoints)
    (checkpoints / "epoch=0-step=4.ckpt").unlink()
    last = checkpoints / "last.ckpt"
    # killed while writing the first last.ckpt: only its writer's partial temporary file is there
    partial = checkpoints / f".last.ckpt.{socket.gethostname()}.{dead_pid()}.0a1b2c3d.tmp"
    partial.write_bytes(last.read_bytes()[: 2**16])
    last.unlink()

    status, _, err = pretrain(tmp_path, "--trainer.max_steps=4", "--ckpt_path", "last")
    assert status == 0, err[-3000:]
    assert f"no complete last.ckpt in {checkpoints}: resuming from {checkpoints / 'epoch=0-step=2.ckpt'}" in err
    assert sorted(_lr_by_step(tmp_path)) == [2, 3]  # resumed after step 2, not from scratch
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 4
    assert not partial.exists()  # its writer is dead: cleaned up


@pytest.mark.process
def test_an_incompletefind_last_checkpoint_is_passed_over(four_step_run, tmp_path, capsys):
    for name in ("epoch=0-step=2.ckpt", "last.ckpt"):
        shutil.copy(four_step_run / "checkpoints" / name, tmp_path / name)
    last = tmp_path / "last.ckpt"
    last.write_bytes(last.read_bytes()[: 2**16])  # truncated by a non-atomic writer
    assert find_last_checkpoint(tmp_path) == str(tmp_path / "epoch=0-step=2.ckpt")
    assert "no complete last.ckpt" in capsys.readouterr().err
    (tmp_path / "epoch=0-step=2.ckpt").unlink()
    last.unlink()
    assert find_last_checkpoint(tmp_path) is None
    assert "starting anew" in capsys.readouterr().err
