"""ContrastiveCrop: heat maps -> boxes on constructed images, crops around the boxes on both
augmentation paths (and plain crops before the first update), shared boxes in DataLoader workers,
the distributed update, the schedule in a Lightning run, and checkpoint round trips."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import yaml
from torch import nn

from bam.callbacks import ContrastiveCrop
from bam.callbacks.contrastive_crop import local_box_rows
from bam.data import BuiltinDataModule, CPUMultiCrop, CropBoxes, DeviceMultiCrop, MultiCropConfig
from bam.data.augment_ops import sample_crop_boxes
from bam.data.contrastive_crop import _patch_grid, compute_boxes, heatmap, heatmap_boxes
from bam.losses import BAMObjective
from bam.methods import BAMModule
from bam.models import build_backbone
from bam.ops.distributed import gather_rows
from ffcv_check import require_ffcv
from tiny_runs import spawn_gloo_workers

from test_data_augment import GEOMETRY_ONLY, _geometry_stats, _ks, _ks_threshold, _ramp_image
from repo_paths import REPO



pytestmark = pytest.mark.usefixtures("one_thread")


# -- heat maps and boxes -----------------------------------------------------------------------
class ImageAsFeatures(nn.Module):
    """A 'CNN' whose last feature map is its input: the heat map is the image's channel sum."""

    num_features = 3

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _object_image(size: int = 32, box: tuple[int, int, int, int] = (12, 8, 28, 20)) -> torch.Tensor:
    """uint8 flat dark background with a bright textured object in the pixel box x0, y0, x1, y1."""
    image = torch.full((3, size, size), 20, dtype=torch.uint8)
    x0, y0, x1, y1 = box
    texture = torch.randint(180, 256, (3, y1 - y0, x1 - x0), generator=torch.Generator().manual_seed(0))
    image[:, y0:y1, x0:x1] = texture.to(torch.uint8)
    return image


def test_boxes_cover_the_salient_object():
    images = torch.stack([_object_image(), _object_image(box=(0, 0, 10, 32)), _object_image(box=(5, 20, 31, 31))])
    boxes = compute_boxes(ImageAsFeatures(), images.float() / 255, thresh=0.1)
    expected = torch.tensor([[12, 8, 28, 20], [0, 0, 10, 32], [5, 20, 31, 31]]) / 32
    torch.testing.assert_close(boxes, expected)


def test_low_resolution_maps_are_upsampled_before_thresholding():
    maps = torch.zeros(1, 4, 4)
    maps[0, 1:3, 1:3] = 1.0  # the centre quarter of a 4x4 grid
    box = heatmap_boxes(maps, (64, 64), thresh=0.5)[0]
    assert 0.2 < box[0] < 0.3 and 0.7 < box[2] < 0.8 and torch.equal(box[:2], box[[1, 0]])  # near 16/64 .. 48/64


def test_threshold_must_lie_in_the_unit_interval():
    assert heatmap_boxes(torch.ones(1, 3, 3), (9, 9), 0.0).tolist() == [[0.0, 0.0, 1.0, 1.0]]
    with pytest.raises(ValueError, match=re.escape("box_thresh must be in [0, 1), got 1.0")):
        heatmap_boxes(torch.ones(1, 3, 3), (9, 9), 1.0)


def test_patch_grid_of_padded_and_of_plain_patch_embeddings():
    # timm's embedding reports its own grid (a padded one rounds up); one that cannot is counted
    # in whole patches
    padded = build_backbone("vit_tiny_patch16_224", img_size=64, dynamic_img_pad=True, depth=1)
    assert _patch_grid(padded, torch.zeros(1, 3, 40, 56)) == (3, 4)
    plain = SimpleNamespace(patch_embed=SimpleNamespace(patch_size=(8, 8)))
    grid = _patch_grid(plain, torch.zeros(1, 3, 36, 20))
    assert grid == (4, 2) and all(type(side) is int for side in grid)


def test_flat_heat_map_gives_the_whole_image():
    assert heatmap_boxes(torch.ones(2, 3, 3), (9, 9), 0.1).tolist() == [[0.0, 0.0, 1.0, 1.0]] * 2


