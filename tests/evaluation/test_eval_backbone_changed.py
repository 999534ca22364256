"""A linear probe resumed after its backbone changed is refused (issue 27 item 9): the head was
trained on the old backbone's features, so going on would mix two probes in one run's results."""
from __future__ import annotations

import json

import pytest

from bam.cli import main as bam_main
from bam.evaluation.backbone import weights_fingerprint
from bam.io.export import export_backbone, load_backbone
from cli_runs import run_bam
from eval_fixtures import CNN, synthetic_args, trainer_args, write_checkpoint


@pytest.mark.process
def test_a_probe_resumed_on_a_changed_export_stops_naming_both_fingerprints(tmp_path):
    export = export_backbone(write_checkpoint(tmp_path, *CNN, seed=0), tmp_path / "export")
    run_dir = tmp_path / "run"
    probe = ["linear", "--model.backbone", str(export), *synthetic_args()]
    bam_main([*probe, *trainer_args(run_dir, max_epochs=1)])  # the first probe, in this process: one start fewer
    trained_on = weights_fingerprint(load_backbone(export))
    (tmp_path / "other").mkdir()
    export_backbone(write_checkpoint(tmp_path / "other", *CNN, seed=1), export)  # re-exported in place
    now = weights_fingerprint(load_backbone(export))
    assert now != trained_on

    resumed = run_bam([*probe, *trainer_args(run_dir, max_epochs=2), "--ckpt_path", "last"], separate_stderr=True)

    assert resumed.returncode == 1, resumed.stdout + resumed.stderr
    assert resumed.stderr.splitlines()[-1] == (
        f"bam linear: the backbone changed since {run_dir / 'checkpoints' / 'last.ckpt'} was written: its head was "
        f"trained on {export} with weights fingerprint {trained_on}, which now has fingerprint {now}. Resume with the "
        "backbone the run started from, or probe this one in a new run folder (--trainer.default_root_dir NEW_FOLDER)"
    )
    assert "Traceback" not in resumed.stderr
    history = json.loads((run_dir / "results.json").read_text())["history"]
    assert [entry["epoch"] for entry in history] == [1]  # nothing trained on the changed backbone
