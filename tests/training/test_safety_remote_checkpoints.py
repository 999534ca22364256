"""Item 1 of issue 14: no code runs from a checkpoint, local or fetched over http(s), through any
stage or the Python API; a file that is not a checkpoint is named as such."""
from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from bam.evaluation.backbone import resolve_backbone
from bam.io import UnsafeCheckpointError, load_backbone, load_checkpoint_file
from bam.io.safe_load import NotACheckpointError
from bam.methods import BAMModule
from tiny_runs import TinyCropsDataModule
from cli_runs import run_bam
from repo_paths import REPO


class WritesMarker:
    """Unpickling this calls `open(marker, "w")`: the file appearing means code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def served(tmp_path):
    """A crafted checkpoint, an HTML page and the marker path, served from 127.0.0.1."""
    marker = tmp_path / "code-ran"
    site = tmp_path / "site"
    site.mkdir()
    torch.save({"state_dict": {}, "global_step": 1, "payload": WritesMarker(marker)}, site / "evil.ckpt")
    (site / "page.ckpt").write_text("<html><body>404 not found</body></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", marker, site
    server.shutdown()
    server.server_close()


def _assert_refused_in_one_line(status: int, err: str, marker: Path) -> None:
    assert status != 0
    assert not marker.exists(), "the checkpoint's code ran"
    assert "Traceback" not in err, err[-3000:]
    assert "refused to load" in err.strip().splitlines()[-1]
    assert "weights_only=False" not in err


@pytest.mark.process
def test_bam_pretrain_refuses_a_crafted_checkpoint_url(served, tmp_path):
    base, marker, _ = served
    done = run_bam(["pretrain", "--config", str(REPO / "configs/pretrain/demo.yaml"),
                    f"--trainer.default_root_dir={tmp_path / 'run'}", "--ckpt_path", f"{base}/evil.ckpt"],
                   separate_stderr=True)
    _assert_refused_in_one_line(done.returncode, done.stderr, marker)


@pytest.mark.process
def test_bam_linear_refuses_a_crafted_checkpoint_url(served, tmp_path):
    base, marker, _ = served
    done = run_bam(["linear", "--config", str(REPO / "configs/eval/linear_demo.yaml"),
                    "--model.backbone=bam_cnn4", f"--trainer.default_root_dir={tmp_path / 'run'}",
                    "--ckpt_path", f"{base}/evil.ckpt"], separate_stderr=True)
    _assert_refused_in_one_line(done.returncode, done.stderr, marker)


def test_python_api_fit_refuses_a_crafted_checkpoint_url_and_file(served, tmp_path):
    base, marker, site = served
    model = BAMModule(backbone="bam_cnn4", num_local_crops=2, projector=dict(hidden_dim=32, out_dim=16, num_layers=2))
    for ckpt_path in (f"{base}/evil.ckpt", str(site / "evil.ckpt")):
        trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, default_root_dir=tmp_path)
        with pytest.raises(UnsafeCheckpointError, match="io.open"):
            trainer.fit(model, TinyCropsDataModule(), ckpt_path=ckpt_path)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_file(f"{base}/evil.ckpt")
    assert not marker.exists()


def test_a_page_that_is_not_a_checkpoint_is_named_without_advising_unsafe_loading(served):
    base, marker, _ = served
    with pytest.raises(NotACheckpointError, match="is not a checkpoint") as error:
        load_checkpoint_file(f"{base}/page.ckpt")
    assert "weights_only" not in str(error.value)
    assert error.value.__cause__ is None and error.value.__suppress_context__  # torch's advice not chained


def test_a_missing_remote_file_is_named(served):
    base, _, _ = served
    with pytest.raises(FileNotFoundError, match=f"could not download checkpoint '{base}/nothing.ckpt': HTTP Error 404"):
        load_checkpoint_file(f"{base}/nothing.ckpt")


def test_other_remote_schemes_are_refused_with_advice():
    with pytest.raises(ValueError, match="copy the file to local disk first"):
        load_checkpoint_file("s3://bucket/last.ckpt")


def test_evaluation_backbones_named_by_url_are_loaded_weights_only(served):
    base, marker, _ = served
    with pytest.raises(UnsafeCheckpointError, match="io.open"):
        resolve_backbone(f"{base}/evil.ckpt")  # what bam knn / linear / finetune / cluster do with --backbone
    with pytest.raises(UnsafeCheckpointError):
        load_backbone(f"{base}/evil.ckpt")
    assert not marker.exists()
