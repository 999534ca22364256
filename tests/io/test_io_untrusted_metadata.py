"""A checkpoint's or an export's metadata builds the network and nothing else: timm's loader options
(downloads, files to load, a configuration from elsewhere) recorded there are refused, from the
Python API and from every command that reads a backbone."""
from __future__ import annotations

import configparser
import inspect
import json
import os
import re
from pathlib import Path

import pytest
import timm
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from bam.io import export_backbone, load_backbone
from bam.io.state import UntrustedOptionError
from cli_runs import run_bam
from eval_fixtures import CNN, synthetic_args, write_checkpoint
from repo_paths import REPO

# the first timm release whose checkpoint loaders default to weights-only loading (1.0.25 still
# unpickled `checkpoint_path` and hub files without restriction)
FIRST_WEIGHTS_ONLY_TIMM = Version("1.0.26")


class RunsShellCommand:
    """Unpickling this creates `marker` with a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def crafted_pickle(directory: Path) -> tuple[Path, Path]:
    """(a pickle whose loading runs a shell command, the file that command would create)."""
    marker = directory / "code_ran"
    path = directory / "weights.pth"
    torch.save({"state_dict": RunsShellCommand(marker)}, path)
    return path, marker


def loader_cases(pickle: Path) -> dict[str, dict]:
    """Loader options as an attacker writes them into metadata (name -> the options)."""
    return {
        "checkpoint_path": {"checkpoint_path": str(pickle)},
        "pretrained+overlay file": {"pretrained": True, "pretrained_cfg_overlay": {"file": str(pickle)}},
        "overlay url": {"pretrained": True, "pretrained_cfg_overlay": {"url": "http://127.0.0.1:9/w.pth"}},
        "pretrained_cfg hub": {"pretrained_cfg": {"hf_hub_id": "someone/weights"}},
        "cache_dir": {"cache_dir": str(pickle.parent)},
        "a model's own loader option": {"pretrained_backbone_path": str(pickle)},
    }


def refusal(where: str, options: dict) -> str:
    names = ", ".join(sorted(options))
    return (f"{where} asks timm for {names}, which download or load files (and loading one can run code): refused. "
            "bam builds a model from metadata with network options only and takes its weights from the file "
            "itself; remove these options from it")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), *CNN)


def export_with(checkpoint: Path, directory: Path, architecture: str | None = None, **model_args) -> Path:
    """An export of `checkpoint` whose config.json got `model_args` added (and another `architecture`)."""
    export = export_backbone(checkpoint, directory)
    config = json.loads((export / "config.json").read_text())
    config["model_args"].update(model_args)
    config["architecture"] = architecture or config["architecture"]
    (export / "config.json").write_text(json.dumps(config))
    return export


def crafted_checkpoint(checkpoint: Path, path: Path, **backbone_kwargs) -> Path:
    contents = torch.load(checkpoint, weights_only=True)
    contents["hyper_parameters"]["backbone_kwargs"].update(backbone_kwargs)
    torch.save(contents, path)
    return path


@pytest.mark.parametrize("case", sorted(loader_cases(Path("x"))))
def test_loader_options_in_an_exports_config_are_refused(checkpoint, tmp_path, case):
    pickle, marker = crafted_pickle(tmp_path)
    options = loader_cases(pickle)[case]
    export = export_with(checkpoint, tmp_path / "export", **options)
    with pytest.raises(UntrustedOptionError) as error:
        load_backbone(export)
    assert str(error.value) == refusal(f"{str(export / 'config.json')!r} (model_args)", options)
    assert not marker.exists()


@pytest.mark.parametrize("case", sorted(loader_cases(Path("x"))))
def test_loader_options_in_a_checkpoints_backbone_kwargs_are_refused_before_exporting(checkpoint, tmp_path, case):
    pickle, marker = crafted_pickle(tmp_path)
    options = loader_cases(pickle)[case]
    crafted = crafted_checkpoint(checkpoint, tmp_path / "crafted.ckpt", **options)
    with pytest.raises(UntrustedOptionError) as error:
        export_backbone(crafted, tmp_path / "export")
    assert str(error.value) == refusal("the checkpoint's hyper_parameters['backbone_kwargs']", options)
    assert not marker.exists() and not (tmp_path / "export").exists()


@pytest.mark.parametrize("source", ["hf-hub:someone/model", "local-dir:/somewhere/else"])
def test_a_model_source_as_the_architecture_is_refused(checkpoint, tmp_path, source):
    export = export_with(checkpoint, tmp_path / "export", architecture=source)
    with pytest.raises(UntrustedOptionError, match=re.escape(f"names the architecture {source!r}, a model source")):
        load_backbone(export)


def test_network_options_still_shape_the_model(checkpoint, tmp_path):
    export = export_with(checkpoint, tmp_path / "export", pool_size=1)
    assert load_backbone(export).pool.output_size == 1
    wide = load_backbone(export_with(checkpoint, tmp_path / "wide", pool_size=2))
    assert wide.num_features == 4 * 32  # 4 x 8 channels, on a 2 x 2 grid


def test_the_timm_bam_requires_loads_checkpoints_weights_only():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    requirements = [Requirement(line) for line in setup["options"]["install_requires"].split("\n") if line.strip()]
    timm_requirement = next(requirement for requirement in requirements if requirement.name == "timm")
    lowest_allowed = min(Version(spec.version) for spec in timm_requirement.specifier if spec.operator == ">=")
    assert lowest_allowed >= FIRST_WEIGHTS_ONLY_TIMM
    assert inspect.signature(timm.models.load_checkpoint).parameters["weights_only"].default is True


def knn_args(backbone: Path, output: Path) -> list[str]:
    return ["knn", "--backbone", str(backbone), *synthetic_args(train_size=16, val_size=8),
            "--accelerator", "cpu", "--output_dir", str(output)]


@pytest.mark.process
def test_bam_knn_and_bam_export_refuse_metadata_that_loads_a_file(checkpoint, tmp_path):
    pickle, marker = crafted_pickle(tmp_path)
    export = export_with(checkpoint, tmp_path / "export", checkpoint_path=str(pickle))
    knn = run_bam(knn_args(export, tmp_path / "knn"))
    assert knn.returncode == 1
    assert knn.stdout.strip().splitlines()[-1] == "bam knn: " + refusal(
        f"{str(export / 'config.json')!r} (model_args)", {"checkpoint_path": 1})
    options = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(pickle)}}
    crafted = crafted_checkpoint(checkpoint, tmp_path / "crafted.ckpt", **options)
    exported = run_bam(["export", str(crafted), "--output", str(tmp_path / "out")])
    assert exported.returncode == 1
    assert exported.stdout.strip() == "bam export: error: " + refusal(
        "the checkpoint's hyper_parameters['backbone_kwargs']", options)
    assert not marker.exists() and not (tmp_path / "out").exists()
