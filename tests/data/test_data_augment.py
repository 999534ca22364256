"""The two augmentation paths implement the same recipe: op by op against torchvision, and in
distribution (crop geometry, flips, colour statistics) over many samples."""
from __future__ import annotations

import math

import kornia
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from bam.data import CPUMultiCrop, DeviceMultiCrop, MultiCropConfig
from bam.data import augment_ops as ops
from bam.data.config import blur_kernel_size
from bam.data.device_augment import random_color_jitter


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: largest gap between the empirical CDFs.

    Values are rounded to 1e-4 first: with some operations off, a statistic takes a few values
    with large probability (atoms) and float rounding must not split an atom into two.
    """
    a, b = a.double().round(decimals=4), b.double().round(decimals=4)
    grid = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, grid, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def _ks_threshold(n: int, m: int) -> float:
    """Rejection threshold of the KS test at level 1e-3 (c(alpha) = 1.95)."""
    return 1.95 * math.sqrt((n + m) / (n * m))


# -- op by op against torchvision --------------------------------------------------------------
@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(6, 3, 20, 24, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "name, reference",
    [
        ("brightness", TF.adjust_brightness),
        ("contrast", TF.adjust_contrast),
        ("saturation", TF.adjust_saturation),
        ("hue", TF.adjust_hue),
    ],
)
def test_jitter_ops_match_torchvision(images, name, reference):
    factors = torch.tensor([0.6, 0.9, 1.0, 1.2, 1.4, 0.75]) if name != "hue" else torch.linspace(-0.5, 0.5, 6)
    expected = torch.stack([reference(image, float(f)) for image, f in zip(images, factors)])
    batched = ops.JITTER_OPS[name](images.clone(), factors)
    one_by_one = torch.stack([ops.JITTER_OPS[name](image.clone(), float(f)) for image, f in zip(images, factors)])
    torch.testing.assert_close(batched, expected, atol=2e-6, rtol=0)
    torch.testing.assert_close(one_by_one, expected, atol=2e-6, rtol=0)


def test_hue_leaves_grey_pixels_unchanged():
    grey = torch.rand(4, 1, 8, 8).expand(-1, 3, -1, -1)
    torch.testing.assert_close(ops.JITTER_OPS["hue"](grey, torch.full((4,), 0.3)), grey)


def test_grayscale_blur_solarize_match_torchvision(images):
    torch.testing.assert_close(ops.grayscale_(images.clone()), TF.rgb_to_grayscale(images, 3), atol=1e-6, rtol=0)
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.3, 1.7, 2.0])
    expected = torch.stack([TF.gaussian_blur(image, [9, 9], [s.item()] * 2) for image, s in zip(images, sigmas)])
    torch.testing.assert_close(ops.gaussian_blur_batch(images, sigmas, 9), expected, atol=1e-6, rtol=0)
    solarized = ops.solarize_(images.clone())
    torch.testing.assert_close(solarized, TF.solarize(images, 0.5))


def test_blur_reflects_at_borders_of_small_images():
    image = torch.rand(1, 3, 5, 5)
    expected = TF.gaussian_blur(image[0], [9, 9], [2.0, 2.0])  # kernel nearly twice the image
    torch.testing.assert_close(ops.gaussian_blur_batch(image, torch.tensor([2.0]), 9)[0], expected, atol=1e-6, rtol=0)


def test_cpu_color_jitter_is_torchvision_color_jitter(images):
    """Same random draws (factors and order) and the same result as torchvision's, faster hue."""
    from bam.data.cpu_augment import ColorJitter

    ranges = dict(brightness=(0.6, 1.4), contrast=(0.6, 1.4), saturation=(0.8, 1.2), hue=(-0.1, 0.1))
    for seed in range(4):
        torch.manual_seed(seed)
        ours = ColorJitter(**ranges)(images[seed])
        torch.manual_seed(seed)
        torch.testing.assert_close(ours, v2.ColorJitter(**ranges)(images[seed]), atol=2e-6, rtol=0)



