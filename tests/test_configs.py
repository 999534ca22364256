"""Every shipped pretraining config parses, names only known keys, and builds its model."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from bam.cli import main as bam_main
from cli_runs import run_bam
from repo_paths import REPO

CONFIGS = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))


def model_class_path(config: Path) -> str:
    return yaml.safe_load(config.read_text())["model"]["class_path"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
def test_config_parses(config, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:  # --print_config prints and exits 0
            bam_main(["pretrain", "--config", str(config), "--data.init_args.root", str(tmp_path), "--print_config"]
                 if "ImageFolder" in config.read_text() else ["pretrain", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == model_class_path(config)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
def test_config_builds_its_model(config):
    settings = yaml.safe_load(config.read_text())
    init_args, crops = settings["model"]["init_args"], settings["data"]["init_args"]["crops"]
    assert "num_local_crops" not in init_args  # one setting, under data.crops
    counts = {name: crops[name] for name in ("num_global_crops", "num_local_crops")}
    module, name = model_class_path(config).rsplit(".", 1)
    model = getattr(importlib.import_module(module), name)(**init_args, **counts)
    assert model.loss_fn.num_crops == crops["num_global_crops"] + crops["num_local_crops"]


def parsed_pretraining(args: list[str]):
    from bam.pretrain import pretrain_cli

    return pretrain_cli([*args, "--trainer.logger", "false"], run=False)


def test_crop_counts_are_one_setting_linked_from_the_data(capsys):
    demo = str(CONFIGS[0].parent / "demo.yaml")
    cli = parsed_pretraining(["--config", demo, "--data.init_args.crops.num_local_crops", "2"])
    assert cli.datamodule.crops.num_views == cli.model.loss_fn.num_crops == 4
    with pytest.raises(SystemExit):
        parsed_pretraining(["--config", demo, "--model.init_args.num_local_crops", "3"])
    error = capsys.readouterr().err
    assert "model.init_args.num_local_crops=3 disagrees with data.init_args.crops.num_local_crops=4" in error


def test_misspelt_key_is_named(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text((CONFIGS[0].parent / "demo.yaml").read_text().replace("temperature:", "temprature:"))
    with pytest.raises(SystemExit):
        bam_main(["pretrain", "--config", str(config), "--print_config"])
    assert "temprature" in capsys.readouterr().err


def test_recipes_follow_the_authors_numbers():
    vit_s = yaml.safe_load((CONFIGS[0].parent / "vit_small_patch16.yaml").read_text())
    model = vit_s["model"]["init_args"]
    assert model["backbone"] == "bam_vit_small_patch16_224"  # 12 heads
    objective = model["objective"]
    assert (objective["top_k"], objective["num_target_crops"], objective["sinkhorn_iterations"]) == (128, 2, 3)
    projector = model["projector"]
    assert (projector["hidden_dim"], projector["out_dim"], projector["batch_norm"]) == (4096, 4096, False)
    assert (model["weight_decay"], model["weight_decay_final"], model["warmup_epochs"]) == (0.04, 0.4, 40)
    assert vit_s["trainer"]["gradient_clip_val"] == 0.3
    assert vit_s["trainer"]["devices"] * vit_s["trainer"]["num_nodes"] * vit_s["data"]["init_args"]["batch_size"] == 4096


@pytest.mark.process
def test_flat_projector_keys_written_before_they_moved_are_read_into_the_projector_group(tmp_path):
    """`bam pretrain` as a user runs it: the projector's flat keys of before (an old config file,
    the command line) are read at their new place, `model.init_args.projector`, with one note each."""
    old_config = tmp_path / "old.yaml"
    old_config.write_text("model:\n  init_args:\n    proj_out_dim: 32\n    proj_init: trunc_normal\n")
    finished = run_bam(["pretrain", "--config", "swav_demo", "--config", str(old_config),
                        "--model.init_args.proj_hidden_dim", "64", "--print_config"], separate_stderr=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    notes = [line for line in finished.stderr.splitlines() if line.startswith("bam pretrain: note: ")]
    assert notes == [
        f"bam pretrain: note: {old_config}: `model.init_args.proj_out_dim` is now "
        "`model.init_args.projector.out_dim`; read as model.init_args.projector.out_dim=32",
        f"bam pretrain: note: {old_config}: `model.init_args.proj_init` is now "
        "`model.init_args.projector.init`; read as model.init_args.projector.init=trunc_normal",
        "bam pretrain: note: the command line: `model.init_args.proj_hidden_dim` is now "
        "`model.init_args.projector.hidden_dim`; read as model.init_args.projector.hidden_dim=64",
    ]
    projector = yaml.safe_load(finished.stdout)["model"]["init_args"]["projector"]
    # the old keys' values over swav_demo.yaml's projector (the BAM demo's: 3 layers, GELU, batch norm)
    assert projector == dict(hidden_dim=64, out_dim=32, num_layers=3, activation="gelu", batch_norm=True,
                             last_batch_norm=False, bias=True, init="trunc_normal")


@pytest.mark.process
def test_objective_keys_written_before_they_moved_are_named_with_their_new_home(tmp_path):
    """`bam pretrain` as a user runs it: a flat objective key (command line or an old config file)
    is one line naming the key and `model.init_args.objective`, not jsonargparse's usage page."""
    old_config = tmp_path / "old.yaml"
    old_config.write_text("model:\n  init_args:\n    top_k: 4\n")
    finished = run_bam(["pretrain", "--config", "demo", "--config", str(old_config), "--model.init_args.reg=0.03"])
    assert finished.returncode != 0
    last_line = finished.stdout.strip().splitlines()[-1]
    assert last_line.startswith("bam pretrain: --model.init_args.reg, ") and "old.yaml: model.init_args.top_k" in last_line
    assert "now live under model.init_args.objective" in last_line


def test_a_run_config_written_before_the_file_report_rename_still_loads(tmp_path, capsys):
    """A run's saved config.yaml from before has the callback group `data_account`: it is read as
    `file_report`, with one line naming the move (config file and command line alike)."""
    old_config = tmp_path / "config.yaml"
    old_config.write_text("data_account:\n  enabled: false\n")
    demo = str(CONFIGS[0].parent / "demo.yaml")
    cli = parsed_pretraining(["--config", demo, "--config", str(old_config)])
    assert cli.config.file_report.enabled is False and "data_account" not in cli.config
    cli = parsed_pretraining(["--config", demo, "--data_account.enabled", "false"])
    assert cli.config.file_report.enabled is False
    assert capsys.readouterr().err.splitlines()[:2] == [
        f"bam pretrain: note: {old_config}: `data_account.enabled` is now `file_report.enabled`; read as file_report.enabled=False",
        "bam pretrain: note: the command line: `data_account.enabled` is now `file_report.enabled`; read as file_report.enabled=false",
    ]
