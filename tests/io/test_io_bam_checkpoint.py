"""Reading a backbone out of bam's own (Lightning) checkpoints: which files count as one, the
`arch` override and the error for hyper-parameters that name no backbone."""
from __future__ import annotations

import pytest
import torch

from bam.io.bam_checkpoint import bam_checkpoint_spec, is_bam_checkpoint
from bam.io.state import CheckpointFormatError


def lightning_checkpoint(**hparams) -> dict:
    state = {"teacher.backbone.weight": torch.ones(2), "student.backbone.weight": torch.zeros(2)}
    return {"state_dict": state, "hyper_parameters": hparams}


def test_a_bam_checkpoint_has_both_weights_and_hyper_parameters():
    assert is_bam_checkpoint(lightning_checkpoint(backbone="bam_cnn4"))
    assert not is_bam_checkpoint({"state_dict": {}})  # a bare state-dict file
    assert not is_bam_checkpoint({"hyper_parameters": {}})


def test_arch_overrides_the_recorded_backbone():
    checkpoint = lightning_checkpoint(backbone="bam_cnn4", backbone_kwargs={"width": 48})
    assert bam_checkpoint_spec(checkpoint).model_name == "bam_cnn4"
    spec = bam_checkpoint_spec(checkpoint, arch="resnet18")
    assert spec.model_name == "resnet18" and spec.model_kwargs == {"width": 48}
    assert torch.equal(spec.state["weight"], torch.ones(2))  # the teacher by default


def test_hyper_parameters_without_a_backbone_name_the_keys_they_have():
    with pytest.raises(CheckpointFormatError) as error:
        bam_checkpoint_spec(lightning_checkpoint(lr=0.1, projector=dict(out_dim=8)))
    assert str(error.value) == (
        "the checkpoint's hyper_parameters name no backbone (a timm model name under 'backbone'; "
        "found keys ['lr', 'projector']); pass arch= / --arch")
