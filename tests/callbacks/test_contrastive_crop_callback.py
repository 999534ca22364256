"""ContrastiveCrop's callback parts without a training run: which backbone locates the objects,
the box rows of one process against boxes computed here, and a checkpoint restored before or
after `setup` created the store (the Lightning runs are in tests/data/test_contrastive_crop.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bam.callbacks import ContrastiveCrop
from bam.callbacks import contrastive_crop as contrastive_crop_callback
from bam.callbacks.contrastive_crop import local_box_rows, locating_backbone
from bam.data import CropBoxes
from bam.data.contrastive_crop import compute_boxes
from bam.models import build_backbone


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Identity()


def test_the_teacher_locates_else_the_student_else_the_modules_backbone():
    teacher, student, bare = Encoder(), Encoder(), nn.Linear(1, 1)
    assert locating_backbone(SimpleNamespace(teacher=teacher, student=student)) is teacher.backbone
    assert locating_backbone(SimpleNamespace(teacher=None, student=student)) is student.backbone
    assert locating_backbone(SimpleNamespace(student=student)) is student.backbone
    assert locating_backbone(SimpleNamespace(student=bare)) is bare  # an encoder without .backbone is one
    assert locating_backbone(SimpleNamespace(backbone=bare)) is bare
    assert locating_backbone(SimpleNamespace(teacher=None, student=None, backbone=bare)) is bare


def test_a_module_without_any_backbone_is_named():
    with pytest.raises(TypeError, match="^ContrastiveCrop cannot find a backbone on SimpleNamespace: expected a `teacher`"):
        locating_backbone(SimpleNamespace(teacher=None))


MEAN, STD = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)  # a different value per channel: the channel order shows


def test_box_rows_are_the_indices_and_the_boxes_of_the_normalised_images():
    torch.manual_seed(0)
    backbone = build_backbone("bam_cnn4", width=8).train()
    generator = torch.Generator().manual_seed(0)
    # many images: a box edge of one of them moves when the pixel scale is off by 1/255
    order = torch.randperm(64, generator=generator)
    batches = [(torch.randint(0, 256, (32, 3, 32, 32), generator=generator, dtype=torch.uint8), order[:32]),
               (torch.randint(0, 256, (32, 3, 32, 32), generator=generator, dtype=torch.uint8), order[32:])]
    rows = local_box_rows(backbone, batches, MEAN, STD, 0.3, torch.device("cpu"))
    assert backbone.training  # put back in the mode it was in

    backbone.eval()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        boxes = torch.cat([compute_boxes(backbone, (images.float() / 255 - mean) / std, 0.3) for images, _ in batches])
    assert rows.dtype == torch.float64 and rows.shape == (64, 5)
    assert rows[:, 0].tolist() == order.tolist()
    torch.testing.assert_close(rows[:, 1:], boxes.double())
    with torch.no_grad():
        off_scale = torch.cat([compute_boxes(backbone, (images.float() / 256 - mean) / std, 0.3) for images, _ in batches])
    assert not torch.equal(off_scale, boxes), "a wrong pixel scale would not show here"

    assert not local_box_rows(backbone.eval(), batches[:1], MEAN, STD, 0.3, torch.device("cpu")).isnan().any()
    assert not backbone.training


def test_a_process_without_images_has_no_rows():
    rows = local_box_rows(build_backbone("bam_cnn4", width=8), [], MEAN, STD, 0.1, torch.device("cpu"))
    assert rows.dtype == torch.float64 and rows.shape == (0, 5)


class BoxData:
    def __init__(self, num_images: int) -> None:
        self.store = CropBoxes(num_images)
        self.alpha = None

    def enable_contrastive_crop(self, alpha: float) -> CropBoxes:
        self.alpha = alpha
        return self.store


def _saved_state() -> dict:
    store = CropBoxes(3)
    store.update(torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.4, 0.9]]))
    return {**store.state_dict(), "updated_epochs": [20, 40]}


def test_a_checkpoint_loaded_before_setup_is_restored_by_setup():
    callback = ContrastiveCrop(enabled=True, alpha=0.8)
    callback.load_state_dict(_saved_state())
    assert callback.boxes is None
    data = BoxData(3)
    callback.setup(SimpleNamespace(datamodule=data), None, "fit")
    assert data.alpha == 0.8 and callback.boxes is data.store
    assert callback.updated_epochs == [20, 40]
    assert data.store.is_active and torch.equal(data.store.boxes, _saved_state()["boxes"])
    assert callback.state_dict()["updated_epochs"] == [20, 40]


def test_a_checkpoint_loaded_after_setup_is_restored_at_once():
    callback = ContrastiveCrop(enabled=True)
    data = BoxData(3)
    callback.setup(SimpleNamespace(datamodule=data), None, "fit")
    callback.load_state_dict(_saved_state())
    assert callback.updated_epochs == [20, 40] and torch.equal(data.store.boxes, _saved_state()["boxes"])


def test_a_state_without_boxes_or_record_keeps_the_store_and_records_nothing():
    callback = ContrastiveCrop(enabled=True)
    data = BoxData(3)
    callback.setup(SimpleNamespace(datamodule=data), None, "fit")
    callback.updated_epochs = [20]
    callback.load_state_dict({})  # e.g. the callback was off when the checkpoint was written
    assert callback.updated_epochs == [] and not data.store.is_active
    assert torch.equal(data.store.boxes, CropBoxes(3).boxes)
    callback.load_state_dict({"updated_epochs": [5]})
    assert callback.updated_epochs == [5] and not data.store.is_active


# ------------------------------------------------------------------ settings, the update epoch, the state
@pytest.mark.parametrize("settings", [dict(warmup_epochs=0), dict(box_thresh=0.0), dict(alpha=0.01), dict(loc_interval=1)])
def test_the_edges_of_the_settings_are_accepted(settings):
    ContrastiveCrop(**settings)


@pytest.mark.parametrize("settings, message", [
    (dict(warmup_epochs=-1), "need warmup_epochs >= 0 and loc_interval >= 1, got -1, 20"),
    (dict(loc_interval=0), "need warmup_epochs >= 0 and loc_interval >= 1, got 20, 0"),
    (dict(warmup_epochs=-1, loc_interval=5), "got -1, 5"),
    (dict(box_thresh=1.0), "need box_thresh in \\[0, 1\\) and alpha > 0, got 1.0, 0.6"),
    (dict(box_thresh=1.5), "got 1.5, 0.6"),
    (dict(box_thresh=-0.1), "got -0.1, 0.6"),
    (dict(alpha=0.0), "need box_thresh in \\[0, 1\\) and alpha > 0, got 0.1, 0.0"),
])
def test_impossible_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        ContrastiveCrop(**settings)


def test_defaults_are_off_with_the_imagenet_schedule():
    callback = ContrastiveCrop()
    assert (callback.enabled, callback.warmup_epochs, callback.loc_interval, callback.box_thresh, callback.alpha,
            callback.batch_size) == (False, 20, 20, 0.1, 0.6, None)
    assert ContrastiveCrop(batch_size=7).batch_size == 7
    assert callback.state_dict() == {"updated_epochs": []}


class LoggingModule:
    def __init__(self) -> None:
        self.logged = {}

    def log(self, name, value, sync_dist=False) -> None:
        self.logged[name] = value


def test_an_update_epoch_logs_the_mean_box_area(monkeypatch):
    messages = []
    monkeypatch.setattr(contrastive_crop_callback, "rank_zero_info", messages.append)
    callback = ContrastiveCrop(enabled=True, warmup_epochs=1, loc_interval=2)
    data = BoxData(3)
    callback.setup(SimpleNamespace(datamodule=data), None, "fit")
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.3, 0.1, 0.4, 0.9]])
    callback.update = lambda trainer, module: data.store.update(boxes)  # the heat maps are tested elsewhere
    module = LoggingModule()
    for epoch in range(4):
        callback.on_train_epoch_start(SimpleNamespace(current_epoch=epoch), module)
    area = ((0.4 * 0.4) + 1.0 + (0.1 * 0.8)) / 3  # width x height of each box, averaged
    assert callback.updated_epochs == [1, 3]
    assert module.logged["contrastive_crop/box_area"] == pytest.approx(area)
    assert messages[-1] == f"ContrastiveCrop: boxes of 3 images updated at epoch 3 (mean box area {area:.3f} of the image)"


def test_a_second_fit_with_the_same_callback_sets_up_again():
    callback = ContrastiveCrop(enabled=True)
    callback.load_state_dict(_saved_state())
    data = BoxData(3)
    callback.setup(SimpleNamespace(datamodule=data), None, "fit")
    callback.updated_epochs.append(60)
    callback.setup(SimpleNamespace(datamodule=data), None, "fit")  # the checkpoint is not restored twice
    assert callback.updated_epochs == [20, 40, 60]
