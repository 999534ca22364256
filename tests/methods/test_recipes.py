"""Every shipped pretraining recipe holds the authors' values (tests/helpers/authors_recipes.yaml) or a
listed deviation with its reason; docs/recipes.md shows the same table; the authors' ViT really has a fixed
sin-cos position embedding and a frozen patch projection, which the optimiser never receives, and
weight decay skips exactly what the authors' parameter groups skip."""
from __future__ import annotations

import math

import pytest
import torch
import yaml
from recipe_table import REPO, RECIPES_DIR, config_value, expected_value, load_table, markdown, page_markdown

from bam.methods import BAMModule
from bam.models import build_backbone

TABLE = load_table()
AUTHORS_SOURCES = ("main_pretrain.py", "utils.py", "models/")


def test_every_shipped_recipe_is_in_the_table():
    shipped = sorted(path.name for path in RECIPES_DIR.glob("*.yaml"))
    assert shipped == sorted(TABLE), "add the recipe to tests/helpers/authors_recipes.yaml (with its script or why not)"


@pytest.mark.parametrize("name", sorted(TABLE))
def test_recipe_holds_the_authors_values(name):
    entry = TABLE[name]
    config = yaml.safe_load((RECIPES_DIR / name).read_text())
    for row in entry["settings"]:
        assert config_value(config, row["key"]) == expected_value(row), f"{name}: {row['key']}"
        if "bam" in row:
            assert row.get("reason"), f"{name}: the deviation {row['key']} needs a reason"
        if entry["script"] is not None:
            source = row["source"]
            assert source.startswith("{script}") or source.startswith(AUTHORS_SOURCES), f"{name}: {row['key']} source"
    if entry["script"] is None:
        assert entry["why"]
    if "repo" in entry:  # another method's authors: every value names its file there
        assert all(row.get("source") and "authors" in row for row in entry["settings"]), name


def test_authors_recipes_cover_the_issue_settings():
    # the settings found to differ from the authors' training: each must be a row of every authors' recipe
    for name, entry in TABLE.items():
        if entry["script"] is None:
            continue
        keys = {row["key"] for row in entry["settings"]}
        assert {"model.init_args.min_lr", "model.init_args.projector.init", "contrastive_crop.warmup_epochs",
                "contrastive_crop.loc_interval", "trainer.precision"} <= keys, name
        if name.startswith("vit"):
            assert {f"model.init_args.backbone_kwargs.{key}" for key in
                    ("weight_init", "sincos_pos_embed", "freeze_patch_embed")} <= keys, name


def test_docs_show_the_table():
    assert markdown() in (REPO / "docs" / "recipes.md").read_text(), (
        "docs/recipes.md's table is stale: run python tests/helpers/recipe_table.py and paste its output there")


@pytest.mark.parametrize("page", sorted({entry["docs"] for entry in TABLE.values() if "docs" in entry}))
def test_method_pages_show_their_recipes_tables(page):
    assert page_markdown(page) in (REPO / page).read_text(), f"{page}'s recipe table is stale: run python tests/helpers/recipe_table.py {page}"


def test_a_changed_recipe_value_fails_the_check():
    config = yaml.safe_load((RECIPES_DIR / "vit_base_patch16.yaml").read_text())
    config["model"]["init_args"]["min_lr"] = 1e-6
    row = next(row for row in TABLE["vit_base_patch16.yaml"]["settings"] if row["key"] == "model.init_args.min_lr")
    assert config_value(config, row["key"]) != expected_value(row)


# -- the authors' ViT ----------------------------------------------------------------------------
def _authors_vit(**kwargs):
    return build_backbone("vit_small_patch16_224", weight_init="moco", sincos_pos_embed=True,
                          freeze_patch_embed=True, **kwargs)


def _reference_sincos(grid: int, width: int) -> torch.Tensor:
    """The authors' equations: per patch (row r, column c), sin(r w), cos(r w), sin(c w), cos(c w)
    with w_k = 10000^(-k / (width/4)); the class token's row is zero."""
    quarter = width // 4
    rows = [[0.0] * width]
    for r in range(grid):
        for c in range(grid):
            frequencies = [10000.0 ** (-k / quarter) for k in range(quarter)]
            rows.append([math.sin(r * w) for w in frequencies] + [math.cos(r * w) for w in frequencies]
                        + [math.sin(c * w) for w in frequencies] + [math.cos(c * w) for w in frequencies])
    return torch.tensor(rows).unsqueeze(0)