@pytest.mark.parametrize(
    "name, kwargs, size, grid",
    [
        ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32, (4, 4)),
        ("bam_vit_small_patch16_224", dict(depth=2), 48, (3, 3)),  # 12 heads, dynamic size, fused attention
        ("resnet18", {}, 64, (2, 2)),
        ("mobilenetv3_small_050", {}, 64, (2, 2)),  # a CNN whose stages are called `blocks`, as a ViT's
        ("bam_cnn4", dict(width=8), 28, (4, 4)),
        ("caformer_s18", {}, 64, (2, 2)),
        ("bam_caformer_m36", {}, 64, (2, 2)),
    ],
)
def test_real_backbones_give_the_boxes_of_their_saliency(name, kwargs, size, grid):
    """Map and boxes against a reference computed here: the class-token attention of the unfused
    path (ViTs) or the channel sum of the last feature map, thresholded pixel by pixel."""
    torch.manual_seed(0)
    model = build_backbone(name, **kwargs).eval()
    images = torch.randn(3, 3, size, size)
    maps = heatmap(model, images)
    assert maps.shape == (3, *grid)
    expected_maps = _reference_saliency(model, images)
    torch.testing.assert_close(maps, expected_maps, atol=1e-5, rtol=1e-4)
    # a high threshold: with 2x2 maps, 0.5 still takes in the whole image
    boxes = compute_boxes(model, images, 0.8)
    torch.testing.assert_close(boxes, _reference_boxes(expected_maps, (size, size), 0.8))
    assert (boxes != torch.tensor([0.0, 0.0, 1.0, 1.0])).any(), "every box is the whole image: the check sees nothing"


