"""Every image format and colour layout decodes to the upright 8-bit RGB image the file holds,
through TorchCodec where it decodes the format and Pillow elsewhere, and no decode raises a
DeprecationWarning (torchvision 0.29 deprecates its own decoders, which bam no longer calls)."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from bam.data import image_decoding
from bam.data.image_decoding import decode_image_file
from repo_paths import REPO

HEIGHT, WIDTH = 20, 24


def _pixels(channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, channels), dtype=np.uint8)


def _decoded(path: Path) -> np.ndarray:
    """``decode_image_file`` as (H, W, 3), with every DeprecationWarning raised as an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        image = decode_image_file(str(path))
    assert image.dtype == torch.uint8 and image.shape == (3, HEIGHT, WIDTH)
    return image.permute(1, 2, 0).numpy()


def _save(pixels: np.ndarray, mode: str) -> Callable[[Path], None]:
    return lambda path, **options: Image.fromarray(pixels).convert(mode).save(path, **options)


RGB, RGBA, GREY = _pixels(3), _pixels(4, seed=1), _pixels(1, seed=2)[..., 0]
# (file name, writer, the RGB pixels the file holds); lossless formats: decoded exactly
LOSSLESS = {
    "rgb.png": (_save(RGB, "RGB"), RGB),
    "alpha.png": (_save(RGBA, "RGBA"), RGBA[..., :3]),  # alpha dropped, colour kept
    "grey.png": (_save(GREY, "L"), np.repeat(GREY[..., None], 3, axis=2)),
    "grey_alpha.png": (_save(np.dstack([GREY, GREY]), "LA"), np.repeat(GREY[..., None], 3, axis=2)),
    "rgb.webp": (lambda path: Image.fromarray(RGB).save(path, lossless=True), RGB),
    "alpha.webp": (lambda path: Image.fromarray(RGBA).save(path, lossless=True, exact=True), RGBA[..., :3]),
    "rgb.bmp": (_save(RGB, "RGB"), RGB),
    "rgb.tiff": (_save(RGB, "RGB"), RGB),
    "rgb.ppm": (_save(RGB, "RGB"), RGB),
    "grey.pgm": (_save(GREY, "L"), np.repeat(GREY[..., None], 3, axis=2)),
}


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_a_lossless_image_decodes_to_exactly_its_rgb_pixels(tmp_path, name):
    write, expected = LOSSLESS[name]
    write(tmp_path / name)
    np.testing.assert_array_equal(_decoded(tmp_path / name), expected)


def test_palette_images_decode_to_their_colours(tmp_path):
    palette = Image.fromarray(RGB).quantize(16)  # P mode: 16 colours
    expected = np.asarray(palette.convert("RGB"))
    for name in ("palette.png", "palette.gif"):
        palette.save(tmp_path / name)
        np.testing.assert_array_equal(_decoded(tmp_path / name), expected)


@pytest.mark.parametrize("name", ["deep.png", "deep.tiff"])
def test_a_16_bit_image_decodes_to_8_bits_by_either_decoder(tmp_path, monkeypatch, name):
    deep = np.random.default_rng(3).integers(0, 65536, (HEIGHT, WIDTH), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / name)  # I;16, 16-bit grey
    assert Image.open(tmp_path / name).mode == "I;16"
    expected = np.repeat((deep / 257).round()[..., None], 3, axis=2)  # full range kept, not clipped at 255
    assert np.abs(_decoded(tmp_path / name).astype(int) - expected).max() <= 1
    monkeypatch.setattr(image_decoding, "CODEC_DECODERS", {})  # Pillow alone
    assert np.abs(_decoded(tmp_path / name).astype(int) - expected).max() <= 1


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_a_jpeg_decodes_as_pillow_decodes_it(tmp_path, mode):
    path = tmp_path / f"{mode}.jpg"
    Image.fromarray(RGB).convert(mode).save(path, quality=95)
    expected = np.asarray(Image.open(path).convert("RGB"))  # Pillow: same libjpeg-turbo, same colour rules
    assert np.abs(_decoded(path).astype(int) - expected.astype(int)).max() <= 2


