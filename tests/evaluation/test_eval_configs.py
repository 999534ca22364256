"""Every evaluation config parses with the stage it belongs to (no unknown or misspelt keys)."""
from __future__ import annotations


import pytest
import yaml

from bam.evaluation import cluster, fewshot, finetune, knn_stage, linear, retrieval, vos
from repo_paths import REPO

CONFIGS = REPO / "configs" / "eval"
DESCRIPTIONS = {  # the supervised stages' help text (the others' comes from their docstring)
    "linear": "Train a linear classifier on the features of a frozen backbone.",
    "finetune": "Fine-tune a pretrained backbone with a new classifier.",
}
STAGES = {"knn": knn_stage.main, "cluster": cluster.main, "fewshot": fewshot.main, "linear": linear.main,
          "finetune": finetune.main, "retrieval": retrieval.main, "vos": vos.main}
# full-size configs of the stages whose data is not ImageNet
FULL_SIZE = {"retrieval": ("cub", "market1501"), "vos": ("davis2017",)}
FROZEN_STAGES = ("knn", "cluster", "fewshot", "retrieval", "vos")  # their configs name `backbone`, not `model`


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.stem)
def test_config_parses(config, capsys):
    stage = STAGES[config.stem.split("_")[0]]
    with pytest.raises(SystemExit) as exit_info:
        stage(["--config", str(config), "--print_config"])
    assert exit_info.value.code in (None, 0), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["backbone" if config.stem.split("_")[0] in FROZEN_STAGES else "model"]


# configs beyond each stage's demo and full-size ones: the published protocols of the table in
# docs/evaluation.md
PROTOCOL_CONFIGS = {"linear_imagenet_vit_small", "finetune_imagenet_semisup_1pct", "finetune_imagenet_semisup_10pct"}


def test_every_stage_has_a_full_size_and_a_demo_config():
    assert {path.stem for path in CONFIGS.glob("*.yaml")} == {
        f"{stage}_{data}" for stage in STAGES for data in (*FULL_SIZE.get(stage, ("imagenet",)), "demo")
    } | PROTOCOL_CONFIGS


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_shipped_config_by_name_is_the_file(stage, capsys):
    printed = []
    for config in ("demo", str(CONFIGS / f"{stage}_demo.yaml")):
        with pytest.raises(SystemExit) as exit_info:
            STAGES[stage](["--config", config, "--print_config"])
        assert exit_info.value.code in (None, 0), capsys.readouterr().err
        printed.append(yaml.safe_load(capsys.readouterr().out))
    by_name, by_path = printed
    assert by_name == by_path and by_name["backbone" if stage in FROZEN_STAGES else "model"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_help_names_the_bam_command(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        STAGES[stage](["--help"])
    assert exit_info.value.code in (None, 0)
    out = capsys.readouterr().out
    assert out.startswith(f"usage: bam {stage} ")
    if stage in DESCRIPTIONS:
        assert f"\n\n{DESCRIPTIONS[stage]}\n\n" in out


@pytest.mark.parametrize("stage, options", [
    ("knn", ["--k K", "--nb_knn", "--bank_fraction", "subset list file"]),
    ("fewshot", ["--novel_classes", "novel classes of a few-shot split", "subset list file"]),
    ("linear", ["--model.feature", "cls_blocks", "--model.bn_head", "--model.bn_eps"]),
    ("finetune", ["--model.head_lr", "--model.lr_schedule", "--model.lr_decay_epochs", "--model.lr_decay_rate"]),
    ("finetune --data.help FolderClassificationData", ["--data.fraction FRACTION", "type: Union[float, str]"]),
])
def test_help_shows_the_published_protocol_options(stage, options, capsys):
    stage, *before = stage.split()
    with pytest.raises(SystemExit):
        STAGES[stage]([*before] if before else ["--help"])
    out = " ".join(capsys.readouterr().out.split())  # the help wraps its lines
    for option in options:
        assert option in out, option
