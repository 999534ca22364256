"""The state-dict primitives every checkpoint reader uses: choosing the encoder, and the messages
that say which keys do not fit. Whole messages are compared: they are what users act on."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bam.io.state import CheckpointFormatError, CheckpointMismatchError, load_state_strict, select_encoder


def test_an_unknown_encoder_name_is_refused_with_the_choices():
    with pytest.raises(ValueError) as error:
        select_encoder({"teacher.backbone.w": torch.ones(1)}, encoder="ema")
    assert str(error.value) == "encoder must be one of ('teacher', 'student') or None, got 'ema'"


def test_a_missing_encoder_names_what_was_wanted_and_found_and_lists_at_most_eight_keys():
    state = {f"head.w{index}": torch.ones(1) for index in range(10)}
    with pytest.raises(CheckpointFormatError) as error:
        select_encoder(state)
    listed = ", ".join(sorted(state)[:8])
    assert str(error.value) == (
        "the checkpoint has no teacher or student backbone weights (encoders found: none); "
        f"its keys look like: {listed}, ... (+2 more)")
    with pytest.raises(CheckpointFormatError) as error:
        select_encoder({"student.backbone.w": torch.ones(1)}, encoder="teacher")
    assert str(error.value) == (
        "the checkpoint has no teacher backbone weights (encoders found: ['student']); "
        "its keys look like: student.backbone.w")


class Classifier(nn.Module):
    """A timm-like model: `get_classifier` returns the `head` module."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 2)
        self.head = nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head


def test_a_mismatch_lists_each_kind_with_counts_and_says_what_to_do():
    model = nn.Linear(2, 2)
    state = {"weight": torch.ones(3, 2), "extra": torch.ones(1)}
    with pytest.raises(CheckpointMismatchError) as error:
        load_state_strict(model, state, "toy")
    assert str(error.value) == (
        "the checkpoint's backbone weights do not fit architecture 'toy':\n"
        "  1 missing (in the model, not in the file): bias\n"
        "  1 unexpected (in the file, not in the model): extra\n"
        "  1 shape mismatch: weight (file (3, 2), model (2, 2))\n"
        "Load it as the architecture that wrote it (arch= / --arch).")


def test_classifier_weights_are_dropped_with_a_warning_and_a_model_without_classifier_keeps_all():
    model = Classifier()
    state = {**model.state_dict(), "head.weight": torch.ones(10, 2), "head.bias": torch.ones(10)}
    with pytest.warns(UserWarning, match=r"^ignoring 2 classifier weights \(head.weight, head.bias\): bam loads"):
        load_state_strict(model, state, "toy")
    with pytest.raises(CheckpointMismatchError, match="1 unexpected .*: head.weight"):
        load_state_strict(nn.Sequential(nn.Linear(2, 2)), {"0.weight": torch.ones(2, 2), "0.bias": torch.ones(2),
                                                          "head.weight": torch.ones(1)}, "toy")


@pytest.mark.parametrize(("count", "tail"), [(8, ""), (9, ", ... (+1 more)")])
def test_a_listing_says_how_many_keys_it_left_out_only_when_it_left_some(count, tail):
    state = {f"k{index}": torch.ones(1) for index in range(count)}
    with pytest.raises(CheckpointFormatError) as error:
        select_encoder(state)
    assert str(error.value).endswith(", ".join(sorted(state)[:8]) + tail)


class _NoHead(nn.Module):
    """A timm-style model whose `get_classifier()` names no module of its own (it has no head)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 3)

    def get_classifier(self) -> None:
        return None


def test_a_model_without_a_registered_classifier_loads_all_its_keys():
    model = _NoHead()
    state = {name: torch.full_like(value, 0.5) for name, value in model.state_dict().items()}
    load_state_strict(model, state, "no_head")
    assert all(torch.equal(value, torch.full_like(value, 0.5)) for value in model.state_dict().values())
