"""Exports as timm / Hugging Face Hub folders: timm loads them by itself (for architectures timm has)
or after `import bam` (for bam's own), with the same outputs as `bam.load_backbone`; the data recipe
they carry; fine-tuned classifiers exported with their head."""
from __future__ import annotations

from dataclasses import replace
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file, save_file

from bam.evaluation.data import ClassificationDataModule, RecipeMismatchWarning
from bam.evaluation.finetune import FINETUNE_OPTIMIZER, FineTune
from bam.io import CheckpointFormatError, export_backbone, load_backbone
from bam.models.backbones import build_backbone
from bam.recipe import DataRecipe
from eval_fixtures import synthetic_data, write_checkpoint
from io_layouts import bam_checkpoint, randomise_buffers
from processes import run_process_group
from repo_paths import REPO

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

# runs in a fresh interpreter: load each export with timm, save the outputs for the test to compare
LOAD_WITH_TIMM = """
import sys, torch, timm
from safetensors.torch import load_file, save_file
{prelude}
images = load_file(sys.argv[1])["images"]
torch.set_num_threads(int(sys.argv[3]))  # the test's: the same kernels, so outputs can match exactly
outputs = {{}}
for index, folder in enumerate(sys.argv[4:]):
    model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    with torch.no_grad():
        outputs[str(index)] = model(images).contiguous()
    outputs[f"{{index}}_mean"] = torch.tensor(timm.data.resolve_data_config(model=model)["mean"])
save_file(outputs, sys.argv[2])
"""
# bam made unimportable (as if not installed): an import of it fails
WITHOUT_BAM = """
sys.modules["bam"] = None
try:
    import bam
except ImportError:
    pass
else:
    raise SystemExit("bam was importable")
"""


