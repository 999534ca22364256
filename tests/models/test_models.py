"""Backbone registry presets, the demo CNN and the projector."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from bam.models import Projector, ProjectorSettings, build_backbone, feature_dim
from bam.models.encoder import MultiCropEncoder


def test_authors_vit_small_has_12_heads():
    model = build_backbone("bam_vit_small_patch16_224")
    assert {block.attn.num_heads for block in model.blocks} == {12}
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 384)  # local-crop resolution


def test_caformer_preset_has_the_authors_key_set():
    keys = set(build_backbone("bam_caformer_m36").state_dict())
    assert not [key for key in keys if key.endswith((".scale", "act.bias", "act1.bias"))]
    assert keys < set(timm.create_model("caformer_m36", num_classes=0).state_dict())


@pytest.mark.parametrize("pool_size", [1, 2])
def test_demo_cnn_pools_to_a_grid(pool_size):
    model = build_backbone("bam_cnn4", pool_size=pool_size)
    assert feature_dim(model) == 256 * pool_size**2
    assert model(torch.randn(2, 3, 28, 28)).shape == model(torch.randn(2, 3, 14, 14)).shape == (2, 256 * pool_size**2)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ValueError, match="resnet50"):
        build_backbone("resnet5O")


def test_projector_layout():
    projector = Projector(8, ProjectorSettings(hidden_dim=16, out_dim=4, num_layers=3, batch_norm=True, last_batch_norm=True))
    linear = [m for m in projector if isinstance(m, nn.Linear)]
    norms = [m for m in projector if isinstance(m, nn.BatchNorm1d)]
    assert [layer.out_features for layer in linear] == [16, 16, 4]
    assert len(norms) == 3 and norms[-1].affine is False
    with pytest.raises(ValueError, match=r"^unknown projector activation 'swishy'; choose from \['gelu', 'relu', 'silu'\]$"):
        ProjectorSettings(activation="swishy")
    with pytest.raises(ValueError, match=r"^the projector needs at least 1 layer, got num_layers=0$"):
        Projector(8, ProjectorSettings(num_layers=0))


def test_encoder_runs_the_backbone_once_per_resolution():
    calls = []
    backbone = build_backbone("bam_cnn4")
    backbone.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[-1]))
    encoder = MultiCropEncoder(backbone, nn.Identity())
    crops = [torch.randn(2, 3, 28, 28)] * 2 + [torch.randn(2, 3, 14, 14)] * 4
    assert encoder(crops).shape == (12, 256)
    assert calls == [28, 14]


@pytest.mark.parametrize("global_only", [True, False])
def test_batch_norm_running_stats_come_from_the_global_crops(global_only):
    torch.manual_seed(0)
    encoder = MultiCropEncoder(build_backbone("bam_cnn4"), nn.Identity(), global_running_stats=global_only)
    reference = MultiCropEncoder(build_backbone("bam_cnn4"), nn.Identity())
    reference.load_state_dict(encoder.state_dict())
    global_crops = [torch.randn(4, 3, 28, 28) for _ in range(2)]
    local_crops = [torch.randn(4, 3, 14, 14) * 3 + 1 for _ in range(2)]  # a different distribution
    encoder(global_crops + local_crops)
    reference(global_crops)
    stats = [(b.running_mean, b.running_var) for b in encoder.modules() if isinstance(b, nn.BatchNorm2d)]
    expected = [(b.running_mean, b.running_var) for b in reference.modules() if isinstance(b, nn.BatchNorm2d)]
    matches = all(torch.allclose(a, b) and torch.allclose(v, w) for (a, v), (b, w) in zip(stats, expected))
    assert matches == global_only
    assert all(b.momentum == 0.1 for b in encoder.modules() if isinstance(b, nn.BatchNorm2d))  # restored