@pytest.mark.parametrize("name", ["moving.gif", "moving.png", "moving.webp"])
def test_an_animation_decodes_to_its_first_frame(tmp_path, name):
    frames = [Image.fromarray(_pixels(3, seed)) for seed in (10, 11, 12)]
    frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], duration=50, loop=0,
                   **({"lossless": True} if name.endswith(".webp") else {}))
    expected = np.asarray(Image.open(tmp_path / name).convert("RGB"))  # Pillow's first frame
    if not name.endswith(".gif"):  # GIF's 256-colour palette changes colours; the others are lossless
        np.testing.assert_array_equal(expected, np.asarray(frames[0]))
    np.testing.assert_array_equal(_decoded(tmp_path / name), expected)


@pytest.mark.parametrize("name", ["turned.jpg", "turned.png"])
def test_exif_orientation_is_applied_to_jpegs_and_pngs(tmp_path, name):
    stored = np.zeros((WIDTH, HEIGHT, 3), dtype=np.uint8)  # on its side: WIDTH rows of HEIGHT pixels
    stored[: WIDTH // 2, :, 0] = 255  # red top half, blue bottom half, as stored
    stored[WIDTH // 2 :, :, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / name, exif=exif, **({"quality": 95} if name.endswith(".jpg") else {}))
    upright = np.rot90(stored, k=-1)  # turned clockwise: red on the right, blue on the left
    tolerance = 2 if name.endswith(".jpg") else 0
    interior = (slice(2, -2), slice(2, WIDTH // 2 - 2))  # away from JPEG's ringing at the colour edge
    for part in (interior, (slice(2, -2), slice(WIDTH // 2 + 2, -2))):
        assert np.abs(_decoded(tmp_path / name)[part].astype(int) - upright[part]).max() <= tolerance


def test_still_jpegs_pngs_webps_and_gifs_go_to_torchcodec():
    assert sorted(image_decoding.CODEC_DECODERS) == ["GIF", "JPEG", "MPO", "PNG", "WEBP"]
    assert all(decoder.__module__.startswith("torchcodec.") for decoder in image_decoding.CODEC_DECODERS.values())


def test_without_torchcodec_pillow_decodes_the_same_pixels(tmp_path, monkeypatch):
    for name in ("rgb.png", "alpha.webp", "grey.png"):
        LOSSLESS[name][0](tmp_path / name)
    Image.fromarray(RGB).save(tmp_path / "rgb.jpg", quality=95)
    with_codec = {name: _decoded(tmp_path / name) for name in ("rgb.png", "alpha.webp", "grey.png", "rgb.jpg")}
    monkeypatch.setattr(image_decoding, "CODEC_DECODERS", {})
    for name, pixels in with_codec.items():
        tolerance = 2 if name.endswith(".jpg") else 0
        assert np.abs(_decoded(tmp_path / name).astype(int) - pixels.astype(int)).max() <= tolerance, name


@pytest.mark.process
def test_a_torchcodec_that_does_not_load_is_said_in_one_warning_and_pillow_decodes(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "rgb.png")
    script = ("import sys; sys.modules['torchcodec.decoders'] = None\n"  # as if it failed to import
              "from bam.data.image_decoding import decode_image_file\n"
              f"print(tuple(decode_image_file({str(tmp_path / 'rgb.png')!r}).shape))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"(3, {HEIGHT}, {WIDTH})"
    warned = [line for line in done.stderr.splitlines() if "torchcodec cannot be loaded" in line]
    assert len(warned) == 1 and warned[0].endswith(
        "UserWarning: torchcodec cannot be loaded (ModuleNotFoundError: import of torchcodec.decoders halted; None in "
        "sys.modules), so Pillow decodes every image (up to 2x slower); install the torchcodec build that "
        "matches torch, e.g. for a CPU-only torch: pip install torchcodec --index-url https://download.pytorch.org/whl/cpu")