def test_vit_has_a_fixed_sincos_position_embedding_and_frozen_patch_projection():
    vit = _authors_vit()
    assert type(vit).__name__ == "VisionTransformer"
    assert not vit.pos_embed.requires_grad
    torch.testing.assert_close(vit.pos_embed.detach(), _reference_sincos(14, 384), rtol=0, atol=2e-5)
    assert not vit.patch_embed.proj.weight.requires_grad and not vit.patch_embed.proj.bias.requires_grad
    plain = build_backbone("vit_small_patch16_224")
    assert vit.state_dict().keys() == plain.state_dict().keys()  # released checkpoints and timm load it
    plain.load_state_dict(vit.state_dict(), strict=True)
    assert vit(torch.randn(2, 3, 96, 96)).shape == (2, 384)  # local crops: dynamic image size


def test_moco_init_is_timms():
    torch.manual_seed(0)
    vit = _authors_vit()
    qkv = vit.blocks[0].attn.qkv.weight  # MoCo v3: Q, K and V initialised as separate matrices
    bound = math.sqrt(6.0 / (qkv.shape[0] // 3 + qkv.shape[1]))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.95 * bound
    assert torch.all(vit.blocks[0].attn.qkv.bias == 0)


def test_options_refuse_a_cnn():
    with pytest.raises(ValueError, match="apply to timm ViTs.*resnet18"):
        build_backbone("resnet18", sincos_pos_embed=True)


def _module(projector=None, **kwargs):
    config = yaml.safe_load((RECIPES_DIR / "vit_small_patch16.yaml").read_text())["model"]["init_args"]
    config.update(projector={**config["projector"], "hidden_dim": 64, "out_dim": 32, **(projector or {})}, **kwargs)
    module = BAMModule(**config)
    module.trainer = type("T", (), {"estimated_stepping_batches": 10, "max_epochs": 1, "world_size": 1,
                                    "num_devices": 1, "num_nodes": 1, "accumulate_grad_batches": 1})()
    module.global_batch_size = lambda: 256
    return module


def _authors_param_groups(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    """The authors' utils.get_params_groups: frozen parameters left out; biases and 1-D
    parameters not regularised; everything else regularised."""
    decayed, not_decayed = set(), set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            (not_decayed if name.endswith(".bias") or param.ndim == 1 else decayed).add(name)
    return decayed, not_decayed


def test_optimiser_gets_no_frozen_parameter_and_decays_what_the_authors_decay():
    module = _module()
    optimizer = module.configure_optimizers()["optimizer"]
    names = {id(param): name for name, param in module.student.named_parameters()}
    decayed = {names[id(p)] for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    not_decayed = {names[id(p)] for group in optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]}
    frozen = {"backbone.pos_embed", "backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias"}
    assert not frozen & (decayed | not_decayed)
    assert all(param.requires_grad for group in optimizer.param_groups for param in group["params"])
    assert (decayed, not_decayed) == _authors_param_groups(module.student)
    assert "backbone.cls_token" in decayed  # 3-D: the authors decay it too


def test_projector_init_is_truncated_normal():
    projector = _module(projector=dict(hidden_dim=512, out_dim=512)).student.projector
    for linear in (layer for layer in projector if isinstance(layer, torch.nn.Linear)):
        weight = linear.weight.detach().double()
        kurtosis = ((weight - weight.mean()) ** 4).mean() / weight.var() ** 2
        # std 0.02 and a normal's kurtosis 3 (PyTorch's default: uniform, std 0.026-0.03, kurtosis 1.8)
        assert 0.0195 < weight.std() < 0.0205 and 2.8 < kurtosis < 3.2
        assert torch.all(linear.bias == 0)


def test_a_training_step_leaves_the_frozen_parts_and_moves_the_rest(tmp_path):
    import pytorch_lightning as pl
    from tiny_runs import TinyCropsDataModule

    vit = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "weight_init": "moco",
           "sincos_pos_embed": True, "freeze_patch_embed": True}
    model = BAMModule(backbone="vit_tiny_patch16_224", backbone_kwargs=vit, num_local_crops=2, momentum_teacher=True,
                      warmup_epochs=0, lr=0.1, projector=dict(hidden_dim=32, out_dim=16, num_layers=2, init="trunc_normal"))
    before = {name: param.detach().clone() for name, param in model.student.named_parameters()}
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=tmp_path, max_steps=1, gradient_clip_val=0.3,
               ).fit(model, TinyCropsDataModule(num_images=8, batch_size=8))
    after = dict(model.student.named_parameters())
    frozen = ("backbone.pos_embed", "backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias")
    for name in frozen:
        assert torch.equal(after[name], before[name]), name
        # the EMA of two equal values: equal up to the rounding of m * x + (1 - m) * x
        torch.testing.assert_close(dict(model.teacher.named_parameters())[name], before[name])
    assert not torch.equal(after["backbone.blocks.0.attn.qkv.weight"], before["backbone.blocks.0.attn.qkv.weight"])
