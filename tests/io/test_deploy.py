"""`bam deploy`: TorchScript and ONNX files of a tiny export, run back on an input the test draws and
compared with the eager model; the printed difference; a mismatch and a missing extra in one line."""
from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import pytest
import torch

import bam
from bam.io import deploy
from bam.io.deploy import DEPLOY_FORMATS, DeploymentError, deploy_backbone, main
from bam.io import export_backbone
from bam.recipe import DataRecipe
from cli_runs import run_bam
from eval_fixtures import CNN, VIT, write_checkpoint

HAS_ONNX = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))
PRINTED = re.compile(r"bam deploy: wrote (\S+) \((\w+)\); max abs difference to the eager model on the same 3 "
                     r"images: (\S+)\n")


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("deploy")
    recipe = DataRecipe(input_size=32, crop_pct=1.0)
    return {name: export_backbone(write_checkpoint(folder, *spec), folder / name, recipe=recipe)
            for name, spec in (("vit", VIT), ("cnn", CNN))}


def run_file(path: Path, images: torch.Tensor) -> torch.Tensor:
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates torch.jit.load
        return torch.jit.load(str(path))(images)


@pytest.mark.process
@pytest.mark.parametrize("format", [
    "torchscript", pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="needs the onnx extra")),
])
def test_bam_deploy_writes_a_file_that_computes_what_the_eager_model_computes(exports, format):
    done = run_bam(["deploy", str(exports["vit"]), "--format", format])
    assert done.returncode == 0, done.stdout
    printed = PRINTED.search(done.stdout)
    suffix = DEPLOY_FORMATS[format][0]
    assert printed and printed[1] == str(exports["vit"] / f"model{suffix}") and printed[2] == format
    assert 0 <= float(printed[3]) <= 1e-4
    images = torch.randn(5, 3, 32, 32)  # a batch size the file was not traced with
    with torch.no_grad():
        expected = bam.load_backbone(exports["vit"])(images)
    torch.testing.assert_close(run_file(Path(printed[1]), images), expected, atol=1e-4, rtol=1e-4)


def test_torchscript_of_a_cnn_matches_in_process(exports, tmp_path):
    path, difference = deploy_backbone(exports["cnn"], tmp_path / "cnn.pt", "torchscript")
    assert difference <= 1e-5
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(run_file(path, images), bam.load_backbone(exports["cnn"])(images))


def test_a_file_that_computes_something_else_is_removed_and_reported(exports, tmp_path, monkeypatch, capsys):
    suffix, write, run = DEPLOY_FORMATS["torchscript"]
    monkeypatch.setitem(DEPLOY_FORMATS, "torchscript", (suffix, write, lambda path, images: run(path, images) + 0.5))
    with pytest.raises(SystemExit) as stop:
        main([str(exports["cnn"]), "--output", str(tmp_path / "cnn.pt")])
    assert str(stop.value.code) == ("bam deploy: error: the torchscript file's output differs from the eager "
                                    "model's by up to 0.5 (tolerance 0.0001); nothing was written")
    assert not (tmp_path / "cnn.pt").exists()


def test_onnx_without_its_extra_says_what_to_install(exports, tmp_path, monkeypatch):
    monkeypatch.setattr(deploy.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as stop:
        main([str(exports["cnn"]), "--format", "onnx", "--output", str(tmp_path / "cnn.onnx")])
    assert str(stop.value.code) == ("bam deploy: error: ONNX export needs onnx and onnxruntime: "
                                    "pip install \"bam-ssl[onnx]\" (or pip install onnx onnxruntime)")


def test_a_missing_export_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "nothing"), "--format", "torchscript"])
    assert str(stop.value.code).startswith("bam deploy: error: ") and "nothing" in str(stop.value.code)
