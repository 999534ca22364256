"""The pictures of `bam embed` and of the demo's end: class-token attention checked against the
attention module's own output, neighbours against a brute-force cosine search, and the figures
against what they were given."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from bam.features import pictures
from bam.features.pictures import (
    PictureSettings,
    attention_weights,
    cls_attention,
    embedding_2d,
    nearest_neighbours,
    write_pictures,
)
from bam.models.backbones import build_backbone
from eval_fixtures import CNN, VIT, record_figures


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_backbone(VIT[0], **VIT[1]).eval()


def test_class_token_attention_is_the_softmax_the_last_block_applies(vit):
    images = torch.randn(2, 3, 32, 32)
    attention = vit.blocks[-1].attn
    seen = {}
    attention.register_forward_hook(lambda module, args, output: seen.update(tokens=args[0], output=output))
    maps = cls_attention(vit, images)
    tokens = seen["tokens"]
    weights = attention_weights(attention, tokens)
    # rows are probability distributions over the tokens
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    # and they are the block's attention: weights @ values, projected, is what the module returned
    batch, count, _ = tokens.shape
    values = attention.qkv(tokens).reshape(batch, count, 3, attention.num_heads, attention.head_dim)[:, :, 2]
    mixed = (weights @ values.transpose(1, 2)).transpose(1, 2).reshape(batch, count, -1)
    torch.testing.assert_close(attention.proj(mixed), seen["output"], atol=1e-5, rtol=1e-5)
    # the maps: the class token's row over the 4 x 4 patches of 8 px, one per head
    assert maps.shape == (2, 3, 4, 4)
    torch.testing.assert_close(maps.flatten(2), weights[:, :, 0, vit.num_prefix_tokens:])
    torch.testing.assert_close(maps.sum((2, 3)) + weights[:, :, 0, : vit.num_prefix_tokens].sum(-1),
                               torch.ones(2, 3))


def test_attention_maps_of_a_cnn_are_refused_with_the_way_out():
    with pytest.raises(ValueError, match="attention maps need a timm ViT .*, got SmallCNN; set attention_images=0 for other architectures"):
        cls_attention(build_backbone(CNN[0], **CNN[1]), torch.randn(1, 3, 32, 32))


def brute_force_neighbours(features: np.ndarray, query: int, k: int) -> list[int]:
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarities = [(float(unit[query] @ unit[other]), other) for other in range(len(unit)) if other != query]
    return [other for _, other in sorted(similarities, reverse=True)[:k]]


def test_neighbours_are_the_cosine_top_k_without_the_query_itself():
    features = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    queries = torch.tensor([0, 7, 39])
    similarities, rows = nearest_neighbours(features * 3, queries, k=4)  # scale does not matter: cosine
    for query, found in zip(queries.tolist(), rows.tolist()):
        assert found == brute_force_neighbours(features.numpy(), query, 4)
    expected = torch.nn.functional.normalize(features, dim=1)
    torch.testing.assert_close(similarities[:, 0], (expected[queries] * expected[rows[:, 0]]).sum(1))
    with pytest.raises(ValueError, match="k must be between 1 and the number of other images \\(39\\), got 40"):
        nearest_neighbours(features, queries, k=40)


def test_the_map_is_t_sne_without_umap_and_lays_out_every_point(monkeypatch):
    monkeypatch.setattr(pictures.importlib.util, "find_spec", lambda name: None)  # as without umap-learn
    layout, method = embedding_2d(torch.randn(12, 5), seed=0)
    assert method == "t-SNE" and layout.shape == (12, 2) and np.isfinite(layout).all()


def test_write_pictures_draws_the_neighbours_and_classes_it_computed(tmp_path, monkeypatch):
    figures = record_figures(monkeypatch, pytest.importorskip("matplotlib.figure"))
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(20, 3, 8, 8, generator=generator)
    labels = torch.arange(20) % 2
    features = torch.randn(20, 6, generator=generator)
    dataset = TensorDataset(images, labels)
    settings = PictureSettings(queries=3, k=2, map_points=10, attention_images=2)
    written = write_pictures(settings, features, dataset, torch.arange(20), (0.0,) * 3, (1.0,) * 3, tmp_path,
                             labels, ["even", "odd"], build_backbone(CNN[0], **CNN[1]))
    # a CNN: no attention maps; the grid and the map are written
    assert [path.name for path in written] == ["neighbours.png", "embedding_map.png"]
    assert all(path.stat().st_size > 0 for path in written)
    grid, layout = figures
    queries = torch.randperm(20, generator=torch.Generator().manual_seed(0))[:3]
    for row, query in enumerate(queries.tolist()):
        axes = grid.axes[row * 3 : row * 3 + 3]
        expected = brute_force_neighbours(features.numpy(), query, 2)
        assert axes[0].get_title() == f"query\n{['even', 'odd'][query % 2]}"
        for column, neighbour in enumerate(expected, start=1):
            similarity = torch.nn.functional.cosine_similarity(features[query], features[neighbour], dim=0)
            assert axes[column].get_title() == f"cos {similarity:.2f}\n{['even', 'odd'][neighbour % 2]}"
            np.testing.assert_allclose(axes[column].get_images()[0].get_array(), images[neighbour].permute(1, 2, 0))
    legend = [text.get_text() for text in layout.axes[0].get_legend().get_texts()]
    assert legend == ["even", "odd"] and "10 embeddings (coloured by class)" in layout.axes[0].get_title()


def test_a_single_class_is_not_coloured_and_a_vit_gets_its_attention_maps(tmp_path, vit, monkeypatch):
    figures = record_figures(monkeypatch, pytest.importorskip("matplotlib.figure"))
    images = torch.randn(6, 3, 32, 32)
    settings = PictureSettings(queries=0, map_points=6, attention_images=2)
    written = write_pictures(settings, torch.randn(6, 4), TensorDataset(images, torch.zeros(6)), torch.arange(6),
                             (0.5,) * 3, (0.25,) * 3, tmp_path, torch.zeros(6, dtype=torch.long), None, vit)
    assert [path.name for path in written] == ["embedding_map.png", "attention.png"]
    layout, attention = figures
    assert layout.axes[0].get_legend() is None and "(no classes)" in layout.axes[0].get_title()
    # per image: the image, the mean of the 3 heads, each head
    assert [axes.get_title() for axes in attention.axes[:5]] == ["image", "mean of heads", "head 0", "head 1", "head 2"]
