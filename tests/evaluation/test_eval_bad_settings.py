"""Settings the supervised evaluation stages cannot train with end them at start-up with one line
(issue 27 item 9): a batch of one image under the linear probe's batch-norm head, an odd batch
under fine-tuning's Mixup/CutMix, a zero in the normalisation std."""
from __future__ import annotations

import json

import pytest

from bam.cli import main as bam_main
from bam.io.export import export_backbone, read_backbone
from bam.io.state import CheckpointFormatError
from cli_runs import run_bam
from eval_fixtures import CNN, synthetic_args, trainer_args, write_checkpoint


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> str:
    return str(write_checkpoint(tmp_path_factory.mktemp("bad_settings"), *CNN))


def refusal(stage: str, backbone: str, tmp_path, *options: str, batch_size: int = 16) -> str:
    """The last line of a tiny `bam STAGE` run that must stop before training, with status 1."""
    done = run_bam([stage, "--model.backbone", backbone, *synthetic_args(batch_size=batch_size),
                    *trainer_args(tmp_path / "run"), *options], separate_stderr=True)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    return done.stderr.splitlines()[-1]


@pytest.mark.process
def test_a_probe_with_a_batch_norm_head_refuses_batches_of_one_image(backbone, tmp_path):
    assert refusal("linear", backbone, tmp_path, batch_size=1) == (
        "bam linear: data.init_args.batch_size=1 per process: the head's batch norm (bn_head) normalises each feature "
        "over the images of a batch, which needs 2 or more; set a larger --data.init_args.batch_size (or "
        "--model.bn_head false)"
    )


def test_fine_tuning_with_mixup_refuses_an_odd_batch(backbone, tmp_path):
    """In this process, through the `bam` entry point: the stage's exit message is the line the
    console script prints (the stage's one_line_errors), as the batch-norm head's refusal above
    shows through the console script."""
    no_drop_path = ("--model.drop_path_rate", "0")  # the small CNN has no stochastic depth
    with pytest.raises(SystemExit) as stop:
        bam_main(["finetune", "--model.backbone", backbone, *synthetic_args(batch_size=1),
                  *trainer_args(tmp_path / "run"), *no_drop_path])
    assert str(stop.value.code) == (
        "bam finetune: data.init_args.batch_size=1 per process: Mixup/CutMix pair each image of a batch with another, "
        "which needs an even number; set an even --data.init_args.batch_size (or --model.mixup 0 --model.cutmix 0)"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_zero_in_the_data_std_is_refused(backbone, tmp_path):
    """In this process, through the `bam` entry point, as the mixup refusal above."""
    with pytest.raises(SystemExit) as stop:
        bam_main(["linear", "--model.backbone", backbone, *synthetic_args(), *trainer_args(tmp_path / "run"),
                  "--data.std=[0.3, 0.0, 0.3]"])
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert str(stop.value.code) == (
        "bam linear: data std [0.3, 0.0, 0.3] has an entry that is not a positive number: images are divided by the "
        "std, so that channel would become infinite or NaN. Give each channel's standard deviation over the images "
        "(e.g. ImageNet's [0.229, 0.224, 0.225])"
    )


def test_an_export_whose_recipe_has_a_zero_std_is_refused_as_damaged(backbone, tmp_path):
    export = export_backbone(backbone, tmp_path / "export")
    config_file = export / "config.json"
    config = json.loads(config_file.read_text())
    config["pretrained_cfg"]["std"] = [0.3, 0.0, 0.3]
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError) as refused:
        read_backbone(export)
    assert str(refused.value) == (
        f"{str(config_file)!r} holds a data recipe that cannot be used (the data recipe's std [0.3, 0.0, 0.3] has an "
        "entry that is not a positive number: images are divided by the std, so that channel would become infinite "
        "or NaN. Give each channel's standard deviation over the images (e.g. ImageNet's [0.229, 0.224, 0.225])): "
        "the export is damaged; export the checkpoint again"
    )
