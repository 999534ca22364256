"""The authors' released files: prefixes, teacher/student, architecture mapping, strict matching."""
from __future__ import annotations

import argparse

import pytest
import timm
import torch

from bam.io import (
    CheckpointFormatError,
    CheckpointMismatchError,
    is_released_checkpoint,
    load_backbone,
    released_spec,
    resolve_released_arch,
    strip_prefix,
    submodule_state,
)
from bam.io.released import RELEASED_ARCHS
from bam.models.backbones import build_backbone
from io_layouts import RELEASED_PREFIXES, released_args, released_checkpoint

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def features(model: torch.nn.Module, images: torch.Tensor = IMAGES) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def test_strip_prefix_removes_the_string_not_a_character_set():
    key = "backbone.bn1.weight"
    assert key.lstrip("backbone.") == "1.weight"  # the pitfall this function exists for
    assert strip_prefix(key, "backbone.") == "bn1.weight"
    assert strip_prefix("head.bn1.weight", "backbone.") is None


def test_submodule_state_skips_wrappers_at_any_level():
    value = torch.zeros(1)
    state = {
        "_orig_mod.teacher.module.backbone._orig_mod.blocks.0.norm1.weight": value,
        "teacher.backbone.cls_token": value,
        "teacher.proj_head.projector.0.weight": value,
        "student.module.backbone.cls_token": value,
    }
    assert sorted(submodule_state(state, ("teacher", "backbone"))) == ["blocks.0.norm1.weight", "cls_token"]


@pytest.fixture(scope="module")
def vit_small_pair():
    """A randomly initialised teacher and student ViT-S/16 (12 heads), as the authors train them."""
    torch.manual_seed(1)
    return build_backbone("bam_vit_small_patch16_224"), build_backbone("bam_vit_small_patch16_224")


@pytest.fixture(scope="module")
def vit_small_file(vit_small_pair, tmp_path_factory):
    teacher, student = vit_small_pair
    path = tmp_path_factory.mktemp("released") / "bam_vits16.pth"
    torch.save(released_checkpoint(student, teacher, released_args("vit_small")), path)
    return path


def test_vit_small_file_loads_the_teacher_with_12_heads(vit_small_pair, vit_small_file):
    teacher, student = vit_small_pair
    loaded = load_backbone(vit_small_file)
    assert not loaded.training
    assert loaded.blocks[0].attn.num_heads == 12
    assert torch.equal(features(loaded), features(teacher))
    assert not torch.equal(features(loaded), features(student))


def test_vit_small_file_loads_the_student_on_request(vit_small_pair, vit_small_file):
    teacher, student = vit_small_pair
    assert torch.equal(features(load_backbone(vit_small_file, encoder="student")), features(student))


def test_timm_six_head_vit_small_would_accept_the_keys_and_compute_something_else(vit_small_pair):
    # why the registry maps vit_small/16 to bam's 12-head model: keys and shapes cannot tell them apart
    teacher, _ = vit_small_pair
    six_heads = build_backbone("vit_small_patch16_224")
    six_heads.load_state_dict(teacher.state_dict(), strict=True)
    assert not torch.allclose(features(six_heads), features(teacher))


@pytest.mark.parametrize("layout", sorted(set(RELEASED_PREFIXES) - {"plain"}))
def test_compiled_and_ddp_prefixes_are_removed(vit_small_pair, layout):
    teacher, student = vit_small_pair
    checkpoint = released_checkpoint(student, teacher, released_args("vit_small"), layout=layout)
    for encoder, writer in (("teacher", teacher), ("student", student)):
        assert torch.equal(features(released_spec(checkpoint, encoder).build()), features(writer))


def test_vit_base_maps_to_timm_vit_base():
    model = build_backbone("vit_base_patch16_224")
    checkpoint = released_checkpoint(model, model, released_args("vit_base"))
    spec = released_spec(checkpoint)
    assert spec.model_name == "vit_base_patch16_224" and spec.encoder == "teacher"
    assert torch.equal(features(spec.build()), features(model))

    with pytest.raises(CheckpointMismatchError) as error:  # the same file read as ViT-S
        released_spec(checkpoint, arch="vit_small").build()
    message = str(error.value)
    small = build_backbone("bam_vit_small_patch16_224").state_dict()
    reshaped = sum(small[key].shape != value.shape for key, value in model.state_dict().items())
    assert "'bam_vit_small_patch16_224'" in message and f"{reshaped} shape mismatch:" in message
    assert "(file (768, 3072), model (384, 1536))" in message and f"(+{reshaped - 8} more)" in message
    assert "missing" not in message and "unexpected" not in message