@torch.no_grad()
def _reference_saliency(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    if not hasattr(model, "cls_token"):  # the ViTs here have a class token; CNNs may have `blocks`
        return model.forward_features(images).float().sum(dim=1)
    attn = model.blocks[-1].attn
    recorded = []
    attn.fused_attn = False  # the explicit softmax(q k^T) path, whose probabilities attn_drop sees
    handle = attn.attn_drop.register_forward_hook(lambda _m, _i, out: recorded.append(out))
    try:
        model.forward_features(images)
    finally:
        handle.remove()
    prefix = getattr(model, "num_prefix_tokens", 1)
    side = int(round((recorded[-1].shape[-1] - prefix) ** 0.5))
    return recorded[-1][:, :, 0, prefix:].mean(dim=1).reshape(len(images), side, side)


def _reference_boxes(maps: torch.Tensor, image_size: tuple[int, int], thresh: float) -> torch.Tensor:
    """Bounding box (fractions of the image) of the pixels whose upsampled, min-max scaled map is >= thresh."""
    upsampled = nn.functional.interpolate(maps.unsqueeze(1), size=image_size, mode="bilinear", align_corners=False)
    boxes = []
    for pixels in upsampled[:, 0]:
        scaled = (pixels - pixels.min()) / (pixels.max() - pixels.min())
        rows, columns = (scaled >= thresh).nonzero(as_tuple=True)
        height, width = image_size
        boxes.append([columns.min() / width, rows.min() / height,
                      (columns.max() + 1) / width, (rows.max() + 1) / height])
    return torch.tensor(boxes)


def test_vit_maps_images_that_are_not_whole_patches_at_the_resized_grid():
    """A base square of 40 px with 16-px patches (a user's `base_size`) is mapped at 32 px."""
    torch.manual_seed(0)
    model = build_backbone("bam_vit_small_patch16_224", depth=2).eval()
    images = torch.randn(2, 3, 40, 40)
    resized = nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(heatmap(model, images), heatmap(model, resized))
    assert heatmap(model, images).shape == (2, 2, 2)


def test_vit_attention_is_the_real_class_token_attention():
    """Recomputed from qkv, the map equals the attention matrix of the unfused path."""
    torch.manual_seed(0)
    model = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    images = torch.randn(2, 3, 32, 32)
    attn = model.blocks[-1].attn
    recorded = []
    attn.fused_attn = False
    attn.attn_drop.register_forward_hook(lambda _m, _i, out: recorded.append(out))
    model.forward_features(images)
    expected = recorded[-1][:, :, 0, 1:].mean(1).reshape(2, 4, 4)
    torch.testing.assert_close(heatmap(model, images), expected, atol=1e-6, rtol=1e-5)


def test_unsupported_backbone_names_its_class():
    class Tokens(nn.Module):
        def forward_features(self, x):
            return x.flatten(2).transpose(1, 2)

    with pytest.raises(TypeError, match="Tokens.*supported"):
        heatmap(Tokens(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(TypeError, match="Linear.*forward_features"):
        heatmap(nn.Linear(2, 2), torch.zeros(1, 3, 8, 8))


# -- crop sampling ------------------------------------------------------------------------------
def test_whole_image_uniform_region_is_random_resized_crop():
    """Whole-image regions with alpha = 1 draw the same boxes (in distribution) as no regions."""
    n, height, width = 4000, 24, 40
    torch.manual_seed(0)
    plain = sample_crop_boxes(n, height, width, (0.05, 0.4), (3 / 4, 4 / 3))
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(n, 1)
    regioned = sample_crop_boxes(n, height, width, (0.05, 0.4), (3 / 4, 4 / 3), regions=whole, alpha=1.0)
    for column in range(4):
        assert _ks(plain[:, column], regioned[:, column]) < _ks_threshold(n, n), column


def test_crop_centres_fall_in_the_box():
    n, size = 4000, 64
    region = torch.tensor([[0.5, 0.25, 0.875, 0.5]]).repeat(n, 1)  # x 32..56, y 16..32
    torch.manual_seed(0)
    boxes = sample_crop_boxes(n, size, size, (0.05, 0.25), (3 / 4, 4 / 3), regions=region, alpha=0.6)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= size).all()
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    inside = (cx >= 32 - 1) & (cx <= 56 + 1) & (cy >= 16 - 1) & (cy <= 32 + 1)
    assert inside.float().mean() > 0.97
    # Beta(0.6, 0.6) is U-shaped: more centres near the box's edges than with uniform centres
    uniform = sample_crop_boxes(n, size, size, (0.05, 0.25), (3 / 4, 4 / 3), regions=region, alpha=1.0)
    near_edges = lambda b: (((b[:, 0] + b[:, 2]) / 2 - 44).abs() > 8).float().mean()  # noqa: E731
    assert near_edges(boxes) > near_edges(uniform) + 0.05
    # with plain crops, the centres are spread over the whole image
    plain = sample_crop_boxes(n, size, size, (0.05, 0.25), (3 / 4, 4 / 3))
    pcx, pcy = (plain[:, 0] + plain[:, 2]) / 2, (plain[:, 1] + plain[:, 3]) / 2
    assert ((pcx >= 31) & (pcx <= 57) & (pcy >= 15) & (pcy <= 33)).float().mean() < 0.25


N_VIEWS = 1200
CROPS = MultiCropConfig(num_global_crops=1, global_size=24, num_local_crops=1, local_size=12, **GEOMETRY_ONLY)
REGION = torch.tensor([0.55, 0.1, 0.95, 0.45])


def _store(region: torch.Tensor | None, count: int = 1) -> CropBoxes:
    store = CropBoxes(count)
    if region is not None:
        store.update(region.repeat(count, 1))
    return store


def _cpu_views_with_boxes(store: CropBoxes, image: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(0)
    cpu = CPUMultiCrop(CROPS, store, alpha=0.6)
    return [torch.stack(view) for view in zip(*(cpu(image, 0) for _ in range(N_VIEWS)))]


def _device_views_with_boxes(region: torch.Tensor | None, image: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(1)
    regions = None if region is None else region.repeat(N_VIEWS, 1)
    return DeviceMultiCrop(CROPS, alpha=0.6)(image.expand(N_VIEWS, -1, -1, -1), regions)


def _smoothed(values: torch.Tensor) -> torch.Tensor:
    """``values`` plus seeded uniform noise of +-1 ramp pixel (1/32).

    Crops around a box take few distinct positions, so a statistic has large atoms, and the two
    resize filters (torchvision's antialiasing, roi_align's area average) move an atom by ~1e-3:
    enough for the raw KS statistic to see two atoms where there is one. Equal distributions stay
    equal after adding the same independent noise to both; a real difference (a pixel or more)
    does not vanish.
    """
    noise = torch.rand(values.shape, generator=torch.Generator().manual_seed(len(values)))
    return values + (2 * noise - 1) / 32


def test_paths_agree_in_distribution_with_boxes_on():
    image = _ramp_image(32)
    cpu_views = _cpu_views_with_boxes(_store(REGION), image)
    device_views = _device_views_with_boxes(REGION, image)
    threshold = _ks_threshold(N_VIEWS, N_VIEWS)
    for cpu_view, device_view in zip(cpu_views, device_views):
        cpu_stats, device_stats = _geometry_stats(cpu_view), _geometry_stats(device_view)
        for name in ("centre_x", "centre_y", "area"):
            assert _ks(_smoothed(cpu_stats[name]), _smoothed(device_stats[name])) < threshold, name
        # the ramp's red channel is x / 32: crop centres sit in the box's x range 0.55..0.95
        centre_x = cpu_stats["centre_x"]
        assert ((centre_x > 0.5) & (centre_x < 1.0)).float().mean() > 0.9


def test_before_the_first_update_crops_are_plain():
    image = _ramp_image(32)
    store = _store(None)
    assert store.lookup(0) is None and not store.is_active
    cpu_views = _cpu_views_with_boxes(store, image)
    plain_views = _device_views_with_boxes(None, image)
    for cpu_view, plain_view in zip(cpu_views, plain_views):
        for name in ("centre_x", "centre_y", "area"):
            assert _ks(_geometry_stats(cpu_view)[name], _geometry_stats(plain_view)[name]) < _ks_threshold(N_VIEWS, N_VIEWS)


def test_cpu_path_needs_the_index():
    message = ("CPUMultiCrop with ContrastiveCrop boxes needs the image's dataset index: "
               "multicrop(image, index)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        CPUMultiCrop(CROPS, _store(REGION))(_ramp_image(32))


def test_box_updates_take_any_float_dtype_for_some_or_all_rows():
    # heat maps computed in float64 (or half precision) write into the float32 store all the same
    store = CropBoxes(4)
    store.update(torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 0.5, 0.5]], dtype=torch.float64),
                 torch.tensor([3, 1], dtype=torch.int32))
    expected = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.5, 0.6]])
    assert torch.equal(store.lookup(torch.arange(4)), expected)
    store.update(torch.zeros(4, 4, dtype=torch.float16) + 0.5)
    assert store.boxes.dtype == torch.float32 and torch.equal(store.lookup(2), torch.full((4,), 0.5))


