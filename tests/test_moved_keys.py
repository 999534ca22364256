"""Old config keys read at their new place (bam.moved_keys): what moves, what is left
alone, and the one line that names each move."""
from __future__ import annotations

import yaml

from bam.moved_keys import MovedKey, is_flag, read_moved_keys

MOVES = (MovedKey("bpa", "bpa.enabled", is_flag), MovedKey("bpa_reg", "bpa.reg"), MovedKey("model.lr", "model.optimizer.lr"))


def test_argv_without_old_keys_is_unchanged_and_silent(tmp_path, capsys):
    config = tmp_path / "new.yaml"
    config.write_text("bpa:\n  reg: 0.2\n")
    argv = ["--config", str(config), "--bpa.reg", "0.3", "--bpa", "{enabled: false}", "--print_config"]
    assert read_moved_keys(argv, MOVES, "bam knn") == argv  # a mapping under `bpa` is the new group
    assert capsys.readouterr().err == ""


def test_old_keys_move_in_both_option_forms_and_in_nested_config_keys(tmp_path, capsys):
    config = tmp_path / "old.yaml"
    config.write_text("model:\n  lr: 0.3\n  backbone: x\nbpa: false\n")
    argv = read_moved_keys([f"--config={config}", "--bpa_reg=0.2", "--bpa", "true"], MOVES, "bam knn")
    assert yaml.safe_load(argv[0].split("=", 1)[1]) == {"model": {"backbone": "x", "optimizer": {"lr": 0.3}},
                                                       "bpa": {"enabled": False}}
    assert argv[1:] == ["--bpa.reg=0.2", "--bpa.enabled", "true"]
    assert capsys.readouterr().err.splitlines() == [
        f"bam knn: note: {config}: `bpa` is now `bpa.enabled`; read as bpa.enabled=False",
        f"bam knn: note: {config}: `model.lr` is now `model.optimizer.lr`; read as model.optimizer.lr=0.3",
        "bam knn: note: the command line: `bpa_reg` is now `bpa.reg`; read as bpa.reg=0.2",
        "bam knn: note: the command line: `bpa` is now `bpa.enabled`; read as bpa.enabled=true",
    ]


def test_a_move_inside_a_group_keeps_its_condition():
    flag = MovedKey("bpa", "bpa.enabled", is_flag).under("model")
    assert (flag.old, flag.new, flag.applies) == ("model.bpa", "model.bpa.enabled", is_flag)
