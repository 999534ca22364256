"""The configs ship inside the wheel and are found by name: `bam pretrain --config demo`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bam.cli import main as bam
from bam.shipped_configs import resolve_config, with_config_names
from cli_runs import DEMO
from processes import run_process_group
from repo_paths import REPO

SOURCES = ("bam", "configs", "setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md")


# `bam ARGS` where the ffcv extra is not installed (an import of ffcv fails), as after `pip install .`
NO_FFCV = """
import runpy, sys
sys.modules["ffcv"] = None
"""
RUN_BAM = """
sys.argv = ["bam", *sys.argv[1:]]
runpy.run_module("bam", run_name="__main__")
"""
WITHOUT_FFCV = NO_FFCV + RUN_BAM
PRINT_CONFIGS_DIR = "import bam.shipped_configs as s; print(s.configs_dir(), flush=True)\n"


def run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    finished = run_process_group(command, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    assert finished.returncode == 0, finished.stdout
    return finished.stdout


def test_names_resolve_to_the_shipped_files_and_paths_stay_paths(tmp_path):
    assert resolve_config("pretrain", "demo") == str(REPO / "configs" / "pretrain" / "demo.yaml")
    assert resolve_config("knn", "demo") == resolve_config("knn", "knn_demo") == str(REPO / "configs" / "eval" / "knn_demo.yaml")
    own = tmp_path / "mine.yaml"
    own.write_text("{}")
    assert with_config_names("linear", ["--config", str(own), "--config=demo"]) == [
        "--config", str(own), f"--config={REPO / 'configs' / 'eval' / 'linear_demo.yaml'}",
    ]
    with pytest.raises(SystemExit, match="'dmeo' is neither a file nor a shipped config; shipped configs: .*demo"):
        bam(["pretrain", "--config", "dmeo"])


@pytest.mark.wheel
@pytest.mark.slow
def test_the_wheel_carries_the_configs_and_runs_them_by_name(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
        source, env)
    wheel = next((tmp_path / "dist").glob("bam_ssl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"bam/configs/pretrain/demo.yaml", "bam/configs/eval/knn_demo.yaml"} <= set(names)

    installed = tmp_path / "installed"  # the wheel's contents, as pip would lay them out
    zipfile.ZipFile(wheel).extractall(installed)
    elsewhere = tmp_path / "elsewhere"  # no configs/ folder around
    elsewhere.mkdir()
    env["PYTHONPATH"] = str(installed)
    printed = run([sys.executable, "-m", "bam", "pretrain", "--config", "demo", "--print_config"], elsewhere, env)
    assert "backbone: bam_cnn4" in printed

    # without the ffcv extra: where the configs are found, the command's help (one process: each
    # start costs seconds of imports), and the shrunk demo trained to its checkpoint
    where, help_text = run([sys.executable, "-c", NO_FFCV + PRINT_CONFIGS_DIR + RUN_BAM, "--help"], elsewhere, env).split("\n", 1)
    assert Path(where) == installed / "bam" / "configs"
    assert help_text.startswith("usage: bam ")
    run([sys.executable, "-c", WITHOUT_FFCV, "pretrain", "--config", "demo", *DEMO[2:], "--trainer.max_epochs=1",
         f"--trainer.default_root_dir={tmp_path / 'run'}"], elsewhere, env)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