# -- data modules ---------------------------------------------------------------------------------
def _synthetic(augment_on: str, num_workers: int = 0, **kwargs) -> BuiltinDataModule:
    crops = MultiCropConfig(global_size=16, local_size=8, num_local_crops=2, **GEOMETRY_ONLY)
    return BuiltinDataModule("synthetic", options=dict(num_classes=4, image_size=32, train_size=32, val_size=8),
                             augment_on=augment_on, crops=crops, batch_size=8, num_workers=num_workers, **kwargs)


def test_device_path_batches_carry_indices_and_become_views():
    module = _synthetic("device")
    store = module.enable_contrastive_crop(alpha=0.6)
    images, labels, indices = next(iter(module.train_dataloader()))
    assert sorted(indices.tolist()) == indices.unique().tolist() and len(indices) == 8
    assert torch.equal(images, module.train_source.images[indices])  # row i is dataset image indices[i]
    store.update(torch.tensor([[0.0, 0.0, 0.25, 0.25]]).repeat(len(store), 1))
    views, out_labels, out_indices = module.on_after_batch_transfer((images, labels, indices), 0)
    assert torch.equal(out_labels, labels) and torch.equal(out_indices, indices) and [v.shape[-1] for v in views] == [16, 16, 8, 8]


def test_persistent_workers_see_box_updates():
    """The store lives in shared memory: workers started before an update crop with the new boxes."""
    module = _synthetic("cpu", num_workers=1)
    ramp = _ramp_image(32)
    module.setup()
    module.train_source.images[:] = ramp  # every image the ramp: a view's red level tells its x
    store = module.enable_contrastive_crop(alpha=0.6)
    loader = module.train_dataloader()
    assert loader.persistent_workers

    def mean_centre_x() -> float:
        return torch.cat([views[2][:, 0].mean(dim=(1, 2)) for views, _, _ in loader]).mean().item()

    before = mean_centre_x()  # starts the worker; plain crops: centred on average
    store.update(torch.tensor([[0.0, 0.0, 0.2, 1.0]]).repeat(len(store), 1))
    left = mean_centre_x()
    store.update(torch.tensor([[0.8, 0.0, 1.0, 1.0]]).repeat(len(store), 1))
    right = mean_centre_x()
    assert 0.4 < before < 0.6 and left < 0.25 and right > 0.75, (before, left, right)


