"""Bit rot (issue 27 item 6): a checkpoint whose bytes changed after it was written is complete
(its zip directory is intact) but wrong. Every load checks the archive's CRCs: `--ckpt_path last`
passes a damaged file over for the newest sound one and says so, and exporting or loading a damaged
file stops with one line instead of handing out NaN weights."""
from __future__ import annotations

import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from bam.io import NotACheckpointError, load_checkpoint_file
from bam.training.run_cli import find_last_checkpoint
from safety_runs import pretrain, run_bam

LOCAL_HEADER_SIZE = 30  # a zip entry's fixed header, before its name and extra field


def largest_tensor_entry(path: Path) -> zipfile.ZipInfo:
    with zipfile.ZipFile(path) as archive:
        return max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda info: info.file_size)


def rot(path: Path, count: int = 64) -> str:
    """Overwrite `count` bytes in the middle of the largest tensor's data with 0xFF (NaN in float32)
    in place, as a failing disk would; the name of the damaged entry."""
    entry = largest_tensor_entry(path)
    with path.open("r+b") as file:
        file.seek(entry.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", file.read(4))
        file.seek(entry.header_offset + LOCAL_HEADER_SIZE + name_length + extra_length + entry.file_size // 2)
        file.write(b"\xff" * count)
    return entry.filename


def damage_message(path: Path, entry: str) -> str:
    return (f"{str(path)!r} is damaged: its entry {entry!r} does not match the checksum written with it (the file "
            "changed on disk or in a copy after it was saved); use another checkpoint, e.g. an earlier one of the run")


# every test here reads checkpoints of a real `bam pretrain` run (the module's fixture starts it)
pytestmark = pytest.mark.process


@pytest.fixture
def checkpoints(four_step_run, tmp_path) -> Path:
    directory = tmp_path / "run" / "checkpoints"
    shutil.copytree(four_step_run / "checkpoints", directory)
    return directory


def test_a_rotten_checkpoint_is_refused_naming_the_entry(checkpoints):
    path = checkpoints / "epoch=0-step=4.ckpt"
    entry = rot(path)
    with pytest.raises(NotACheckpointError) as error:
        load_checkpoint_file(path)
    assert str(error.value) == damage_message(path, entry)
    # control: torch itself loads the rotten file, with NaN where the bytes were flipped
    state = torch.load(path, weights_only=True)["state_dict"]
    assert any(not tensor.isfinite().all() for tensor in state.values() if tensor.is_floating_point())


def test_sound_checkpoints_load_as_written(checkpoints):
    for path in checkpoints.glob("*.ckpt"):
        assert load_checkpoint_file(path)["global_step"] in (2, 4)


def test_ckpt_path_last_passes_a_rotten_last_over_for_the_newest_sound_one(checkpoints, capsys):
    last = checkpoints / "last.ckpt"
    entry = rot(last)
    assert find_last_checkpoint(checkpoints) == str(checkpoints / "epoch=0-step=4.ckpt")
    assert capsys.readouterr().err == (
        f"bam: --ckpt_path last: passing over {last}: {damage_message(last, entry)}\n"
        f"bam: --ckpt_path last: resuming from {checkpoints / 'epoch=0-step=4.ckpt'}, the newest sound checkpoint "
        f"in {checkpoints}\n"
    )


def test_resume_and_export_meet_rot_through_the_console_script(checkpoints, tmp_path):
    last, step4 = checkpoints / "last.ckpt", checkpoints / "epoch=0-step=4.ckpt"
    last_entry, step4_entry = rot(last), rot(step4)
    export = run_bam(["export", str(step4), "--output", str(tmp_path / "export")], separate_stderr=True)
    assert (export.returncode, export.stdout, export.stderr) == (
        1, "", f"bam export: error: {damage_message(step4, step4_entry)}\n")
    assert not (tmp_path / "export").exists()

    status, _, err = pretrain(checkpoints.parent, "--trainer.max_steps=6", "--ckpt_path", "last")
    assert status == 0, err[-3000:]
    step2 = checkpoints / "epoch=0-step=2.ckpt"
    assert f"bam: --ckpt_path last: passing over {last}: {damage_message(last, last_entry)}\n" in err
    assert f"bam: --ckpt_path last: passing over {step4}: {damage_message(step4, step4_entry)}\n" in err
    assert f"bam: --ckpt_path last: resuming from {step2}, the newest sound checkpoint in {checkpoints}\n" in err
    # what the next `--ckpt_path last` takes is the resumed run's final state (Lightning writes it
    # as last-v1.ckpt beside the damaged last.ckpt that another run left)
    resumed = load_checkpoint_file(find_last_checkpoint(checkpoints))
    assert resumed["global_step"] == 6
    assert all(tensor.isfinite().all() for tensor in resumed["state_dict"].values() if tensor.is_floating_point())
