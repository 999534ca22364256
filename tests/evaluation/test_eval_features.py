"""Feature readouts (the authors' ViT linear-probe features), whole-dataset extraction, and the
weighted k-NN vote on constructed features."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from bam.evaluation import knn_class_scores
from bam.evaluation.backbone import build_from_spec, resolve_backbone
from bam.features.extract import FeatureExtractor, embed_dataset, resolve_readout
from bam.evaluation.knn_stage import knn_scores_streamed
from bam.models.backbones import build_backbone
from eval_fixtures import CNN, VIT, write_checkpoint

IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(VIT[0], **VIT[1]).eval()


def manual_vit_features(model: torch.nn.Module, images: torch.Tensor, n: int) -> torch.Tensor:
    """Class tokens of the last n blocks and the mean patch token of the last, each after the final norm,
    computed from the blocks' outputs captured with hooks."""
    outputs = []
    hooks = [block.register_forward_hook(lambda m, i, o: outputs.append(o)) for block in model.blocks[-n:]]
    with torch.no_grad():
        model.forward_features(images)
        normed = [model.norm(output) for output in outputs]
    for hook in hooks:
        hook.remove()
    return torch.cat([*(tokens[:, 0] for tokens in normed), normed[-1][:, 1:].mean(dim=1)], dim=1)


@pytest.mark.parametrize("n_last_blocks", [1, 2])
def test_vit_linear_features_are_class_tokens_and_mean_patch_token(vit, n_last_blocks):
    extractor = FeatureExtractor(vit, "cls_patch_mean", n_last_blocks)
    features = extractor(IMAGES)
    assert features.shape == (3, (n_last_blocks + 1) * 48) == (3, extractor.out_dim)
    torch.testing.assert_close(features, manual_vit_features(vit, IMAGES, n_last_blocks))


@pytest.mark.parametrize("n_last_blocks", [1, 3])
def test_vit_small_protocol_features_are_the_class_tokens_alone(vit, n_last_blocks):
    extractor = FeatureExtractor(vit, "cls_blocks", n_last_blocks)
    features = extractor(IMAGES)
    assert features.shape == (3, n_last_blocks * 48) == (3, extractor.out_dim)
    with_patch_mean = manual_vit_features(vit, IMAGES, n_last_blocks)
    torch.testing.assert_close(features, with_patch_mean[:, : n_last_blocks * 48])


def test_vit_small_readout_has_the_authors_1536_features():
    vit_small = build_backbone("vit_small_patch16_224").eval()
    extractor = FeatureExtractor(vit_small, "cls_blocks", n_last_blocks=4)
    assert extractor.out_dim == 4 * 384 == 1536
    assert extractor(torch.zeros(1, 3, 224, 224)).shape == (1, 1536)


def test_single_block_recipe_is_cls_and_mean_patch_of_forward_features(vit):
    with torch.no_grad():
        tokens = vit.forward_features(IMAGES)  # ends with the final norm
    expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)
    torch.testing.assert_close(FeatureExtractor(vit, "cls_patch_mean")(IMAGES), expected)
    torch.testing.assert_close(FeatureExtractor(vit, "cls")(IMAGES), tokens[:, 0])


def test_auto_recipe_per_architecture(vit):
    cnn = build_backbone(*CNN[:1], **CNN[1])
    assert resolve_readout("auto", vit, "cls_patch_mean") == "cls_patch_mean"
    assert resolve_readout("auto", cnn, "cls_patch_mean") == "pooled"
    with torch.no_grad():
        torch.testing.assert_close(FeatureExtractor(cnn.eval())(IMAGES), cnn(IMAGES))
    for recipe in ("cls", "cls_patch_mean", "cls_blocks"):
        with pytest.raises(ValueError) as error:
            FeatureExtractor(cnn, recipe)
        assert str(error.value) == (
            f"feature readout {recipe!r} reads a ViT's class token, but the backbone is a SmallCNN; "
            "use feature 'auto' or 'pooled'"
        )
    with pytest.raises(ValueError, match="unknown feature readout 'clss'"):
        resolve_readout("clss", vit, "cls")


def test_extractor_stays_frozen_in_eval_mode():
    extractor = FeatureExtractor(build_backbone(*CNN[:1], **CNN[1]))
    extractor.train()
    assert not any(module.training for module in extractor.modules())
    assert not any(p.requires_grad for p in extractor.parameters())


def test_backbone_from_checkpoint_and_random_init(tmp_path):
    path = write_checkpoint(tmp_path, *CNN)
    spec = resolve_backbone(str(path))
    assert spec.encoder == "teacher" and spec.model_name == "bam_cnn4"
    loaded = build_from_spec(spec)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, spec.state[name]), name
    overridden = resolve_backbone(str(path), arch="resnet18")  # arch replaces the recorded architecture
    assert (overridden.model_name, overridden.model_kwargs, overridden.encoder) == ("resnet18", {"width": 8}, "teacher")
    student = resolve_backbone(str(path), encoder="student")
    assert student.encoder == "student" and student.model_name == "bam_cnn4"
    random = resolve_backbone("bam_cnn4")
    assert (random.model_name, random.model_kwargs, random.encoder, random.source_format) == (
        "bam_cnn4", {}, "random init", "timm")
    assert not random.state and random.recipe is None
    with pytest.raises(FileNotFoundError):
        resolve_backbone(str(tmp_path / "missing.ckpt"))


def test_embed_dataset_returns_every_row_in_dataset_order():
    data = torch.randn(11, 5)
    dataset = TensorDataset(data, torch.arange(11) % 3)
    features, labels = embed_dataset(dataset, lambda x: 2 * x, torch.device("cpu"), batch_size=4)
    torch.testing.assert_close(features, 2 * data)
    assert labels.tolist() == (torch.arange(11) % 3).tolist()


def test_knn_votes_on_constructed_features():
    # bank: two copies of e0 (class 0), one e1 (class 1), one -e0 (class 2)
    bank = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    query = torch.tensor([[5.0, 0.0]])
    t = 0.07
    top2 = knn_class_scores(query, bank, labels, num_classes=3, k=2, temperature=t)
    torch.testing.assert_close(top2, torch.tensor([[2 * torch.tensor(1 / t).exp(), 0.0, 0.0]]))
    top4 = knn_class_scores(query, bank, labels, num_classes=3, k=4, temperature=t)
    torch.testing.assert_close(top4, torch.tensor([[2 * torch.tensor(1 / t).exp(), 1.0, torch.tensor(-1 / t).exp()]]))


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_streamed_bank_gives_the_reference_votes(chunk_rows):
    generator = torch.Generator().manual_seed(0)
    bank, query = torch.randn(50, 16, generator=generator), torch.randn(9, 16, generator=generator)
    labels = torch.randint(0, 5, (50,), generator=generator)
    expected = knn_class_scores(query, bank, labels, num_classes=5, k=20, temperature=0.07)
    bank = F.normalize(bank, dim=1)
    streamed = knn_scores_streamed(query, bank, labels, 5, k=20, temperature=0.07, chunk_rows=chunk_rows)
    torch.testing.assert_close(streamed, expected, rtol=1e-5, atol=1e-3)