def test_heatmap_batches_shard_the_training_set():
    module = _synthetic("cpu")
    shards = [torch.cat([idx for _, idx in module.heatmap_batches(5, rank, 3)]) for rank in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(32))
    images, indices = next(iter(module.heatmap_batches(4)))
    assert torch.equal(images, module.train_source.images[indices])  # unaugmented uint8


# -- distributed box update ----------------------------------------------------------------------
def _update_boxes(rank: int, world: int) -> torch.Tensor:
    """The callback's update on this process's shard, gathered: all boxes, seeded model and data."""
    torch.manual_seed(0)
    backbone = build_backbone("bam_cnn4", width=8)
    module = _synthetic("device")
    rows = local_box_rows(backbone, module.heatmap_batches(5, rank, world), module.crops.mean, module.crops.std,
                          0.1, torch.device("cpu"))
    everything = gather_rows(rows)
    store = CropBoxes(module.training_set_size())
    store.update(everything[:, 1:].float(), everything[:, 0].long())
    return store.boxes.clone()


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_update_boxes(rank, world), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_processes_compute_the_same_boxes_as_one(tmp_path):
    spawn_gloo_workers(_worker, 2, tmp_path)
    reference = _update_boxes(0, 1)
    assert not torch.equal(reference, CropBoxes(len(reference)).boxes)  # not all whole images
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), reference, atol=1e-6, rtol=0)


# -- Lightning: schedule and checkpoints ---------------------------------------------------------
def _method() -> BAMModule:
    return BAMModule(backbone="bam_cnn4", backbone_kwargs=dict(width=8), projector=dict(hidden_dim=32, out_dim=16, num_layers=2),
                     num_global_crops=2, num_local_crops=2, objective=BAMObjective(top_k=0), lr=1e-3, warmup_epochs=0,
                     momentum_teacher=True, stuck_loss_patience=0)


def _trainer(tmp_path: Path, max_epochs: int, callback: ContrastiveCrop) -> pl.Trainer:
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=-1,
                                              every_n_epochs=1)
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, callbacks=[callback, checkpoint],
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_training_updates_boxes_on_the_configured_epochs(tmp_path, augment_on):
    torch.manual_seed(0)
    callback = ContrastiveCrop(enabled=True, warmup_epochs=1, loc_interval=2)
    seen_active = []

    class Watch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen_active.append(callback.boxes.is_active)

    trainer = _trainer(tmp_path, 4, callback)
    trainer.callbacks.append(Watch())
    trainer.fit(_method(), datamodule=_synthetic(augment_on))
    assert callback.updated_epochs == [1, 3]
    assert seen_active == [False, True, True, True]
    assert "contrastive_crop/box_area" in trainer.logged_metrics


def test_disabled_callback_changes_nothing(tmp_path):
    callback = ContrastiveCrop()
    module = _synthetic("device")
    _trainer(tmp_path, 1, callback).fit(_method(), datamodule=module)
    assert callback.boxes is None and module.crop_boxes is None and callback.updated_epochs == []


