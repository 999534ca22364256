"""Every evaluation config parses with the stage it belongs to (no unknown or misspelt keys)."""
from __future__ import annotations


import pytest
import yaml

from bam.evaluation import cluster, embed, fewshot, finetune, knn_stage, linear, retrieval, vos
from cli_runs import run_bam
from eval_fixtures import CNN, synthetic_args, write_checkpoint
from recipe_table import config_value
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
    ("finetune", ["--model.head_lr", "--model.optimizer.lr_schedule", "--model.optimizer.lr_decay_epochs",
                  "--model.optimizer.lr_decay_rate"]),
    ("finetune --data.help FolderClassificationData", ["--data.fraction FRACTION", "type: Union[float, str]"]),
])
def test_help_shows_the_published_protocol_options(stage, options, capsys):
    stage, *before = stage.split()
    with pytest.raises(SystemExit):
        STAGES[stage]([*before] if before else ["--help"])
    out = " ".join(capsys.readouterr().out.split())  # the help wraps its lines
    for option in options:
        assert option in out, option


def test_old_flat_optimiser_keys_keep_loading_with_one_line_naming_the_new_key(tmp_path, capsys):
    """A classifier config written before the optimiser settings became one `model.optimizer`
    group still parses to the same settings, each old key announced once with its new name."""
    old = tmp_path / "old_linear.yaml"
    old.write_text(yaml.safe_dump({**yaml.safe_load((CONFIGS / "linear_demo.yaml").read_text()),
                                   "model": {"backbone": "bam_cnn4", "optimizer": "adamw", "lr": 0.3}}))
    with pytest.raises(SystemExit) as exit_info:
        linear.main(["--config", str(old), "--model.warmup_epochs=2", "--print_config"])
    out, err = capsys.readouterr()
    assert exit_info.value.code in (None, 0), err
    assert [line for line in err.splitlines() if "is now" in line] == [
        f"bam linear: note: {old}: `model.optimizer` is now `model.optimizer.name`; read as model.optimizer.name=adamw",
        f"bam linear: note: {old}: `model.lr` is now `model.optimizer.lr`; read as model.optimizer.lr=0.3",
        "bam linear: note: the command line: `model.warmup_epochs` is now `model.optimizer.warmup_epochs`; "
        "read as model.optimizer.warmup_epochs=2",
    ]
    optimizer = yaml.safe_load(out)["model"]["optimizer"]
    assert optimizer == {"name": "adamw", "lr": 0.3, "min_lr": 0.0, "warmup_epochs": 2.0, "weight_decay": 0.0,
                         "momentum": 0.9, "lr_schedule": "cosine", "lr_decay_epochs": [], "lr_decay_rate": 0.1}


def test_fine_tuning_keeps_its_own_optimiser_defaults_under_a_partial_override(capsys):
    """Setting one optimiser field on the command line keeps the stage's other defaults (AdamW, 5
    warm-up epochs, ...), not those of another stage."""
    with pytest.raises(SystemExit):
        finetune.main(["--config", str(CONFIGS / "finetune_demo.yaml"), "--model.optimizer.lr=0.01", "--print_config"])
    optimizer = yaml.safe_load(capsys.readouterr().out)["model"]["optimizer"]
    demo = yaml.safe_load((CONFIGS / "finetune_demo.yaml").read_text())["model"]["optimizer"]
    assert optimizer == {**finetune.FINETUNE_OPTIMIZER.__dict__, "lr_decay_epochs": [], **demo, "lr": 0.01}


# every stage that reads a checkpoint's encoder, with arguments it parses with
ENCODER_STAGES = {**{stage: (main, ["--config", "demo"]) for stage, main in STAGES.items()},
                  "embed": (embed.main, ["--backbone", "bam_cnn4", "--images", "images"])}


@pytest.mark.parametrize("stage", sorted(ENCODER_STAGES))
def test_the_old_which_key_is_read_as_encoder_with_one_line(stage, tmp_path, capsys):
    """`which` was the name of `encoder` (`model.which` of `model.encoder`): configs and command
    lines written with it still choose the student, with one line naming the new key."""
    main, arguments = ENCODER_STAGES[stage]
    group = "model." if stage in ("linear", "finetune") else ""
    old_config = tmp_path / "old.yaml"
    old_config.write_text("model:\n  which: student\n" if group else "which: student\n")
    old_ways = (([f"--{group}which", "student"], "the command line"), (["--config", str(old_config)], old_config))
    for old, where in old_ways:
        with pytest.raises(SystemExit) as exit_info:
            main([*arguments, *old, "--print_config"])
        out, err = capsys.readouterr()
        assert exit_info.value.code in (None, 0), err
        assert [line for line in err.splitlines() if "is now" in line] == [
            f"bam {stage}: note: {where}: `{group}which` is now `{group}encoder`; read as {group}encoder=student"
        ]
        assert config_value(yaml.safe_load(out), f"{group}encoder") == "student"


@pytest.mark.process
def test_an_old_which_on_the_bam_command_line_runs_with_its_note(tmp_path):
    """Through the `bam` command too: the stage runs to its results with the old option, and says so."""
    checkpoint = write_checkpoint(tmp_path, *CNN)
    done = run_bam(["knn", "--backbone", str(checkpoint), "--which", "student", "--accelerator", "cpu",
                    *synthetic_args(train_size=16, val_size=8), "--output_dir", str(tmp_path / "knn")],
                   separate_stderr=True)
    assert done.returncode == 0, done.stderr[-2000:]
    note = "bam knn: note: the command line: `which` is now `encoder`; read as encoder=student"
    assert note in done.stderr.splitlines()
    assert (tmp_path / "knn" / "knn_results.json").is_file()