def test_caformer_maps_to_bam_caformer_keeping_head_norm_and_dropping_the_classifier():
    torch.manual_seed(2)
    with_classifier = timm.create_model("bam_caformer_m36", num_classes=1000).eval()
    checkpoint = released_checkpoint(with_classifier, with_classifier, released_args("caformer_m36"))
    with pytest.warns(UserWarning, match=r"ignoring 6 classifier weights \(head\.fc\."):
        loaded = released_spec(checkpoint).build()
    assert "head.norm.weight" in loaded.state_dict() and "head.fc.fc1.weight" not in loaded.state_dict()
    with torch.no_grad():
        expected = with_classifier.forward_head(with_classifier.forward_features(IMAGES), pre_logits=True)
    assert torch.equal(features(loaded), expected)  # head.norm (the final norm) was loaded


def test_timm_default_caformer_file_fails_listing_the_extra_scale_keys():
    starrelu = build_backbone("caformer_m36")  # StarReLU + scales: not the authors' variant
    checkpoint = released_checkpoint(starrelu, None, released_args("caformer_m36"))
    with pytest.raises(CheckpointMismatchError) as error:
        released_spec(checkpoint).build()
    message = str(error.value)
    extra = len(set(starrelu.state_dict()) - set(build_backbone("bam_caformer_m36").state_dict()))
    assert f"{extra} unexpected (in the file, not in the model)" in message
    assert "'bam_caformer_m36'" in message and ".act.scale" in message and "missing" not in message


def test_wrong_architecture_lists_missing_and_unexpected_keys_with_counts(vit_small_pair):
    teacher, student = vit_small_pair
    checkpoint = released_checkpoint(student, teacher, released_args("vit_small"))
    with pytest.raises(CheckpointMismatchError) as error:
        released_spec(checkpoint, arch="caformer_m36").build()
    message = str(error.value)
    assert "245 missing (in the model, not in the file)" in message
    assert f"{len(teacher.state_dict())} unexpected (in the file, not in the model)" in message
    assert len(message) < 2000  # long lists are truncated


def test_explicit_teacher_without_a_teacher_is_an_error(vit_small_pair):
    _, student = vit_small_pair
    checkpoint = released_checkpoint(student, None, released_args("vit_small"))
    assert released_spec(checkpoint).encoder == "student"
    with pytest.raises(CheckpointFormatError, match=r"no teacher backbone weights \(encoders found: \['student'\]"):
        released_spec(checkpoint, encoder="teacher")


@pytest.mark.parametrize(
    ("arch", "patch_size", "override", "expected"),
    [
        ("vit_small", 16, None, "bam_vit_small_patch16_224"),
        ("vit_base", 16, None, "vit_base_patch16_224"),
        ("caformer_m36", 16, None, "bam_caformer_m36"),
        ("vit_small", 16, "vit_base", "vit_base_patch16_224"),
        ("vit_small", 16, "vit_small_patch16_224", "vit_small_patch16_224"),  # explicit timm name
    ],
)
def test_architecture_resolution(arch, patch_size, override, expected):
    assert resolve_released_arch(released_args(arch, patch_size), override) == expected


@pytest.mark.parametrize(
    "args", [released_args("vit_small", patch_size=8), released_args("vit_small_patch16_224"), None]
)
def test_unknown_or_absent_architecture_is_an_error(args):
    with pytest.raises(CheckpointFormatError, match="known architectures"):
        resolve_released_arch(args)


def test_a_file_without_patch_size_uses_the_authors_default_of_16():
    """Older `args` lack `patch_size`: the authors' default (16) picks the ViT, and is what an error names."""
    assert resolve_released_arch(argparse.Namespace(arch="vit_base")) == "vit_base_patch16_224"
    assert resolve_released_arch({"arch": "vit_small"}) == "bam_vit_small_patch16_224"  # args saved as a dict
    with pytest.raises(CheckpointFormatError) as error:
        resolve_released_arch(argparse.Namespace(arch="vit_tiny"))
    assert str(error.value) == (
        "cannot map the checkpoint's args.arch='vit_tiny' (patch size 16) to a model; known architectures: "
        f"{sorted(RELEASED_ARCHS)}; pass arch= / --arch with one of them or with a timm model name")


def test_an_unknown_arch_argument_is_named_as_the_argument():
    with pytest.raises(CheckpointFormatError) as error:
        resolve_released_arch(released_args("vit_small"), arch="not_a_model")
    assert str(error.value).startswith("cannot map arch='not_a_model' (patch size 16) to a model; known architectures:")


def test_only_the_authors_layout_is_a_released_file():
    """A Lightning checkpoint whose state happens to sit next to a `model` entry is not the authors' file."""
    assert is_released_checkpoint({"model": {}, "args": None})
    assert not is_released_checkpoint({"model": {}, "state_dict": {}})
    assert not is_released_checkpoint({"state_dict": {}})
