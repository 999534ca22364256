"""`keep_top_k` sparsifies over the columns (N, the last dimension), whatever the batch size: a
per-process batch smaller than k must not turn the sparsification off."""
from __future__ import annotations

import torch

from bam.losses import keep_top_k


def test_k_between_the_batch_size_and_the_number_of_columns_still_sparsifies():
    targets = torch.rand(2, 2, 6, generator=torch.Generator().manual_seed(0)).softmax(dim=-1)  # G=2, B=2, N=6
    sparse = keep_top_k(targets, 3)
    assert ((sparse > 0).sum(dim=-1) == 3).all()  # 3 of 6 columns kept for every image, B=2 < k
    kept = targets.sum(dim=0).topk(3, dim=-1).indices
    for image in range(2):
        expected = torch.zeros(6).index_fill_(0, kept[image], 1.0) * targets[:, image]
        torch.testing.assert_close(sparse[:, image], expected / expected.sum(dim=-1, keepdim=True))
    torch.testing.assert_close(targets.sum(dim=-1), torch.ones(2, 2))  # the input is left alone


def test_k_of_zero_or_at_least_n_keeps_every_column():
    targets = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(1)).softmax(dim=-1)
    for k in (0, 4, 9):
        torch.testing.assert_close(keep_top_k(targets, k), targets)


def test_k_of_one_keeps_each_images_strongest_column():
    targets = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(2)).softmax(dim=-1)
    strongest = targets.sum(dim=0).argmax(dim=-1)  # (B,): one column per image, over its G crops
    expected = torch.zeros_like(targets)
    expected[:, torch.arange(3), strongest] = 1.0
    torch.testing.assert_close(keep_top_k(targets, 1), expected)
