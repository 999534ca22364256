"""Weighted k-nearest-neighbour classification of L2-normalised features (authors' protocol:
k=20, temperature 0.07, each neighbour votes for its class with weight exp(similarity / T))."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_class_scores(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Return `(Q, num_classes)` vote totals; queries are processed in chunks so that only a
    `(chunk_size, len(bank))` similarity block exists at a time."""
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, query.shape[0], chunk_size):
        chunk = F.normalize(query[start : start + chunk_size].float(), dim=1)
        similarity, index = (chunk @ bank.T).topk(k, dim=1)
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        votes.scatter_add_(1, bank_labels[index], (similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Percentage of rows whose label is among the `k` highest scores, for each `k`."""
    ranked = scores.argsort(dim=1, descending=True)
    hits = ranked == labels.unsqueeze(1)
    return {k: 100.0 * hits[:, : min(k, scores.shape[1])].any(dim=1).float().mean().item() for k in ks}


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[int, float]:
    """Top-1 and top-5 k-NN accuracy (percent) of `test` against the `train` bank."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_class_scores(test_features, train_features, train_labels, num_classes, k, temperature)
    return topk_accuracy(scores, test_labels)
