"""`bam.features.knn` against a weighted k-NN written here in float64, on features that are not
normalised, with several query chunks and a temperature and k that change which class wins."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bam.features.knn import knn_accuracy, knn_class_scores, topk_accuracy


def reference_scores(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                     k: int, temperature: float) -> torch.Tensor:
    """Vote totals: each of the k most cosine-similar bank rows adds exp(similarity / T) to its class."""
    query, bank = F.normalize(query.double(), dim=1), F.normalize(bank.double(), dim=1)
    totals = torch.zeros(len(query), num_classes, dtype=torch.float64)
    for row, similarities in enumerate(query @ bank.T):
        for neighbour in similarities.argsort(descending=True)[: min(k, len(bank))]:
            totals[row, bank_labels[neighbour]] += torch.exp(similarities[neighbour] / temperature)
    return totals


def _reference_accuracy(bank, labels, query, query_labels, classes, k, temperature):
    """Top-1/top-5 accuracy (percent) of the reference votes."""
    ranked = reference_scores(query, bank, labels, classes, k, temperature).argsort(dim=1, descending=True)
    hits = ranked == query_labels.unsqueeze(1)
    return {top: 100.0 * hits[:, :top].any(dim=1).double().mean().item() for top in (1, 5)}


def random_problem(seed: int = 0, bank_size: int = 40, queries: int = 13, classes: int = 5):
    generator = torch.Generator().manual_seed(seed)
    # scaled rows: a version that forgot to normalise would rank by dot product, not cosine
    scale = torch.rand(bank_size, 1, generator=generator) * 10 + 0.1
    bank = torch.randn(bank_size, 8, generator=generator) * scale
    query = torch.randn(queries, 8, generator=generator) * 3
    labels = torch.randint(0, classes, (bank_size,), generator=generator)
    return query, bank, labels, classes


@pytest.mark.parametrize("k, temperature", [(20, 0.07), (3, 0.5), (1, 1.0)])
def test_vote_totals_match_a_float64_reference_across_chunks(k, temperature):
    query, bank, labels, classes = random_problem()
    scores = knn_class_scores(query, bank, labels, classes, k=k, temperature=temperature, chunk_size=4)
    expected = reference_scores(query, bank, labels, classes, k, temperature)
    assert scores.shape == (len(query), classes)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)


def test_k_above_the_bank_size_uses_the_whole_bank():
    query, bank, labels, classes = random_problem(bank_size=6)
    scores = knn_class_scores(query, bank, labels, classes, k=20, temperature=0.3)
    torch.testing.assert_close(scores.double(), reference_scores(query, bank, labels, classes, 6, 0.3),
                               rtol=1e-4, atol=1e-6)


def test_topk_accuracy_counts_a_label_within_the_k_highest_scores():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.0],   # ranking 1, 2, 0, 3
                           [0.8, 0.1, 0.2, 0.3],   # ranking 0, 3, 2, 1
                           [0.2, 0.3, 0.4, 0.1]])  # ranking 2, 1, 0, 3
    labels = torch.tensor([2, 0, 3])
    accuracy = topk_accuracy(scores, labels, ks=(1, 2, 3, 10))
    assert accuracy == pytest.approx({1: 100 / 3, 2: 200 / 3, 3: 200 / 3, 10: 100.0})


def test_knn_accuracy_is_the_top1_top5_of_the_reference_votes():
    query, bank, labels, classes = random_problem(seed=3, bank_size=60, queries=30, classes=7)
    generator = torch.Generator().manual_seed(4)
    query_labels = torch.randint(0, classes, (len(query),), generator=generator)
    result = knn_accuracy(bank, labels, query, query_labels, k=5, temperature=0.2)
    assert result == pytest.approx(_reference_accuracy(bank, labels, query, query_labels, classes, 5, 0.2))
    assert result[1] < result[5] < 100, "the data must make top-1 and top-5 differ"


def test_knn_accuracy_counts_classes_that_only_the_queries_have():
    """A query label above every bank label still needs a score column (never a hit)."""
    bank = torch.eye(3)
    result = knn_accuracy(bank, torch.tensor([0, 1, 2]), torch.eye(3)[:2], torch.tensor([0, 3]), k=1)
    assert result[1] == pytest.approx(50.0)


# a draw on which k=21 or T=1.07 give other accuracies than k=20, T=0.07 (the test asserts it)
SETTINGS_SEED = 4


def test_knn_accuracy_defaults_are_the_authors_k20_and_t007():
    query, bank, labels, classes = random_problem(seed=SETTINGS_SEED, bank_size=80, queries=200, classes=9)
    query_labels = torch.randint(0, classes, (len(query),), generator=torch.Generator().manual_seed(5))
    result = knn_accuracy(bank, labels, query, query_labels)
    assert result == pytest.approx(_reference_accuracy(bank, labels, query, query_labels, classes, 20, 0.07))
    for k, temperature in ((21, 0.07), (20, 1.07)):
        other = _reference_accuracy(bank, labels, query, query_labels, classes, k, temperature)
        assert other != pytest.approx(result), f"k={k}, T={temperature} give the same accuracies on this data"
