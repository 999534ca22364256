"""The objectives' settings at their limits: what is accepted, and the whole message of what is not;
and the target's `rows=` contract. The numbers themselves are checked against references in
test_loss_reference.py and test_swav.py."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

from bam.data.config import MultiCropConfig
from bam.losses import BAMLoss, BAMObjective, SwAVLoss, SwAVObjective, balanced_target, swapped_prediction, swav_codes, swav_loss
from bam.losses.dino_loss import DINOLoss


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=0.0), "reg=0.05 and temperature=0.0 must be positive"),
    (dict(reg=-1.0), "reg=-1.0 and temperature=0.1 must be positive"),
    (dict(sinkhorn_iterations=-1), "sinkhorn_iterations must be >= 0, got -1"),
    (dict(column_block_size=-2), "column_block_size must be >= 0 (0: not blocked), got -2"),
])
def test_bam_objective_names_the_setting_out_of_range(settings, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        BAMObjective(**settings)


@pytest.mark.parametrize("num_crops, num_global_crops, message", [
    (4, 5, "num_crops=4, num_global_crops=5: num_local_crops must be >= 0, got -1"),
    (4, 0, "num_crops=4, num_global_crops=0: num_global_crops must be at least 1, got 0"),
])
def test_crop_counts_out_of_range_are_named(num_crops, num_global_crops, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        BAMLoss(num_crops=num_crops, num_global_crops=num_global_crops)


def test_bam_objective_limits_that_are_allowed():
    assert BAMObjective(sinkhorn_iterations=0, column_block_size=0).sinkhorn_iterations == 0


def test_positive_masking_needs_two_images_and_two_are_enough():
    loss = BAMLoss(num_crops=2, num_global_crops=2, positive_masking=True)
    two_images = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    assert torch.isfinite(loss(two_images))
    message = ("positive masking needs at least 2 images in the global batch, got 1 per process x 1 processes; "
               "increase the batch size or set positive_masking=False")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        loss(two_images[:2])


def test_embeddings_not_made_of_whole_crops_are_explained():
    message = ("7 embedding rows are not divisible by num_crops=2; rows must be crop-major, num_crops blocks "
               "of B images each")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        BAMLoss(num_crops=2)(torch.randn(7, 8))


def test_target_rows_are_the_first_rows_of_the_whole_balanced_target():
    # rows= only cuts what is returned: every row still takes part in the balancing
    similarity = torch.randn(6, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = balanced_target(similarity, sinkhorn_iterations=3)
    first = balanced_target(similarity, sinkhorn_iterations=3, rows=4)
    assert first.shape == (4, 9)
    torch.testing.assert_close(first, whole[:4])
    assert not torch.allclose(first, balanced_target(similarity[:4], sinkhorn_iterations=3))


def test_swav_takes_two_prototypes_but_not_one():
    assert SwAVObjective(num_prototypes=2).num_prototypes == 2
    message = "num_prototypes=1: SwAV needs at least 2 prototypes to balance over"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        SwAVObjective(num_prototypes=1)


def test_swav_loss_raises_no_warning():
    # e.g. PyTorch warns on a softmax whose dimension is left implicit
    embeddings = torch.nn.functional.normalize(torch.randn(12, 8), dim=1)
    prototypes = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swav_loss(embeddings, prototypes, num_crops=3, num_global_crops=2)
        SwAVLoss(dim=8, num_crops=3, num_prototypes=5)(embeddings)


def test_swav_codes_of_half_precision_scores_are_computed_in_float32():
    # scores / reg in bfloat16 would lose ~3 significant digits before the Sinkhorn
    scores = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    codes = swav_codes(scores, reg=0.05)
    assert codes.dtype == torch.float32
    assert torch.equal(codes, swav_codes(scores.float(), reg=0.05))


def test_swav_loss_defaults_to_two_global_crops():
    embeddings = torch.nn.functional.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    prototypes = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    default = swav_loss(embeddings, prototypes, num_crops=4)
    assert torch.equal(default, swav_loss(embeddings, prototypes, num_crops=4, num_global_crops=2))
    assert not torch.equal(default, swav_loss(embeddings, prototypes, num_crops=4, num_global_crops=3))


def test_swav_loss_of_half_precision_embeddings_is_computed_in_float32():
    embeddings = torch.randn(12, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    prototypes = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(4)), dim=1)
    loss = swav_loss(embeddings, prototypes, num_crops=3)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, swav_loss(embeddings.float(), prototypes, num_crops=3))


def test_swav_loss_uses_the_temperature_it_is_given():
    # against the three steps put together here: normalise, a Sinkhorn per global crop, swapped prediction
    embeddings = torch.randn(12, 8, generator=torch.Generator().manual_seed(5))
    prototypes = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(6)), dim=1)
    scores = torch.nn.functional.normalize(embeddings, dim=1) @ prototypes.T
    codes = torch.stack([swav_codes(scores[crop * 4 : (crop + 1) * 4]) for crop in range(2)])
    expected = swapped_prediction(scores, codes, temperature=0.5)
    torch.testing.assert_close(swav_loss(embeddings, prototypes, num_crops=3, temperature=0.5), expected)
    assert not torch.allclose(swav_loss(embeddings, prototypes, num_crops=3), expected)


@pytest.mark.parametrize("make", [
    lambda: MultiCropConfig(num_global_crops=2, num_local_crops=-1),
    lambda: BAMLoss(num_crops=1, num_global_crops=2),
    lambda: SwAVLoss(num_crops=1, num_global_crops=2),
    lambda: DINOLoss(8, num_crops=1, num_global_crops=2),
])
def test_every_owner_of_crop_counts_refuses_negative_local_crops_alike(make):
    """The data recipe and each objective check crop counts through one function, so one mistake
    reads the same wherever it is set."""
    with pytest.raises(ValueError, match=r"num_local_crops must be >= 0, got -1$"):
        make()