def test_resumed_run_restores_the_boxes(tmp_path):
    torch.manual_seed(0)
    first = ContrastiveCrop(enabled=True, warmup_epochs=1, loc_interval=5)
    _trainer(tmp_path, 2, first).fit(_method(), datamodule=_synthetic("cpu"))
    saved = first.boxes.boxes.clone()
    assert first.updated_epochs == [1] and first.boxes.is_active

    resumed = ContrastiveCrop(enabled=True, warmup_epochs=1, loc_interval=5)
    module = _synthetic("cpu")
    _trainer(tmp_path, 3, resumed).fit(_method(), datamodule=module, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert resumed.updated_epochs == [1]  # epoch 2 is no update epoch: the boxes are the restored ones
    assert torch.equal(resumed.boxes.boxes, saved) and resumed.boxes.is_active
    assert module.crop_boxes is resumed.boxes


def test_resume_before_an_update_epoch_computes_the_uninterrupted_boxes(tmp_path):
    """Boxes depend only on the teacher at the update: resuming from the checkpoint of epoch 0
    recomputes at epoch 1 exactly the boxes of the run that was never stopped; the boxes and the
    update record are in the checkpoint."""
    torch.manual_seed(0)
    whole = ContrastiveCrop(enabled=True, warmup_epochs=1, loc_interval=1)
    _trainer(tmp_path / "whole", 2, whole).fit(_method(), datamodule=_synthetic("device"))
    state = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=False)
    stored = next(value for key, value in state["callbacks"].items() if "ContrastiveCrop" in key)
    assert stored["updated_epochs"] == [1] and torch.equal(stored["boxes"], whole.boxes.boxes)

    epoch0 = next((tmp_path / "whole" / "checkpoints").glob("epoch=0-*.ckpt"))
    resumed = ContrastiveCrop(enabled=True, warmup_epochs=1, loc_interval=1)
    _trainer(tmp_path / "resumed", 2, resumed).fit(_method(), datamodule=_synthetic("device"), ckpt_path=str(epoch0))
    assert resumed.updated_epochs == [1]
    torch.testing.assert_close(resumed.boxes.boxes, whole.boxes.boxes, atol=0, rtol=0)


def test_callback_rejects_foreign_data_modules(tmp_path, tiny_data):
    with pytest.raises(TypeError, match="TinyCropsDataModule"):
        _trainer(tmp_path, 1, ContrastiveCrop(enabled=True)).fit(_method(), datamodule=tiny_data)


def test_store_rejects_a_checkpoint_of_another_dataset():
    with pytest.raises(ValueError, match="same data"):
        CropBoxes(4).load_state_dict(CropBoxes(5).state_dict())


# -- configuration ---------------------------------------------------------------------------------
def test_recipes_turn_it_on_and_demo_leaves_it_off(capsys):
    from bam.cli import main as bam_main

    for name in ("vit_small_patch16", "vit_base_patch16", "caformer_m36", "resnet50"):
        group = yaml.safe_load((REPO / "configs" / "pretrain" / f"{name}.yaml").read_text())["contrastive_crop"]
        assert group == dict(enabled=True, warmup_epochs=41, loc_interval=40, box_thresh=0.1, alpha=0.6), name  # authors
    with pytest.raises(SystemExit):
        bam_main(["pretrain", "--config", str(REPO / "configs" / "pretrain" / "demo.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["contrastive_crop"]["enabled"] is False


# -- FFCV ------------------------------------------------------------------------------------------
def test_ffcv_batches_carry_file_indices(tmp_path):
    require_ffcv()
    from PIL import Image

    from bam.data import FFCVDataModule, write_beton

    for label in range(2):
        folder = tmp_path / "train" / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(10):
            level = 8 * (label * 10 + index)
            Image.new("RGB", (16, 16), (level, level, level)).save(folder / f"{index}.png")
    write_beton(str(tmp_path), str(tmp_path / "train.beton"), write_mode="raw", num_workers=1)
    module = FFCVDataModule(str(tmp_path / "train.beton"), base_size=16, crops=MultiCropConfig(
        global_size=16, local_size=8, num_local_crops=2), batch_size=4, num_workers=1)
    store = module.enable_contrastive_crop(alpha=0.6)
    reference = {int(i): image for images, indices in module.heatmap_batches(5) for i, image in zip(indices, images)}
    assert sorted(reference) == list(range(len(store)))
    images, labels, indices = next(iter(module.train_dataloader()))
    for image, index in zip(images, indices.tolist()):
        assert torch.equal(image, reference[index])
    views, _, _ = module.on_after_batch_transfer((images, labels, indices), 0)
    assert [v.shape[-1] for v in views] == [16, 16, 8, 8]
