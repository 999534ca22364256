"""Reading a classifier out of `bam finetune` checkpoints, on hand-built checkpoint dicts: which
files count as one, the choice between the EMA and the trained model, the architecture recorded
(or, in older files, read from the starting backbone) and the errors users see."""
from __future__ import annotations

import pytest
import torch

from bam.io.finetune_checkpoint import ARCHITECTURE_KEY, finetune_spec, is_finetune_checkpoint
from bam.io.state import BackboneSpec, CheckpointFormatError
from bam.recipe import DataRecipe

RECIPE = DataRecipe(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=28)


def finetune_checkpoint(models=("ema", "model"), architecture: dict | None = None, backbone: str = "bam_cnn4") -> dict:
    state = {f"{name}.weight": torch.full((2,), float(index)) for index, name in enumerate(models)}
    checkpoint = {"state_dict": state, "hyper_parameters": {"num_classes": 10, "layer_decay": 0.75, "backbone": backbone}}
    if architecture is not None:
        checkpoint[ARCHITECTURE_KEY] = architecture
    return checkpoint


def never_read(path: str) -> BackboneSpec:
    raise AssertionError(f"the starting backbone {path} should not be read")


RECORDED = {"model": "bam_cnn4", "model_kwargs": {"width": 48}, "data_recipe": RECIPE.to_dict()}


def test_a_finetune_checkpoint_is_a_lightning_file_of_a_classifier():
    assert is_finetune_checkpoint(finetune_checkpoint(architecture=RECORDED))
    assert is_finetune_checkpoint(finetune_checkpoint())  # older files: layer_decay and num_classes
    assert not is_finetune_checkpoint({"hyper_parameters": {"layer_decay": 0.75, "num_classes": 10}})
    assert not is_finetune_checkpoint({"state_dict": {}, ARCHITECTURE_KEY: RECORDED})
    assert not is_finetune_checkpoint({"state_dict": {}, "hyper_parameters": {"num_classes": 10}})
    assert not is_finetune_checkpoint({"state_dict": {}, "hyper_parameters": {"layer_decay": 0.75}})


def test_the_recorded_architecture_and_recipe_are_used_and_arch_overrides_the_name():
    spec = finetune_spec(finetune_checkpoint(architecture=RECORDED), read_start=never_read)
    assert (spec.model_name, spec.model_kwargs, spec.encoder, spec.num_classes) == ("bam_cnn4", {"width": 48}, "ema", 10)
    assert spec.source_format == "finetune" and spec.recipe == RECIPE
    assert torch.equal(spec.state["weight"], torch.zeros(2))  # the EMA when it was kept
    spec = finetune_spec(finetune_checkpoint(architecture=RECORDED), encoder="model", arch="resnet18", read_start=never_read)
    assert (spec.model_name, spec.encoder) == ("resnet18", "model") and torch.equal(spec.state["weight"], torch.ones(2))
    spec = finetune_spec(finetune_checkpoint(architecture={**RECORDED, "data_recipe": None}), read_start=never_read)
    assert spec.recipe is None


def test_older_files_read_the_architecture_from_their_start_unless_told():
    start = BackboneSpec("bam_cnn4", {"width": 48}, {}, "teacher", "export", recipe=RECIPE)
    checkpoint = finetune_checkpoint(backbone="runs/demo/backbone")
    spec = finetune_spec(checkpoint, read_start=lambda path: start)
    assert (spec.model_name, spec.model_kwargs, spec.recipe) == ("bam_cnn4", {"width": 48}, RECIPE)
    spec = finetune_spec(checkpoint, arch="resnet18", read_start=never_read)
    assert (spec.model_name, spec.model_kwargs, spec.recipe) == ("resnet18", {}, None)
    spec = finetune_spec(finetune_checkpoint(backbone="resnet18"), read_start=never_read)  # a timm name
    assert spec.model_name == "resnet18"


def test_errors_name_what_the_file_holds_and_what_to_pass():
    only_model = finetune_checkpoint(models=("model",), architecture=RECORDED)
    with pytest.raises(CheckpointFormatError) as error:
        finetune_spec(only_model, encoder="student", read_start=never_read)
    assert str(error.value) == "a fine-tuning checkpoint holds ['model']: encoder= must be one of them, not 'student'"
    with pytest.raises(CheckpointFormatError) as error:
        finetune_spec(only_model, encoder="ema", read_start=never_read)
    assert str(error.value) == "the fine-tuning checkpoint has no ema weights (found: ['model'])"
    with pytest.raises(CheckpointFormatError) as error:
        finetune_spec(finetune_checkpoint(models=(), architecture=RECORDED), read_start=never_read)
    assert str(error.value) == "the fine-tuning checkpoint has no model weights (found: [])"

    def gone(path: str) -> BackboneSpec:
        raise FileNotFoundError(path)

    with pytest.raises(CheckpointFormatError) as error:
        finetune_spec(finetune_checkpoint(backbone="runs/old/backbone"), read_start=gone)
    assert str(error.value) == (
        "this fine-tuning checkpoint (written before bam recorded architectures) names its starting backbone "
        "'runs/old/backbone', which no longer exists; pass arch= / --arch with its timm model name")
