"""Inputs `bam pretrain` cannot run with end it at start-up with one line saying what was wrong and
what to do, never a traceback or a misleading failure later (issue 27 item 9): a run folder that
cannot be written, a global batch of one image, a normalisation std with a zero in it."""
from __future__ import annotations

from pathlib import Path

import pytest

from cli_runs import run_bam
from safety_runs import TINY_PRETRAIN

# a folder nobody may create, root included (sysfs refuses it; a read-only mount, where it is one)
UNWRITABLE = Path("/sys/kernel/bam-run")


def refusal(tmp_path: Path, *options: str, run_dir: Path | None = None) -> str:
    """The last line of a tiny `bam pretrain` with `options` that must end at start-up, with status 1."""
    done = run_bam(["pretrain", *TINY_PRETRAIN, "--data.fraction=0.02", "--trainer.max_epochs=1",
                    f"--trainer.default_root_dir={run_dir or tmp_path / 'run'}", *options], separate_stderr=True)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "Restoring states" not in done.stdout and "train/loss" not in done.stdout
    return done.stderr.splitlines()[-1]


def cannot_create(folder: Path) -> str:
    """Why `folder` cannot be created here (its strerror); skips the test where it can be."""
    try:
        folder.mkdir()
    except OSError as error:
        return error.strerror
    folder.rmdir()
    pytest.skip(f"{folder} can be created on this machine")


@pytest.mark.process
def test_a_run_folder_that_cannot_be_written_is_named_with_what_to_do(tmp_path):
    reason = cannot_create(UNWRITABLE)
    assert refusal(tmp_path, run_dir=UNWRITABLE) == (
        f"bam pretrain: cannot write to the run folder '{UNWRITABLE}' ({reason}): choose a folder you can write to "
        "with --trainer.default_root_dir (to resume a run kept where you cannot write, copy its folder there first "
        "and resume the copy)"
    )


@pytest.mark.process
def test_a_global_batch_of_one_image_is_refused_naming_why_bam_needs_two(tmp_path):
    assert refusal(tmp_path, "--data.batch_size=1") == (
        "bam pretrain: data.init_args.batch_size=1 x 1 process(es) makes a global batch of 1 image(s): BAM's "
        "objective matches each image's crops to the other images of the batch (positive masking leaves out the "
        "image's own crops), and a batch of one image has no other; set a larger --data.init_args.batch_size"
    )


@pytest.mark.process
def test_a_zero_in_the_normalisation_std_is_refused_before_the_loss_turns_nan(tmp_path):
    assert refusal(tmp_path, "--data.crops.std=[0.3, 0.0, 0.3]") == (
        "bam pretrain: crops std [0.3, 0.0, 0.3] has an entry that is not a positive number: images are divided by "
        "the std, so that channel would become infinite or NaN. Give each channel's standard deviation over the "
        "images (e.g. ImageNet's [0.229, 0.224, 0.225])"
    )
