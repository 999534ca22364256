"""GSP pooling: the official one-total-mass formulation (default) and the per-prototype one, each
against a reference written from its equations; average pooling at mu = 1, learnable prototypes,
selection, and its place in backbones."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from bam.io import export_backbone, load_backbone
from bam.methods import BAMModule
from bam.models.backbones import build_backbone
from bam.models.gsp import GSPPool
from tiny_runs import TinyCropsDataModule
from eval_fixtures import write_checkpoint

SMALL_HEAD = dict(projector=dict(hidden_dim=64, out_dim=32, num_layers=2))


def _map(batch: int = 3, channels: int = 16, size: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed)).relu()


@pytest.mark.parametrize("mass", ["total", "per_prototype"])
@pytest.mark.parametrize("size", [1, 4, 7])
def test_mu_one_is_average_pooling(size, mass):
    pool = GSPPool(16, num_prototypes=8, mu=1.0, reg=0.01, mass=mass)
    feature_map = _map(size=size)
    torch.testing.assert_close(pool(feature_map), feature_map.mean(dim=(2, 3)), rtol=0, atol=1e-5)


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True)


def _official_reference(feature_map, prototypes, mu, eps, iterations):
    """The official total-mass layer, from its equations (float64, exp domain): binary cost
    |x_i/|x_i| - z_k/|z_k||^2, K = exp(-cost / eps), S_i = sum_k K_ik, q = 1/n; mu_ = mu, then
    `iterations` times p = q / (1 + mu_ S), mu_ = mu / sum_i p_i S_i; a last p; pooled =
    average over locations of ((1 - n p_i) / mu) x_i."""
    x = feature_map.double().flatten(2).transpose(1, 2)  # (B, n, C)
    cost = torch.cdist(_unit(x), _unit(prototypes.double()).expand(len(x), -1, -1)).square()
    row_sums = torch.exp(-cost / eps).sum(-1)  # (B, n)
    n = x.shape[1]
    scale = torch.full((len(x), 1), mu, dtype=torch.float64)
    for _ in range(iterations):
        residual = (1.0 / n) / (1.0 + scale * row_sums)
        scale = mu / (residual * row_sums).sum(-1, keepdim=True)
    residual = (1.0 / n) / (1.0 + scale * row_sums)
    return (((1.0 - n * residual) / mu).unsqueeze(-1) * x).mean(1)


def _per_prototype_reference(feature_map, prototypes, mu, eps, iterations):
    """The per-prototype balanced transport, from its equations (float64, exp domain): rows
    (locations) 1/n, prototypes mu/m each, residual 1 - mu at cost 0; cost 1 - cos; `iterations`
    column-then-row scalings; weights = mass sent to the prototypes, normalised."""
    x = feature_map.double().flatten(2).transpose(1, 2)
    batch, n, _ = x.shape
    m = len(prototypes)
    cost = 1.0 - _unit(x) @ _unit(prototypes.double()).T
    kernel = torch.cat([torch.exp(-cost / eps), torch.ones(batch, n, 1, dtype=torch.float64)], -1)
    rows = torch.full((n,), 1.0 / n, dtype=torch.float64)
    columns = torch.cat([torch.full((m,), mu / m, dtype=torch.float64), torch.tensor([1.0 - mu], dtype=torch.float64)])
    u = torch.ones(batch, n, dtype=torch.float64)
    for _ in range(iterations):
        v = columns / (kernel.mT @ u.unsqueeze(-1)).squeeze(-1)
        u = rows / (kernel @ v.unsqueeze(-1)).squeeze(-1)
    selected = (u.unsqueeze(-1) * kernel * v.unsqueeze(-2))[..., :m].sum(-1)
    weights = selected / selected.sum(-1, keepdim=True)
    return (weights.unsqueeze(-1) * x).sum(1)


@pytest.mark.parametrize("mu, eps, iterations", [(0.3, 0.5, 100), (0.5, 0.2, 7), (0.7, 1.0, 1)])
def test_total_mass_is_the_official_formulation(mu, eps, iterations):
    pool = GSPPool(16, num_prototypes=6, mu=mu, reg=eps, iterations=iterations).double()
    feature_map = _map(batch=3, size=5, seed=2).double()
    expected = _official_reference(feature_map, pool.prototypes.detach(), mu, eps, iterations)
    torch.testing.assert_close(pool(feature_map), expected, rtol=1e-9, atol=1e-12)
    earlier = GSPPool(16, num_prototypes=6, mu=mu, reg=eps, iterations=iterations, mass="per_prototype").double()
    earlier.load_state_dict(pool.state_dict())
    assert not torch.allclose(earlier(feature_map), expected, atol=1e-4)  # the two formulations differ


@pytest.mark.parametrize("mu, eps, iterations", [(0.3, 0.5, 50), (0.6, 0.1, 5)])
def test_per_prototype_mass_matches_its_reference(mu, eps, iterations):
    pool = GSPPool(16, num_prototypes=6, mu=mu, reg=eps, iterations=iterations, mass="per_prototype").double()
    feature_map = _map(batch=2, size=4, seed=3).double()
    expected = _per_prototype_reference(feature_map, pool.prototypes.detach(), mu, eps, iterations)
    torch.testing.assert_close(pool(feature_map), expected, rtol=1e-9, atol=1e-12)


def test_total_mass_is_stable_at_a_sharp_eps():
    # exp(-cost / eps) underflows float32 at eps = 0.01 (cost up to 4): the log domain keeps it finite
    # (the single dual converges more slowly the sharper eps is: 1000 updates here)
    pool = GSPPool(16, num_prototypes=8, mu=0.5, reg=0.01, iterations=1000)
    feature_map = _map(size=7).requires_grad_()
    pool(feature_map).sum().backward()
    assert torch.isfinite(feature_map.grad).all() and torch.isfinite(pool.prototypes.grad).all()
    torch.testing.assert_close(pool.weights(_map(size=7).flatten(2).transpose(1, 2)).sum(1), torch.ones(3))


def test_output_shape_and_weights_are_a_distribution():
    pool = GSPPool(16, num_prototypes=5, mu=0.3)
    feature_map = _map(batch=4, size=6)
    assert pool(feature_map).shape == (4, 16)
    weights = pool.weights(feature_map.flatten(2).transpose(1, 2))
    assert weights.shape == (4, 36) and torch.all(weights >= 0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(4))


def test_small_mu_selects_the_locations_that_match_prototypes():
    pool = GSPPool(8, num_prototypes=2, mu=0.25, reg=0.01, iterations=50)
    with torch.no_grad():
        pool.prototypes.copy_(torch.eye(8)[:2])
    feature_map = torch.zeros(1, 8, 4, 4)
    feature_map[0, 2:] = 1.0  # every location: a nuisance direction
    feature_map[0, :, 0, :2] = torch.eye(8)[0, :, None]  # two locations on prototype 0
    feature_map[0, :, 3, 2:] = torch.eye(8)[1, :, None]  # two on prototype 1
    weights = pool.weights(feature_map.flatten(2).transpose(1, 2)).view(4, 4)
    selected = weights[0, :2].sum() + weights[3, 2:].sum()
    assert selected > 0.95, weights  # 4 of 16 locations = mu of the mass: exactly the matching ones


def test_gradients_reach_prototypes_and_features():
    pool = GSPPool(16, num_prototypes=8, mu=0.5)
    feature_map = _map().requires_grad_()
    (pool(feature_map) @ torch.randn(16)).square().sum().backward()
    assert pool.prototypes.grad is not None and pool.prototypes.grad.abs().sum() > 0
    assert torch.isfinite(pool.prototypes.grad).all() and torch.isfinite(feature_map.grad).all()


def test_gradcheck_float64():
    pool = GSPPool(4, num_prototypes=3, mu=0.6, reg=0.5, iterations=5).double()
    # away from zero vectors, where L2 normalisation has a kink
    feature_map = (_map(batch=2, channels=4, size=2) + 0.5).double().requires_grad_()
    assert torch.autograd.gradcheck(pool, (feature_map,), eps=1e-6, atol=1e-6)


def test_bad_settings_are_explained():
    with pytest.raises(ValueError, match=r"mu is the fraction.*\(0, 1\]"):
        GSPPool(8, mu=0.0)
    with pytest.raises(ValueError, match="reg must be positive"):
        GSPPool(8, reg=0)
    with pytest.raises(ValueError, match=r"unknown mass 'uniform'.*total"):
        GSPPool(8, mass="uniform")
    with pytest.raises(ValueError, match=r"\(batch, 8, height, width\)"):
        GSPPool(8)(torch.randn(2, 8))


# --- in backbones --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kwargs, size", [("bam_cnn4", {"width": 8}, 28), ("resnet18", {}, 96)])
def test_build_backbone_replaces_average_pooling(name, kwargs, size):
    gsp = build_backbone(name, pooling="gsp", pooling_kwargs={"mu": 1.0, "num_prototypes": 4}, **kwargs).eval()
    plain = build_backbone(name, **kwargs).eval()
    missing = plain.load_state_dict(gsp.state_dict(), strict=False)
    assert [key.endswith("prototypes") for key in missing.unexpected_keys] == [True]
    images = torch.randn(2, 3, size, size)
    torch.testing.assert_close(gsp(images), plain(images), rtol=0, atol=1e-5)


def test_gsp_is_rejected_where_it_cannot_apply():
    with pytest.raises(ValueError, match="build it with pool_size 1"):
        build_backbone("bam_cnn4", pooling="gsp", pool_size=2)
    with pytest.raises(ValueError, match="needs a CNN"):
        build_backbone("vit_tiny_patch16_224", pooling="gsp", img_size=32, patch_size=8, depth=1)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        build_backbone("bam_cnn4", pooling="max")


def test_fine_tuning_head_keeps_gsp():
    model = build_backbone("resnet18", pooling="gsp")
    prototypes = model.global_pool.prototypes
    model.reset_classifier(7)
    assert model.global_pool.prototypes is prototypes and model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_export_rebuilds_gsp_with_its_prototypes(tmp_path):
    kwargs = {"width": 8, "pooling": "gsp", "pooling_kwargs": {"num_prototypes": 4, "mu": 0.5}}
    checkpoint = write_checkpoint(tmp_path, "bam_cnn4", kwargs)
    loaded = load_backbone(export_backbone(checkpoint, tmp_path / "export"))
    assert isinstance(loaded.pool, GSPPool) and loaded.pool.mu == 0.5
    teacher = torch.load(checkpoint, weights_only=False)["state_dict"]
    key = next(k for k in teacher if k.endswith("pool.prototypes") and "teacher" in k)
    torch.testing.assert_close(loaded.pool.prototypes, teacher[key])


@pytest.mark.parametrize("backbone", ["bam_cnn4", "resnet18"])
def test_one_bam_training_step_moves_the_prototypes(tmp_path, backbone):
    model = BAMModule(backbone=backbone, backbone_kwargs={"pooling": "gsp", "pooling_kwargs": {"num_prototypes": 8}},
                      num_local_crops=2, warmup_epochs=0, **SMALL_HEAD)
    prototypes = next(p for n, p in model.student.named_parameters() if n.endswith("prototypes"))
    before = prototypes.detach().clone()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, fast_dev_run=1,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, TinyCropsDataModule(num_images=8, batch_size=4))
    assert not torch.equal(before, prototypes.detach()), "the GSP prototypes did not change after a step"
