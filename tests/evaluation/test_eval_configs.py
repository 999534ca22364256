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


def test_every_stage_has_a_full_size_and_a_demo_config():
    assert {path.stem for path in CONFIGS.glob("*.yaml")} == {
        f"{stage}_{data}" for stage in STAGES for data in (*FULL_SIZE.get(stage, ("imagenet",)), "demo")
    }


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