def test_cpu_hue_matches_torchvision():
    """The one hue shift (ceil masks, wrapped triangle ramp) against torchvision's HSV round trip."""
    image = torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(2))
    image[:, :4] = image[:1, :4]  # grey pixels
    image[1, 4:8] = image[0, 4:8]  # ties: red == green, green == blue, blue == red
    image[2, 8:12] = image[1, 8:12]
    image[0, 12:16] = image[2, 12:16]
    image[:, 16:] = (image[:, 16:] * 4).round() / 4  # saturated and black / white pixels
    for turns in torch.linspace(-0.5, 0.5, 21).tolist():
        torch.testing.assert_close(ops.shift_hue(image, turns), TF.adjust_hue(image, turns), atol=2e-6, rtol=0)


@pytest.mark.parametrize("height, width", [(224, 224), (96, 96), (24, 40), (13, 13), (67, 20)])
def test_cpu_banded_blur_matches_torchvision(height, width):
    """Banded products (blocks near 32 px), one block (13 px) and the dense fallback (67 px: no divisor)."""
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(3))
    for sigma in (0.1, 0.7, 2.0):
        expected = TF.gaussian_blur(image, [13, 13], [sigma, sigma])
        torch.testing.assert_close(ops.gaussian_blur_image(image, sigma, 13), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("operation", ["grayscale", "blur", "solarize"])
def test_cpu_path_single_operations_match_torchvision(operation):
    """With one operation forced on and the crop the whole image, a view is torchvision's result."""
    off = dict(color_jitter_prob=0.0, grayscale_prob=0.0, global_blur_prob=(0.0,), global_solarize_prob=(0.0,))
    on = {"grayscale": dict(grayscale_prob=1.0), "blur": dict(global_blur_prob=(1.0,), blur_sigma=(1.5, 1.5)),
          "solarize": dict(global_solarize_prob=(1.0,))}[operation]
    crops = MultiCropConfig(num_global_crops=1, global_size=24, global_scale=(1.0, 1.0), num_local_crops=0,
                            ratio=(1.0, 1.0), flip_prob=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **{**off, **on})
    image = _colour_image()
    x = TF.to_dtype(image, torch.float32, scale=True)
    expected = {"grayscale": lambda: TF.rgb_to_grayscale(x, 3),
                "blur": lambda: TF.gaussian_blur(x, [blur_kernel_size(1.5, 24)] * 2, [1.5, 1.5]),
                "solarize": lambda: TF.solarize(x, 0.5)}[operation]()
    (view,) = CPUMultiCrop(crops)(image)
    torch.testing.assert_close(view, expected, atol=1e-6, rtol=0)


def test_cpu_views_of_one_size_are_independent():
    crops = MultiCropConfig(global_size=16, local_size=8, num_local_crops=4)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(0)
    views = CPUMultiCrop(crops)(image)
    assert not torch.allclose(views[0], views[1])
    assert all(not torch.allclose(views[i], views[j]) for i in range(2, 6) for j in range(i + 1, 6))

def test_crop_resize_matches_torchvision_resized_crop():
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    whole = ops.crop_resize(image, torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.tensor([0]), 40)
    torch.testing.assert_close(whole[0], TF.resize(image[0], [40, 40], antialias=True), atol=1e-5, rtol=0)
    # an inner box: same up to the crop border (roi_align may read one pixel beyond it)
    inner = ops.crop_resize(image, torch.tensor([[3.0, 2.0, 13.0, 10.0]]), torch.tensor([0]), 24)[0]
    expected = TF.resized_crop(image[0], 2, 3, 8, 10, [24, 24], antialias=True)
    torch.testing.assert_close(inner[:, 2:-2, 2:-2], expected[:, 2:-2, 2:-2], atol=1e-5, rtol=0)


def test_blur_kernel_covers_three_sigma_but_fits_small_images():
    assert blur_kernel_size(2.0, 224) == 13
    assert blur_kernel_size(2.0, 4) == 7  # reflect padding needs pad < side


# -- crop boxes: torchvision's RandomResizedCrop sampler, vectorised -------------------------------
@pytest.mark.parametrize("height, width, scale", [(32, 32, (0.25, 1.0)), (20, 40, (0.05, 0.25))])
def test_crop_boxes_follow_torchvision_distribution(height, width, scale):
    torch.manual_seed(0)
    n = 4000
    boxes = ops.sample_crop_boxes(n, height, width, scale, (3 / 4, 4 / 3))
    reference = v2.RandomResizedCrop(8, scale=scale)
    params = [reference.make_params([torch.zeros(3, height, width)]) for _ in range(n)]
    ref = torch.tensor([[p["left"], p["top"], p["left"] + p["width"], p["top"] + p["height"]] for p in params]).float()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert torch.equal(boxes, boxes.round())  # integer pixel boxes, as torchvision's
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (height * width)  # noqa: E731
    for stat in (area, lambda b: b[:, 0], lambda b: b[:, 1], lambda b: (b[:, 2] - b[:, 0]) / (b[:, 3] - b[:, 1])):
        assert _ks(stat(boxes), stat(ref)) < _ks_threshold(n, n)


@pytest.mark.parametrize("height, width, ratio", [(8, 32, (1.0, 1.0)), (32, 8, (1.0, 1.0)), (30, 8, (3 / 4, 4 / 3))])
def test_crop_boxes_fall_back_like_torchvision(height, width, ratio):
    # a 4:1 (or 1:4) image cannot hold a square covering 90% of it: both fall back to the same
    # centre crop, its aspect ratio clamped into the range
    boxes = ops.sample_crop_boxes(5, height, width, (0.9, 1.0), ratio)
    ref = v2.RandomResizedCrop(8, scale=(0.9, 1.0), ratio=ratio).make_params([torch.zeros(3, height, width)])
    expected = [ref["left"], ref["top"], ref["left"] + ref["width"], ref["top"] + ref["height"]]
    assert boxes.tolist() == [expected] * 5


# -- device placement: tensors an op creates live on its input's device ----------------------------
def test_batched_ops_create_their_tensors_on_the_inputs_device():
    # The "meta" device holds shapes without data, and mixing it with a CPU tensor raises: on a
    # machine without a GPU it is how a tensor created on the CPU instead of the batch's device
    # (the device path's bug on a GPU) shows.
    boxes = ops.sample_crop_boxes(5, 20, 24, (0.2, 1.0), (3 / 4, 4 / 3), device="meta")
    assert (boxes.device.type, boxes.shape) == ("meta", (5, 4))
    sigma = torch.rand(3, device="meta")
    images = torch.rand(3, 3, 16, 20, device="meta")
    assert ops.gaussian_taps(sigma, 5).device.type == "meta"
    assert ops.gaussian_blur_batch(images, sigma, 5).device.type == "meta"
    assert ops.shift_hue(images, torch.rand(3, device="meta")).device.type == "meta"
    assert ops.sample_uniform(0.1, 2.0, (4,), device="meta").device.type == "meta"


def test_crop_regions_default_to_uniform_placement_within_them():
    # alpha = 1: Beta(1, 1) is uniform, the documented default
    regions = torch.tensor([[0.2, 0.1, 0.9, 0.6]]).repeat(64, 1)
    torch.manual_seed(5)
    default = ops.sample_crop_boxes(64, 40, 48, (0.1, 0.3), (3 / 4, 4 / 3), regions=regions)
    torch.manual_seed(5)
    uniform = ops.sample_crop_boxes(64, 40, 48, (0.1, 0.3), (3 / 4, 4 / 3), regions=regions, alpha=1.0)
    assert torch.equal(default, uniform)


# -- colour jitter: per-image random order ---------------------------------------------------------
def test_jitter_order_is_drawn_per_image():
    """Brightness 1.5 then contrast 0 gives mean(grey(clamp(1.5 x))); the other order 1.5 mean(grey(x)).

    With one order per batch (kornia's ColorJitter) every image would get the same result.
    """
    torch.manual_seed(0)
    image = torch.full((1, 3, 4, 4), 0.5)
    image[..., :2] = 0.9
    out = random_color_jitter(image.repeat(400, 1, 1, 1), 1.0, {"brightness": (1.5, 1.5), "contrast": (0.0, 0.0)})
    values = out[:, 0, 0, 0]
    # brightness first: mean of clamp(1.5 * (0.9, 0.5)) = 0.875; contrast first: clamp(1.5 * 0.7) = 1
    brightness_first = torch.isclose(values, torch.tensor(0.875), atol=1e-3)
    contrast_first = torch.isclose(values, torch.tensor(1.0), atol=1e-3)
    assert (brightness_first | contrast_first).all()
    assert 0.4 < brightness_first.float().mean().item() < 0.6


# -- the two paths, in distribution ---------------------------------------------------------------
N_IMAGES = 1200


pytestmark = pytest.mark.usefixtures("one_thread")


def _cpu_views(crops: MultiCropConfig, image: torch.Tensor) -> list[torch.Tensor]:
    """Views of ``N_IMAGES`` copies of ``image`` through the CPU path (torchvision v2)."""
    torch.manual_seed(0)
    cpu = CPUMultiCrop(crops)
    return [torch.stack(view) for view in zip(*(cpu(image) for _ in range(N_IMAGES)))]


def _device_views(crops: MultiCropConfig, image: torch.Tensor) -> list[torch.Tensor]:
    """Views of ``N_IMAGES`` copies of ``image`` through the device path (one batch)."""
    torch.manual_seed(1)
    return DeviceMultiCrop(crops)(image.expand(N_IMAGES, -1, -1, -1))


def _ramp_image(size: int) -> torch.Tensor:
    """R grows left to right, G top to bottom: a view's pixels tell where it was cut from."""
    ramp = torch.linspace(0, 255, size)
    return torch.stack([ramp.expand(size, size), ramp.view(-1, 1).expand(size, size), torch.full((size, size), 128.0)]).round().to(torch.uint8)


GEOMETRY_ONLY = dict(
    color_jitter_prob=0.0, grayscale_prob=0.0, global_blur_prob=(0.0,), local_blur_prob=0.0,
    global_solarize_prob=(0.0,), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
)


def _slope(channel: torch.Tensor) -> torch.Tensor:
    """Mean absolute change of ``channel (N, H, W)`` from the first to the third quarter column."""
    width = channel.shape[-1]
    return (channel[..., 3 * width // 4] - channel[..., width // 4]).abs().mean(1)


def _geometry_stats(view: torch.Tensor) -> dict[str, torch.Tensor]:
    red, green = view[:, 0], view[:, 1]
    return {
        "centre_x": red.mean(dim=(1, 2)),
        "centre_y": green.mean(dim=(1, 2)),
        # slopes between the quarter lines: the crop's extent, unaffected by how the resize
        # filters treat the crop border (torchvision renormalises, roi_align reads past it)
        "area": _slope(green.transpose(1, 2)) * _slope(red),
        "flipped": (red[:, :, -1] < red[:, :, 0]).float().mean(1),
    }


def test_paths_agree_on_crop_geometry_and_flips():
    crops = MultiCropConfig(num_global_crops=1, global_size=24, num_local_crops=1, local_size=12, **GEOMETRY_ONLY)
    image = _ramp_image(32)
    cpu_views, device_views = _cpu_views(crops, image), _device_views(crops, image)
    for cpu_view, device_view in zip(cpu_views, device_views):
        cpu_stats, device_stats = _geometry_stats(cpu_view), _geometry_stats(device_view)
        for name in ("centre_x", "centre_y", "area"):
            assert _ks(cpu_stats[name], device_stats[name]) < _ks_threshold(N_IMAGES, N_IMAGES), name
        flip_rates = cpu_stats["flipped"].mean().item(), device_stats["flipped"].mean().item()
        assert abs(flip_rates[0] - 0.5) < 0.05 and abs(flip_rates[1] - 0.5) < 0.05, flip_rates


def _colour_image() -> torch.Tensor:
    """Four coloured quadrants with a little texture, so every colour operation leaves a trace."""
    quadrants = torch.tensor([[0.9, 0.2, 0.1], [0.1, 0.7, 0.3], [0.2, 0.3, 0.9], [0.8, 0.8, 0.2]])
    image = quadrants.view(2, 2, 3).repeat_interleave(12, 0).repeat_interleave(12, 1).permute(2, 0, 1)
    texture = 0.1 * torch.rand(1, 24, 24, generator=torch.Generator().manual_seed(0))
    return ((image + texture).clamp(0, 1) * 255).round().to(torch.uint8)


def _colour_stats(view: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "red": view[:, 0].mean(dim=(1, 2)),
        "green": view[:, 1].mean(dim=(1, 2)),
        "blue": view[:, 2].mean(dim=(1, 2)),
        "contrast": view.std(dim=(1, 2, 3)),
        "chroma": (view.amax(1) - view.amin(1)).mean(dim=(1, 2)),
        "sharpness": (view[..., 1:] - view[..., :-1]).abs().mean(dim=(1, 2, 3)),
    }


# colour only: no crop randomness (whole image, no flips), so the statistics see the colour ops
COLOUR_ONLY = dict(
    num_global_crops=2, global_size=24, global_scale=(1.0, 1.0), num_local_crops=1, local_size=24,
    local_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
)


@pytest.fixture(scope="module")
def cpu_colour_stats() -> list[dict[str, torch.Tensor]]:
    return [_colour_stats(view) for view in _cpu_views(MultiCropConfig(**COLOUR_ONLY), _colour_image())]


def _colour_gaps(cpu_stats: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """KS statistic of every colour statistic of every view, CPU path against device path."""
    device_views = _device_views(MultiCropConfig(**COLOUR_ONLY), _colour_image())
    gaps = {}
    for index, (cpu, device_view) in enumerate(zip(cpu_stats, device_views)):
        device = _colour_stats(device_view)
        gaps.update({f"view{index}.{name}": _ks(cpu[name], device[name]) for name in cpu})
    return gaps


def test_paths_agree_on_colour_statistics(cpu_colour_stats):
    gaps = _colour_gaps(cpu_colour_stats)
    threshold = _ks_threshold(N_IMAGES, N_IMAGES)
    assert max(gaps.values()) < threshold, {k: round(v, 3) for k, v in gaps.items() if v >= threshold}


@pytest.mark.parametrize(
    "wrong_op",
    [
        # kornia's additive brightness, and hue taken in radians: the classic porting slips
        ("brightness", lambda x, f: kornia.enhance.adjust_brightness(x, f - 1)),
        ("hue", lambda x, f: kornia.enhance.adjust_hue(x, f)),
    ],
)
def test_colour_comparison_detects_a_wrong_formula(monkeypatch, cpu_colour_stats, wrong_op):
    name, op = wrong_op
    monkeypatch.setitem(ops.JITTER_OPS, name, op)
    assert max(_colour_gaps(cpu_colour_stats).values()) > _ks_threshold(N_IMAGES, N_IMAGES)


def test_views_come_in_recipe_order_with_recipe_sizes():
    crops = MultiCropConfig(global_size=32, local_size=16, num_local_crops=3)
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    for views in (CPUMultiCrop(crops)(image), DeviceMultiCrop(crops)(image.unsqueeze(0).repeat(2, 1, 1, 1))):
        assert [v.shape[-1] for v in views] == [32, 32, 16, 16, 16]
        assert all(v.dtype == torch.float32 for v in views)


def test_device_views_are_independent_per_image_and_view():
    crops = MultiCropConfig(global_size=16, local_size=8, num_local_crops=2)
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).repeat(8, 1, 1, 1)
    views = DeviceMultiCrop(crops)(image)
    assert not torch.allclose(views[0][0], views[0][1])  # two images, same view
    assert not torch.allclose(views[0][0], views[1][0])  # same image, two views


def test_device_path_on_cpu_restores_the_thread_count():
    torch.set_num_threads(2)  # the module fixture restores the original count afterwards
    DeviceMultiCrop(MultiCropConfig(global_size=8, local_size=4))(torch.zeros(2, 3, 12, 12, dtype=torch.uint8))
    assert torch.get_num_threads() == 2


def test_config_rejects_impossible_recipes():
    with pytest.raises(ValueError, match="global_scale"):
        MultiCropConfig(global_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="hue"):
        MultiCropConfig(hue=0.7)
    off = MultiCropConfig(color_jitter_prob=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    assert off.jitter_ranges() == {}
