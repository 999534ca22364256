"""The resume hint printed after a settings change can be pasted back (issue 27 item 9): values are
written as JSON and shell-quoted, never as a Python repr, every differing setting is named, and a
setting the CLI derives from another (the method's crop counts, from `data.crops`) by its source."""
from __future__ import annotations

import json
import shlex
import shutil

import pytest
from jsonargparse import Namespace

from bam.training.run_cli import HINT_PREFIX, _changes_message, changed_settings
from cli_runs import run_bam
from safety_runs import TINY_PRETRAIN


def pasted_options(output: str) -> list[str]:
    """The options of the hint in `output`, as a shell gives them to the program when pasted."""
    hint = next(line for line in output.splitlines() if line.startswith(HINT_PREFIX))
    return shlex.split(hint[len(HINT_PREFIX):])


def test_the_hint_pastes_back_dicts_lists_and_strings():
    stored = {"_class_path": "bam.methods.BAMModule", "backbone_kwargs": {"width": 8, "pool_size": 2},
              "backbone": "bam_cnn4", "lr": 0.001}
    current = Namespace(class_path="bam.methods.BAMModule", init_args=Namespace(
        backbone_kwargs=Namespace(width=16, pool_size=2), backbone="resnet18", lr=0.001))
    options = dict(argument[2:].split("=", 1) for argument in
                   pasted_options(_changes_message("last", changed_settings(stored, current))))
    assert json.loads(options["model.init_args.backbone_kwargs"]) == {"width": 8, "pool_size": 2}
    assert options["model.init_args.backbone"] == "bam_cnn4"


@pytest.mark.process
def test_the_hint_after_a_crop_count_change_pastes_back_through_the_crop_link_and_resumes(tmp_path,
                                                                                         four_step_run):
    # the first run is the session's shared four-step run (tests/training/conftest.py), copied: the
    # same command resumed with two settings changed, then with the hint pasted
    shutil.copytree(four_step_run, tmp_path / "run")
    # no k-NN baselines: the resumed runs train no step, and would evaluate nothing else on all the digits
    run = ["pretrain", *TINY_PRETRAIN, "--trainer.max_steps=4", "--knn.compare_baselines=false",
           f"--trainer.default_root_dir={tmp_path / 'run'}"]
    changed = [*run, "--ckpt_path=last", "--data.crops.num_local_crops=2", "--model.lr=2e-3"]
    second = run_bam(changed)
    assert second.returncode == 0, second.stdout[-3000:]
    pasted = pasted_options(second.stdout)
    assert sorted(pasted) == ["--data.init_args.crops.num_local_crops=1", "--model.init_args.lr=0.001"]

    back = run_bam([*changed, *pasted])

    assert back.returncode == 0, back.stdout[-3000:]
    assert "differ from the checkpoint's" not in back.stdout  # every setting is the checkpoint's again
    assert "Restoring states from the checkpoint path" in back.stdout
