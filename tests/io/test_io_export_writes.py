"""How exports are written and read back (issue 27 item 9, issue 26 item 8): the weights and
config.json appear as a pair or not at all, with the permissions the umask gives, a full disk or
an unwritable folder is one line, and reading checks the safetensors header (shapes, dtypes)
before a model is built, and config.json before anything."""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bam.evaluation.backbone import RandomInitWarning, resolve_backbone
from bam.io import CheckpointFormatError, CheckpointMismatchError, export_backbone, load_backbone
from bam.io import backbone_reader, export_cli, export_writer
from cli_runs import run_bam
from eval_fixtures import CNN, synthetic_args, write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), *CNN)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_export_files_follow_the_umask(checkpoint, tmp_path, umask):
    previous = os.umask(umask)
    try:
        output = export_backbone(checkpoint, tmp_path / "export")
    finally:
        os.umask(previous)
    assert mode(output / "model.safetensors") == mode(output / "config.json") == 0o666 & ~umask
    assert mode(output) == 0o777 & ~umask


def test_a_failed_export_leaves_the_previous_pair_whole(checkpoint, tmp_path, monkeypatch):
    output = export_backbone(checkpoint, tmp_path / "export")
    before = {path.name: path.read_bytes() for path in output.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_writer, "_write_config", disk_full)  # the weights are written, config.json fails
    with pytest.raises(export_writer.ExportWriteError) as error:
        export_backbone(checkpoint, output, encoder="student")
    assert str(error.value) == (f"no space left on {tmp_path}: nothing was written to {output} (its previous "
                                "contents are unchanged); free some space and export again")
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]  # no temporary folder left
    with pytest.raises(export_writer.ExportWriteError):
        export_backbone(checkpoint, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_an_unwritable_folder_is_one_line(checkpoint, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(export_writer.tempfile, "mkdtemp", read_only)
    with pytest.raises(SystemExit) as error:
        export_cli.main([str(checkpoint), "--output", str(tmp_path / "export")])
    assert str(error.value) == (f"bam export: error: cannot write into {tmp_path} ([Errno 13] Permission denied: "
                                f"'{tmp_path}'); choose an --output folder you can write to")


def test_the_header_is_checked_before_the_model_is_built(checkpoint, tmp_path, monkeypatch):
    output = export_backbone(checkpoint, tmp_path / "export")
    config = json.loads((output / "config.json").read_text())
    config["model_args"]["width"] = 512  # a 774-byte edit that asks for a far larger network
    (output / "config.json").write_text(json.dumps(config))
    built_on = []
    real_build = backbone_reader.build_backbone

    def recording_build(*args, **kwargs):
        built_on.append(torch.empty(0).device.type)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(backbone_reader, "build_backbone", recording_build)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch: features\.0\.weight \(file \(8, 3, 3, 3\), "
                                                      r"model \(512, 3, 3, 3\)\)"):
        load_backbone(output)
    assert built_on == ["meta"]  # described only, never allocated


def test_integer_weights_are_refused_by_name(checkpoint, tmp_path):
    output = export_backbone(checkpoint, tmp_path / "export")
    weights = load_file(output / "model.safetensors")
    weights["features.0.weight"] = weights["features.0.weight"].round().to(torch.int64)
    save_file(weights, output / "model.safetensors")
    with pytest.raises(CheckpointFormatError) as error:
        load_backbone(output)
    assert str(error.value) == (
        f"{str(output / 'model.safetensors')!r} stores 1 floating-point weight of the model as integers "
        "(features.0.weight: I64): they would be cast silently; the export is damaged or was written by other code, "
        "export it again"
    )


@pytest.mark.parametrize("text, problem", [("{not json", "is not valid JSON"), ("[]", "is not a JSON object"),
                                           ('{"architecture": "bam_cnn4"}', "lacks 'model_args'")])
def test_an_invalid_config_json_is_one_line(checkpoint, tmp_path, text, problem):
    output = export_backbone(checkpoint, tmp_path / "export")
    (output / "config.json").write_text(text)
    with pytest.raises(CheckpointFormatError) as error:
        load_backbone(output)
    assert str(error.value).startswith(f"{str(output / 'config.json')!r} {problem}")
    assert str(error.value).endswith("export the checkpoint again")


def test_a_timm_name_as_backbone_says_it_is_a_random_init(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.warns(RandomInitWarning) as warned:
        spec = resolve_backbone("resnet18")
    assert not spec.state
    assert str(warned[0].message) == (
        f"'resnet18' is no file or folder here ({tmp_path}): evaluating a randomly initialised resnet18 (timm's "
        "architecture of that name), the baseline a trained backbone should beat. If you meant a path, check it")


@pytest.mark.process
def test_bam_knn_on_an_export_with_a_damaged_config_is_one_line(checkpoint, tmp_path):
    output = export_backbone(checkpoint, tmp_path / "export")
    (output / "config.json").write_text("{not json")
    knn = run_bam(["knn", "--backbone", str(output), *synthetic_args(train_size=16, val_size=8),
                   "--accelerator", "cpu", "--output_dir", str(tmp_path / "knn")])
    assert knn.returncode == 1
    last = knn.stdout.strip().splitlines()[-1]
    assert last.startswith(f"bam knn: {str(output / 'config.json')!r} is not valid JSON")
    assert "Traceback" not in knn.stdout
