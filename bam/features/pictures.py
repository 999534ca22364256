"""What users look at to judge a backbone, as PNG figures: where a ViT's class token attends,
which images a backbone finds alike, and how its embeddings spread out in 2-D.

- `cls_attention`: the last block's attention of the class token over the patches, per head,
  computed from the block's own query/key projections on the tokens it really receives (a hook
  on its attention module during an ordinary forward pass);
- `nearest_neighbours`: cosine top-k of query rows among all embeddings (themselves left out);
- `embedding_2d`: a 2-D layout of the embeddings, UMAP when `umap-learn` is installed, else
  scikit-learn's t-SNE.

Figures are built with `matplotlib.figure.Figure` (no pyplot, no display), as `bam.training.plots`.
Used by `bam embed` and by the end-of-run pictures of pretraining (`bam.callbacks.pictures`).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from bam.ops import is_vit

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ATTENTION_FILE = "attention.png"
NEIGHBOURS_FILE = "neighbours.png"
MAP_FILE = "embedding_map.png"


@dataclass
class PictureSettings:
    """Which pictures to draw, and how many images they show.

    Args:
        enabled: Draw the pictures at all.
        queries: Images in the nearest-neighbour grid, one row each (0: no grid).
        k: Neighbours shown per query.
        map_points: Most embeddings in the 2-D map (a seeded random subset beyond; 0: no map).
        attention_images: Images whose class-token attention is drawn (ViTs only; 0: none).
        seed: Seed of the query choice, the map's subset and its layout.
    """

    enabled: bool = True
    queries: int = 6
    k: int = 5
    map_points: int = 5000
    attention_images: int = 4
    seed: int = 0


# -- what the pictures show ----------------------------------------------------------------------
@torch.no_grad()
def cls_attention(model: nn.Module, images: Tensor) -> Tensor:
    """`(B, heads, rows, columns)` attention of the class token over the patch grid in the last
    block of a timm ViT (softmax over all tokens, so each map sums to at most 1: the rest goes to
    the prefix tokens)."""
    attention = last_attention_module(model)
    captured: dict[str, Tensor] = {}

    def keep_tokens(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["tokens"] = args[0] if args else kwargs["x"]

    handle = attention.register_forward_pre_hook(keep_tokens, with_kwargs=True)
    try:
        model.forward_features(images)
    finally:
        handle.remove()
    weights = attention_weights(attention, captured["tokens"])
    patch_rows, patch_columns = (size // patch for size, patch in zip(images.shape[-2:], model.patch_embed.patch_size))
    class_row = weights[:, :, 0, model.num_prefix_tokens :]
    return class_row.reshape(len(images), attention.num_heads, patch_rows, patch_columns)


def last_attention_module(model: nn.Module) -> nn.Module:
    """The attention of a timm ViT's last block; a clear error for anything else."""
    blocks = getattr(model, "blocks", None)
    attention = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if not is_vit(model) or not all(hasattr(attention, name) for name in ("qkv", "num_heads", "head_dim", "scale")):
        raise ValueError(
            f"attention maps need a timm ViT (blocks[-1].attn with a qkv projection), got {type(model).__name__}; "
            "set attention_images=0 for other architectures"
        )
    return attention