def load_in_subprocess(folders: list[Path], tmp_path: Path, prelude: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    save_file({"images": IMAGES}, tmp_path / "images.safetensors")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", LOAD_WITH_TIMM.format(prelude=prelude), str(tmp_path / "images.safetensors"),
               str(tmp_path / "outputs.safetensors"), str(torch.get_num_threads()), *map(str, folders)]
    finished = run_process_group(command, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    assert finished.returncode == 0, finished.stdout
    outputs = load_file(tmp_path / "outputs.safetensors")
    return [(outputs[str(index)], outputs[f"{index}_mean"]) for index in range(len(folders))]


def features(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IMAGES)


def export_of(tmp_path: Path, name: str, kwargs: dict, recipe: dict | None = None) -> Path:
    torch.manual_seed(0)
    teacher, student = (randomise_buffers(build_backbone(name, **kwargs)) for _ in range(2))
    checkpoint = bam_checkpoint(student, teacher, {"backbone": name, "backbone_kwargs": kwargs})
    path = tmp_path / f"{name}.ckpt"
    torch.save({**checkpoint, **({"data_recipe": recipe} if recipe else {})}, path)
    return export_backbone(path, tmp_path / name)


MNIST = {"mean": [0.1307] * 3, "std": [0.3081] * 3, "input_size": 28, "crop_pct": 1.0, "interpolation": "bicubic"}


@pytest.mark.process
def test_timm_alone_loads_the_12_head_vit_small_and_timm_models(tmp_path):
    folders = [
        export_of(tmp_path, "bam_vit_small_patch16_224", {}, MNIST),
        export_of(tmp_path, "resnet18", {}),
    ]
    config = json.loads((folders[0] / "config.json").read_text())
    assert (config["architecture"], config["model_args"]["num_heads"]) == ("vit_small_patch16_224", 12)
    loaded = load_in_subprocess(folders, tmp_path, prelude=WITHOUT_BAM)
    for folder, (output, mean) in zip(folders, loaded):
        assert torch.equal(output, features(load_backbone(folder))), folder
    assert loaded[0][1].tolist() == pytest.approx(MNIST["mean"])  # timm reads the recipe
    assert loaded[1][1].tolist() == pytest.approx([0.485, 0.456, 0.406])  # none recorded: ImageNet's


@pytest.mark.process
def test_import_bam_is_enough_for_bams_own_architectures(tmp_path):
    folders = [export_of(tmp_path, "bam_cnn4", {"width": 8, "pool_size": 2}, MNIST), export_of(tmp_path, "bam_caformer_m36", {})]
    loaded = load_in_subprocess(folders, tmp_path, prelude="import bam")
    for folder, (output, _) in zip(folders, loaded):
        assert torch.equal(output, features(load_backbone(folder))), folder
        assert output.abs().sum() > 0
    with pytest.raises(RuntimeError, match="local-dir|No pretrained weights"):  # no hidden download source
        __import__("timm").create_model("bam_cnn4", pretrained=True)


def test_exports_of_bam_0_1_are_still_read(tmp_path):
    export = export_of(tmp_path, "bam_cnn4", {"width": 8})
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (export / "model.safetensors").rename(legacy / "backbone.safetensors")
    (legacy / "bam_backbone.json").write_text(json.dumps({
        "format": "bam-backbone", "format_version": 1, "model": "bam_cnn4", "model_kwargs": {"width": 8},
        "feature_dim": 32, "input_size": [3, 28, 28], "mean": MNIST["mean"], "std": MNIST["std"],
        "encoder": "teacher", "source": "x.ckpt", "source_format": "bam", "bam_version": "0.1.0",
    }))
    expected = features(build_backbone("bam_cnn4", width=8).eval())  # differs from the trained weights
    loaded = load_backbone(legacy)
    assert not torch.equal(features(loaded), expected)
    from bam.evaluation.backbone import resolve_backbone

    spec = resolve_backbone(str(legacy / "bam_backbone.json"))
    assert spec.recipe == DataRecipe(MNIST["mean"], MNIST["std"], 28)
    assert (spec.encoder, spec.source_format) == ("teacher", "bam")
    assert torch.equal(features(spec.build()), features(loaded))

    metadata = legacy / "bam_backbone.json"
    metadata.write_text(metadata.read_text().replace('"bam-backbone"', '"other"'))
    message = f"{str(metadata)!r} is not a bam backbone export (its \"format\" is not \"bam-backbone\")"
    with pytest.raises(CheckpointFormatError, match=f"^{re.escape(message)}$"):
        load_backbone(legacy)


def test_evaluation_data_takes_the_recipe_and_warns_on_explicit_differences():
    recipe = DataRecipe(**MNIST)
    data = ClassificationDataModule(image_size=None)
    data.apply_recipe(recipe, "runs/demo/backbone")
    assert (data.image_size, data.resize_size, data.mean, data.std) == (28, 28, recipe.mean, recipe.std)

    explicit = ClassificationDataModule(mean=(0.5, 0.5, 0.5), std=recipe.std)
    with pytest.warns(RecipeMismatchWarning) as caught:
        explicit.apply_recipe(recipe, "runs/demo/backbone")
    message = str(caught[0].message)
    assert len(caught) == 1 and "data.mean=[0.5, 0.5, 0.5]" in message and "[0.1307, 0.1307, 0.1307]" in message
    assert "runs/demo/backbone" in message and explicit.mean == (0.5, 0.5, 0.5)

    untouched = ClassificationDataModule()  # no recipe recorded: ImageNet's, 256 -> 224
    assert (untouched.image_size, untouched.resize_size, untouched.interpolation) == (224, 256, "bicubic")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A FineTune with EMA trained a few steps by Lightning and saved as its checkpoint."""
    directory = tmp_path_factory.mktemp("finetune")
    backbone = write_checkpoint(directory, "bam_cnn4", {"width": 8})
    module = FineTune(str(backbone), num_classes=4, drop_path_rate=0, layer_decay=None, mixup=0, cutmix=0,
                      ema=True, ema_decay=0.5,
                      optimizer=replace(FINETUNE_OPTIMIZER, warmup_epochs=0, lr=0.05))
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=directory,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, synthetic_data(batch_size=8))
    trainer.save_checkpoint(directory / "finetuned.ckpt")
    return module, directory / "finetuned.ckpt"


@pytest.mark.parametrize("encoder", ["ema", "model"])
def test_finetuned_checkpoints_export_with_their_head(finetuned, encoder, tmp_path):
    module, checkpoint = finetuned
    export = export_backbone(checkpoint, tmp_path / encoder, encoder=encoder)
    expected = module.ema.module if encoder == "ema" else module.model
    with torch.no_grad():
        logits = expected.eval()(IMAGES)
    assert logits.shape == (2, 4)
    assert torch.equal(features(load_backbone(export)), logits)
    config = json.loads((export / "config.json").read_text())
    assert config["model_args"]["num_classes"] == 4 and config["bam"]["encoder"] == encoder
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]  # the fine-tuning data's preprocessing
    assert not torch.equal(module.ema.module.head.weight, module.model.head.weight)  # two different models


def test_finetuned_export_defaults_to_the_ema(finetuned, tmp_path):
    module, checkpoint = finetuned
    export = export_backbone(checkpoint, tmp_path)
    with torch.no_grad():
        assert torch.equal(features(load_backbone(export)), module.ema.module.eval()(IMAGES))


def test_finetuned_checkpoints_written_before_the_architecture_was_recorded(finetuned, tmp_path, capsys):
    module, checkpoint = finetuned
    old = torch.load(checkpoint, map_location="cpu", weights_only=False)
    del old["bam_architecture"]  # as bam 0.1 wrote them: the architecture only through the starting backbone
    torch.save(old, tmp_path / "old.ckpt")
    from bam.io import export_cli

    export_cli.main([str(tmp_path / "old.ckpt"), "--output", str(tmp_path / "export"), "--encoder", "model"])
    assert "wrote the fine-tuned model (bam_cnn4, 32-d features, 4 classes)" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(features(load_backbone(tmp_path / "export")), module.model.eval()(IMAGES))
