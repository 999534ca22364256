"""`bam vos`: J and F against cases worked out by hand, the DAVIS palette and layout, label
propagation on a synthetic video beating the copied first mask, bad DAVIS roots in one line, two
gloo processes giving the single-process result, and the `bam` command on the demo config."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from bam.cli import STAGES, usage
from bam.data.synthetic_video import MovingShape, davis_palette, write_synthetic_davis
from bam.evaluation import vos
from bam.evaluation.vos import (
    Propagation,
    boundary_f,
    boundary_map,
    jaccard,
    main,
    neighbourhood,
    propagate,
    resized_size,
    run_vos,
    score_sequence,
    statistics,
)
from cli_runs import run_bam
from eval_fixtures import CNN, record_figures, write_checkpoint
from tiny_runs import join_workers

# a disc moving right 4 px per frame and a square moving up-left, 96 x 128 px, 8 frames
SHAPES = (MovingShape(32, 28, (0.0, 4.0), 16, ((230, 40, 40), (250, 220, 60))),
          MovingShape(68, 96, (-2.0, -3.0), 14, ((40, 80, 230), (60, 230, 230)), square=True))
SMALL = {"propagation": Propagation(short_side=96, long_side_multiple=16, radius=4), "accelerator": "cpu"}
SMALL_ARGUMENTS = ["--propagation.short_side=96", "--propagation.long_side_multiple=16", "--propagation.radius=4",
                   "--accelerator=cpu"]
HEIGHT, WIDTH = 96, 128


def _band(rows: range, size: int = 100) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[rows.start : rows.stop] = True
    return mask


def test_jaccard_by_hand_with_void_left_out():
    annotation, prediction = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    annotation[0:4, 0:4] = True  # 16 px
    prediction[0:2, 0:4] = True  # its upper 8 px
    assert jaccard(annotation, prediction) == 0.5
    void = np.zeros((8, 8), bool)
    void[2:4, 0:4] = True  # the missed half is void: nothing left to miss
    assert jaccard(annotation, prediction, void) == 1.0
    prediction[6:8, 6:8] = True  # 4 px wrong
    assert jaccard(annotation, prediction) == 8 / 20
    assert jaccard(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0  # both empty


def test_boundary_map_of_a_square_by_hand():
    mask = np.zeros((6, 6), bool)
    mask[1:4, 1:4] = True
    # inside: the right column and bottom row of the square; outside: the row above, the column to
    # its left and the corner above-left (each differs from its right, lower or lower-right neighbour)
    expected = {(1, 3), (2, 3), (3, 3), (3, 1), (3, 2), (0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (2, 0), (3, 0)}
    assert set(zip(*np.nonzero(boundary_map(mask)))) == expected


def test_boundary_f_tolerance_is_0_008_of_the_diagonal():
    # 100 x 100 px: diagonal 141.4, tolerance ceil(1.13) = 2 px. A full-width band's boundary is the
    # row above it and its last row (200 px)
    annotation = _band(range(10, 20))
    assert boundary_f(annotation, _band(range(12, 22))) == 1.0  # boundaries 2 px apart: all matched
    assert boundary_f(annotation, _band(range(13, 23))) == 0.0  # 3 px apart: none
    # an extra band far away: precision 200/400, recall 1, F = 2 * 0.5 / 1.5
    extra = _band(range(12, 22)) | _band(range(60, 70))
    assert boundary_f(annotation, extra) == pytest.approx(2 / 3)
    assert boundary_f(annotation, extra, void=_band(range(55, 75))) == 1.0  # void clears it first
    assert boundary_f(annotation, np.zeros_like(annotation)) == 0.0  # nothing predicted: recall 0
    assert boundary_f(np.zeros_like(annotation), np.zeros_like(annotation)) == 1.0


def test_statistics_by_hand():
    # 8 frames: bins frames 0-2, 2-4, 4-5, 5-7 (the toolkit's overlapping quarters)
    values = np.array([1, 1, 1, 1, 0, 0, 0, 0.4])
    assert statistics(values) == pytest.approx({"mean": 4.4 / 8, "recall": 0.5, "decay": 1 - 0.4 / 3})


def test_score_sequence_leaves_out_the_first_and_last_frames_and_scores_each_object():
    annotations = np.zeros((4, 10, 10), np.uint8)
    annotations[:, 0:5, 0:5] = 1
    annotations[:, 5:10, 5:10] = 2
    predictions = annotations.copy()
    predictions[0] = 0  # the first and last frames are wrong and do not count
    predictions[3] = 0
    predictions[1, 5:10, 5:10] = 0  # object 2 missed in frame 1: J 0 there, 1 in frame 2
    scores = score_sequence(annotations, predictions)
    assert scores[0]["J"] == {"mean": 1.0, "recall": 1.0, "decay": 0.0}
    assert scores[1]["J"] == pytest.approx({"mean": 0.5, "recall": 0.5, "decay": -1.0})
    assert scores[1]["F"]["mean"] == pytest.approx(0.5) and len(scores) == 2


def test_davis_palette_is_the_voc_colour_table():
    palette = davis_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[:8].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128],
                                    [0, 128, 128], [128, 128, 128]]
    assert palette[8].tolist() == [64, 0, 0] and palette[255].tolist() == [224, 224, 192]


def test_resizing_follows_dino():
    assert resized_size(480, 854, 480, 64) == (480, 832)  # DAVIS 480p: long side down to a multiple of 64
    assert resized_size(1080, 1920, 480, 64) == (480, 832)
    assert resized_size(854, 480, 480, 64) == (832, 480)
    assert resized_size(48, 64, 48, 16) == (48, 64)


def test_propagation_takes_the_top_k_affinities_within_the_radius():
    allowed = neighbourhood(1, 4, radius=1, device=torch.device("cpu"))
    assert allowed.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
    keys = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.eye(4)  # each key its own label: the output is the weight of every key
    query = torch.tensor([[1.0, 0.0]] * 4)
    weights = propagate(query, [keys], [labels], allowed, top_k=2, temperature=0.5)
    e = lambda cosine: float(np.exp(cosine / 0.5))  # noqa: E731
    # position 0 sees keys 0, 1; position 2 sees 1, 2, 3 and keeps the best two (3 and 1)
    assert weights[0].tolist() == pytest.approx([e(1) / (e(1) + e(0.6)), e(0.6) / (e(1) + e(0.6)), 0, 0])
    assert weights[2].tolist() == pytest.approx([0, e(0.6) / (e(1) + e(0.6)), 0, e(1) / (e(1) + e(0.6))])
    # two context frames: the top-k runs over both
    both = propagate(query[:1], [keys[:2], keys[2:]], [labels[:2], labels[2:]], None, top_k=2, temperature=0.5)
    assert both[0].tolist() == pytest.approx([0.5, 0, 0, 0.5])


def test_synthetic_videos_move_at_their_speeds(tmp_path):
    names = write_synthetic_davis(tmp_path, num_sequences=2, num_frames=8, height=HEIGHT, width=WIDTH, shapes=SHAPES)
    assert names == ["synthetic0", "synthetic1"]
    assert (tmp_path / "ImageSets/2017/val.txt").read_text() == "synthetic0\nsynthetic1\n"
    for index, name in enumerate(names):
        speed = 1 + index / 2  # the second sequence is 1.5 times as fast
        centres = []
        for frame in range(8):
            annotation = Image.open(tmp_path / f"Annotations/480p/{name}/{frame:05d}.png")
            assert annotation.mode == "P" and annotation.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
            rows, columns = np.nonzero(np.asarray(annotation) == 1)
            centres.append((rows.mean(), columns.mean()))
        steps = np.diff(np.array(centres), axis=0)
        np.testing.assert_allclose(steps[:3], [[0.0, 4.0 * speed]] * 3, atol=0.35)  # before the square covers it


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("vos"), *CNN)


@pytest.fixture()
def videos(tmp_path) -> Path:
    write_synthetic_davis(tmp_path / "davis", num_sequences=2, num_frames=8, height=HEIGHT, width=WIDTH, shapes=SHAPES)
    return tmp_path / "davis"


def test_propagation_beats_copying_the_first_mask_and_writes_the_davis_layout(videos, tmp_path, capsys, monkeypatch):
    figures = record_figures(monkeypatch, vos)
    out = tmp_path / "out"
    # a random-init CNN (seeded by the stage): its features already tell the textures apart
    result = run_vos("bam_cnn4", str(videos), output_dir=str(out), overlay_frames=3, **SMALL)
    copied = result["first_mask_baseline"]
    assert result["num_objects"] == copied["num_objects"] == 4 and result["num_sequences"] == 2
    assert result["J&F"] > copied["J&F"] + 25, (result["J&F"], copied["J&F"])
    assert result["J"]["mean"] > 60 and result["J&F"] == pytest.approx((result["J"]["mean"] + result["F"]["mean"]) / 2)
    assert set(result["per_object"]) == {"synthetic0_1", "synthetic0_2", "synthetic1_1", "synthetic1_2"}
    for name in ("synthetic0", "synthetic1"):
        written = sorted(path.name for path in (out / name).iterdir())
        assert written == [f"{frame:05d}.png" for frame in range(8)]
        png = Image.open(out / name / "00005.png")
        assert png.mode == "P" and png.size == (WIDTH, HEIGHT) and png.getpalette() == davis_palette().ravel().tolist()
        assert set(np.unique(np.asarray(png))) <= {0, 1, 2}
        first = np.asarray(Image.open(videos / f"Annotations/480p/{name}/00000.png"))
        assert np.array_equal(np.asarray(Image.open(out / name / "00000.png")), first)  # the given mask, as given
    assert json.loads((out / "vos_results.json").read_text()) == result
    table = capsys.readouterr().out.splitlines()
    assert table[0] == ("DAVIS VOS by label propagation: 2 sequences, 4 objects (short side 96 px, first + 7 previous "
                        "frames, radius 4, top-5, T 0.1; %)")
    assert table[2].split()[1:] == [f"{value:.2f}" for value in
                                    [result["J&F"], *(result[m][k] for m in "JF" for k in ("mean", "recall", "decay"))]]
    assert len(figures[0].axes) == 6 and figures[0].axes[0].get_title() == "synthetic0 frame 0: propagated"
    assert (out / "vos_overlay.png").stat().st_size > 0


def _bad_root(videos: Path, fault: str) -> tuple[Path, str]:
    sequence = videos / "JPEGImages/480p/synthetic1"
    if fault == "missing annotation":
        target = videos / "Annotations/480p/synthetic1/00000.png"
        target.unlink()
        return videos, (f"bam vos: annotation missing: {target} (1 of sequence synthetic1's 8 frames have none; the "
                        "first frame's starts the propagation and J&F needs every frame's)")
    if fault == "frame size":
        frame = sequence / "00003.jpg"
        Image.new("RGB", (120, 96)).save(frame)
        return videos, (f"bam vos: sequence synthetic1: frame {frame} is 120x96 px but its first annotation is 128x96: "
                        "frames and annotations must have one size")
    if fault == "annotation size":
        annotation = videos / "Annotations/480p/synthetic1/00004.png"
        Image.new("P", (64, 48)).save(annotation)
        return videos, (f"bam vos: sequence synthetic1: annotation {annotation} is 64x48 px but 00000.png is 128x96: "
                        "a sequence has one size")
    listing = videos / "ImageSets/2017/val.txt"
    listing.write_text("synthetic0\nbear\nsynthetic1\ncows\n")
    return videos, f"bam vos: {listing} names 2 sequence(s) with no folder in {videos / 'JPEGImages/480p'}: bear, cows"


@pytest.mark.parametrize("fault", ["missing annotation", "frame size", "annotation size", "absent sequences"])
def test_a_bad_davis_root_is_one_line(checkpoint, videos, tmp_path, fault):
    root, message = _bad_root(videos, fault)
    with pytest.raises(SystemExit) as exit_info:
        main(["--backbone", str(checkpoint), "--davis_root", str(root), "--output_dir", str(tmp_path / "o"),
              *SMALL_ARGUMENTS])
    assert str(exit_info.value.code) == message


def test_old_flat_propagation_keys_keep_loading_with_one_line_naming_the_new_key(capsys):
    with pytest.raises(SystemExit):
        main(["--backbone", "bam_cnn4", "--davis_root", "videos", "--short_side=96", "--radius", "4", "--print_config"])
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if "is now" in line] == [
        "bam vos: note: the command line: `short_side` is now `propagation.short_side`; read as propagation.short_side=96",
        "bam vos: note: the command line: `radius` is now `propagation.radius`; read as propagation.radius=4",
    ]
    assert yaml.safe_load(out)["propagation"] == {**Propagation().__dict__, "short_side": 96, "radius": 4}


def test_the_stage_is_in_bam_help():
    assert STAGES["vos"][0] == "bam.evaluation.vos"
    assert "  vos        DAVIS-2017 video object segmentation by label propagation" in usage()


def _worker(rank: int, world: int, init_file: str, root: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # 2 processes share 2 cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = run_vos("bam_cnn4", root, output_dir=f"{out_dir}/two", overlay_frames=0, **SMALL)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_equal_one(videos, tmp_path):
    single = run_vos("bam_cnn4", str(videos), output_dir=str(tmp_path / "one"), overlay_frames=0, **SMALL)
    assert single["J&F"] > single["first_mask_baseline"]["J&F"] + 25
    context = mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(videos), str(tmp_path)),
                       nprocs=2, join=False)
    join_workers(context)  # a hang: pytest-timeout ends it, and the workers with it
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == single
    for name in ("synthetic0", "synthetic1"):  # each sequence written once, by its process, the same
        for frame in range(8):
            one, two = (np.asarray(Image.open(tmp_path / run / name / f"{frame:05d}.png")) for run in ("one", "two"))
            assert np.array_equal(one, two)


@pytest.mark.process
def test_bam_vos_demo_config_writes_and_scores_the_synthetic_videos(tmp_path):
    run = run_bam(["vos", "--config", "demo", "--backbone", "bam_cnn4", "--davis_root", str(tmp_path / "davis"),
                   "--output_dir", str(tmp_path / "out")])
    assert run.returncode == 0, run.stdout
    result = json.loads((tmp_path / "out" / "vos_results.json").read_text())
    assert (tmp_path / "davis" / "ImageSets/2017/val.txt").read_text() == "synthetic0\nsynthetic1\n"
    assert result["num_objects"] == 4 and result["J&F"] > result["first_mask_baseline"]["J&F"] + 25
    assert "VOS: synthetic1: 100%" in run.stdout and "propagated" in run.stdout
    assert (tmp_path / "out" / "vos_overlay.png").exists()


def test_a_vit_propagates_its_last_patch_tokens_after_the_final_norm_at_any_frame_size(videos, tmp_path):
    from eval_fixtures import VIT

    from bam.features.extract import patch_feature_map

    checkpoint = write_checkpoint(tmp_path, *VIT)  # trained for 32-px images, patch 8
    model, _ = vos.load_vos_backbone(str(checkpoint), None, None)
    frames = torch.randn(2, 3, HEIGHT, WIDTH)
    grid = patch_feature_map(model, frames)
    assert grid.shape == (2, 48, HEIGHT // 8, WIDTH // 8)
    with torch.no_grad():
        tokens = model.forward_features(frames)  # class token, then the patch tokens, after the final norm
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), tokens[:, 1:])
    result = run_vos(str(checkpoint), str(videos), output_dir=str(tmp_path / "out"), overlay_frames=0, **SMALL)
    assert result["J&F"] > result["first_mask_baseline"]["J&F"] + 25