def attention_weights(attention: nn.Module, tokens: Tensor) -> Tensor:
    """`(B, heads, N, N)` softmax attention of a timm `Attention` module on its input `tokens`."""
    batch, count, _ = tokens.shape
    qkv = attention.qkv(tokens).reshape(batch, count, 3, attention.num_heads, attention.head_dim)
    query, key, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    query, key = attention.q_norm(query), attention.k_norm(key)
    return ((query * attention.scale) @ key.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def nearest_neighbours(features: Tensor, query_rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`(similarities, rows)`, both `(Q, k)`, of the `k` rows of `features` most cosine-similar
    to each row in `query_rows`, the query itself left out; best first."""
    if not 1 <= k < len(features):
        raise ValueError(f"k must be between 1 and the number of other images ({len(features) - 1}), got {k}")
    points = F.normalize(features.float(), dim=1)
    similarity = points[query_rows] @ points.T
    similarity[torch.arange(len(query_rows)), query_rows] = -float("inf")
    return similarity.topk(k, dim=1)


def embedding_2d(features: Tensor, seed: int = 0) -> tuple[np.ndarray, str]:
    """`(N, 2)` layout of the L2-normalised `features` and the method's name: UMAP (cosine) when
    `umap-learn` is installed, else scikit-learn's t-SNE (PCA start; perplexity 30, less for
    small sets, which it must stay below)."""
    points = F.normalize(features.float(), dim=1).cpu().numpy()
    if importlib.util.find_spec("umap") is not None:
        import umap

        return umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(points), "UMAP"
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (len(points) - 1) / 3)
    layout = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    return layout, "t-SNE"


def shown_images(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised images back to displayable `[0, 1]` pixels."""
    mean_, std_ = (torch.tensor(values, dtype=images.dtype).view(-1, 1, 1) for values in (mean, std))
    return (images.cpu() * std_ + mean_).clamp(0, 1)


# -- the figures ---------------------------------------------------------------------------------
def attention_figure(images: Tensor, attention: Tensor) -> "Figure":
    """One row per image: the image, the class token's attention averaged over heads, then each head
    (heat maps upsampled to the image's size)."""
    from matplotlib.figure import Figure  # here: importing matplotlib is slow, and only plotting needs it

    heads = attention.shape[1]
    maps = F.interpolate(attention.float().cpu(), size=images.shape[-2:], mode="nearest")
    figure = Figure(figsize=(1.6 * (heads + 2), 1.7 * len(images)), layout="constrained")
    grid = figure.subplots(len(images), heads + 2, squeeze=False)
    for row, (image, image_maps) in enumerate(zip(images, maps)):
        panels = [(image.permute(1, 2, 0).numpy(), "image"), (image_maps.mean(0).numpy(), "mean of heads")]
        panels += [(head_map.numpy(), f"head {head}") for head, head_map in enumerate(image_maps)]
        for axes, (picture, title) in zip(grid[row], panels):
            axes.imshow(picture, cmap=None if picture.ndim == 3 else "inferno")
            axes.set_title(title, fontsize="small")
            axes.axis("off")
    figure.suptitle("last block: attention of the class token over the patches")
    return figure


def neighbours_figure(
    queries: Tensor, neighbours: Tensor, similarities: Tensor, captions: Optional[list[list[str]]] = None
) -> "Figure":
    """One row per query image: the query, then its neighbours best first, each titled with its
    cosine similarity (and `captions[row][column]`, e.g. a class, when given; column 0 = query)."""
    from matplotlib.figure import Figure

    rows, k = similarities.shape
    figure = Figure(figsize=(1.5 * (k + 1), 1.7 * rows), layout="constrained")
    grid = figure.subplots(rows, k + 1, squeeze=False)
    for row in range(rows):
        pictures = [queries[row]] + list(neighbours[row])
        titles = ["query"] + [f"cos {value:.2f}" for value in similarities[row].tolist()]
        for column, (axes, picture, title) in enumerate(zip(grid[row], pictures, titles)):
            axes.imshow(picture.permute(1, 2, 0).numpy())
            caption = f"\n{captions[row][column]}" if captions else ""
            axes.set_title(title + caption, fontsize="small", color="tab:blue" if column == 0 else "black")
            axes.axis("off")
    figure.suptitle("nearest neighbours (cosine similarity of the embeddings)")
    return figure


def embedding_map_figure(
    layout: np.ndarray, method: str, labels: Optional[Tensor] = None, class_names: Optional[Sequence[str]] = None
) -> "Figure":
    """The 2-D layout as a scatter plot, coloured by class when `labels` are given."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 5.6), layout="constrained")
    axes = figure.add_subplot()
    if labels is None:
        axes.scatter(layout[:, 0], layout[:, 1], s=6, alpha=0.7)
    else:
        values = labels.cpu().numpy()
        for index, label in enumerate(np.unique(values)):
            chosen = values == label
            axes.scatter(layout[chosen, 0], layout[chosen, 1], s=6, alpha=0.7, color=f"C{index % 10}",
                         label=_class_name(int(label), class_names))
        axes.legend(fontsize="small", markerscale=2, title="class", loc="best")
    coloured = "coloured by class" if labels is not None else "no classes"
    axes.set(title=f"{method} of {len(layout)} embeddings ({coloured})", xlabel=f"{method} 1", ylabel=f"{method} 2")
    return figure


def save_figure(figure: "Figure", path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


# -- all of them at once ------------------------------------------------------------------------
def write_pictures(
    settings: PictureSettings,
    features: Tensor,
    dataset: Dataset,
    indices: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    out_dir: Path,
    labels: Optional[Tensor] = None,
    class_names: Optional[Sequence[str]] = None,
    backbone: Optional[nn.Module] = None,
) -> list[Path]:
    """Draw the pictures `settings` asks for into `out_dir`; return the files written.

    Row `i` of `features` (and of `labels`; None, or a single class, for none) is item `indices[i]`
    of `dataset`, whose items are `(normalised image, label)` with the `mean`/`std` given. The
    attention maps need the `backbone` (on the device it runs on) and are drawn for ViTs only.
    """
    if labels is not None and len(torch.unique(labels)) < 2:
        labels = None  # one class (or unlabelled images): nothing to colour or caption by
    generator = torch.Generator().manual_seed(settings.seed)
    picked = torch.randperm(len(features), generator=generator)
    written = []
    k = min(settings.k, len(features) - 1)
    if settings.queries > 0 and k > 0:
        query_rows = picked[: settings.queries]
        similarities, rows = nearest_neighbours(features, query_rows, k)
        def shown(rows_: Tensor) -> Tensor:
            return torch.stack([shown_images(dataset[int(indices[row])][0], mean, std) for row in rows_])

        captions = None if labels is None else [
            [_class_name(int(labels[row]), class_names) for row in [query, *neighbours]]
            for query, neighbours in zip(query_rows, rows)
        ]
        figure = neighbours_figure(
            shown(query_rows), torch.stack([shown(neighbours) for neighbours in rows]), similarities, captions
        )
        written.append(save_figure(figure, out_dir / NEIGHBOURS_FILE))
    if settings.map_points > 0 and len(features) >= 4:
        subset = torch.sort(picked[: settings.map_points]).values
        layout, method = embedding_2d(features[subset], settings.seed)
        figure = embedding_map_figure(layout, method, None if labels is None else labels[subset], class_names)
        written.append(save_figure(figure, out_dir / MAP_FILE))
    if settings.attention_images > 0 and backbone is not None and is_vit(backbone):
        chosen = [dataset[int(indices[row])][0] for row in picked[: settings.attention_images]]
        device = next(backbone.parameters()).device
        attention = cls_attention(backbone, torch.stack(chosen).to(device))
        figure = attention_figure(torch.stack([shown_images(image, mean, std) for image in chosen]), attention)
        written.append(save_figure(figure, out_dir / ATTENTION_FILE))
    return written


def _class_name(label: int, class_names: Optional[Sequence[str]]) -> str:
    return class_names[label] if class_names is not None else str(label)
