"""`bam retrieval`: the metrics against a hand-worked ranking and a brute-force reference written
here, BPA as one set, two gloo processes giving the single-process result, and the `bam` command
on the demo config and on a generated query/gallery folder."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.figure
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from bam.cli import STAGES, usage
from bam.evaluation import retrieval
from bam.evaluation.backbone import build_from_spec, resolve_backbone
from bam.evaluation.retrieval import (
    evaluate_retrieval, main, per_query_metrics, query_gallery_set, run_retrieval, within_set,
)
from bam.transforms import BPASettings, bpa
from cli_runs import run_bam
from eval_fixtures import CNN, record_figures, synthetic_data, write_checkpoint
from tiny_runs import join_workers

TRAIN, VAL, BATCH = 37, 23, 8  # odd sizes: uneven shards, partial last batches


def _angles(degrees: list[float]) -> torch.Tensor:
    """Unit vectors at these angles: the cosine ranking is the angular distance, read off by eye."""
    radians = torch.tensor(degrees, dtype=torch.float64).deg2rad()
    return torch.stack([radians.cos(), radians.sin()], dim=1)


def test_within_metrics_of_a_hand_worked_ranking():
    # query 0 (class a, at 0 deg) ranks the others by angle: 10 (a), 20 (b), 30 (a), 40 (b), 100 (a)
    features = _angles([0, 10, 20, 30, 40, 100])
    labels = torch.tensor([0, 0, 1, 0, 1, 0])
    rows = per_query_metrics(features, labels, features, labels, ks=[1, 2, 3], self_index=torch.arange(6))
    # relevant positions 1, 3, 5 of 5: R = 3; hits at K=1,2,3: 1, 1, 1
    # R-precision: 2 of the first 3; MAP@R: (1/1 + 2/3) / 3; AP: (1/1 + 2/3 + 3/5) / 3
    torch.testing.assert_close(rows[0], torch.tensor([1, 1, 1, 2 / 3, (1 + 2 / 3) / 3, (1 + 2 / 3 + 3 / 5) / 3, 3],
                                                     dtype=torch.float64))
    # query 2 (class b, 20 deg): 10 (a) and 30 (a) tie at 10 deg, gallery order first; 0 (a), 40 (b), 100 (a)
    # relevant position 4 of 5, R = 1: no hit at 1-3, R-precision 0, MAP@R 0, AP 1/4
    torch.testing.assert_close(rows[2], torch.tensor([0, 0, 0, 0, 0, 1 / 4, 1], dtype=torch.float64))


def test_a_query_without_a_match_is_left_out_and_counted():
    features = _angles([0, 10, 90, 95])
    labels = torch.tensor([0, 0, 1, 2])  # classes 1 and 2 have no other member
    result = evaluate_retrieval(within_set(features, labels), ks=[1])
    assert result == {"recall@1": 100.0, "r_precision": 100.0, "map_at_r": 100.0, "map": 100.0,
                      "num_queries": 2, "num_skipped": 2}


def _reference(queries, query_labels, gallery, gallery_labels, ks, same_set):
    """Recall@K, R-precision, MAP@R, mAP (percent) by plain loops over each query's sorted list."""
    sums, counted = {name: 0.0 for name in [*(f"recall@{k}" for k in ks), "r_precision", "map_at_r", "map"]}, 0
    for i, query in enumerate(queries.tolist()):
        candidates = [j for j in range(len(gallery)) if not (same_set and j == i)]
        scored = sorted(candidates, key=lambda j: -sum(a * b for a, b in zip(query, gallery[j].tolist())))
        relevant = [int(gallery_labels[j] == query_labels[i]) for j in scored]
        r = sum(relevant)
        if r == 0:
            continue
        counted += 1
        precisions = [sum(relevant[: n + 1]) / (n + 1) for n in range(len(relevant))]
        for k in ks:
            sums[f"recall@{k}"] += any(relevant[:k])
        sums["r_precision"] += sum(relevant[:r]) / r
        sums["map_at_r"] += sum(p * hit for p, hit in zip(precisions[:r], relevant[:r])) / r
        sums["map"] += sum(p * hit for p, hit in zip(precisions, relevant)) / r
    return {name: 100 * value / counted for name, value in sums.items()}, counted


@pytest.mark.parametrize("same_set", [True, False], ids=["within", "query_gallery"])
def test_metrics_equal_the_brute_force_reference(same_set):
    generator = torch.Generator().manual_seed(0)
    gallery = F.normalize(torch.randn(41, 6, generator=generator, dtype=torch.float64), dim=1)
    gallery_labels = torch.randint(0, 5, (41,), generator=generator)
    if same_set:
        queries, query_labels, space = gallery, gallery_labels, within_set(gallery, gallery_labels)
    else:
        queries = F.normalize(torch.randn(17, 6, generator=generator, dtype=torch.float64), dim=1)
        query_labels = torch.randint(0, 6, (17,), generator=generator)  # class 5: not in the gallery
        space = query_gallery_set(queries, query_labels, gallery, gallery_labels)
    ks = [1, 2, 4, 8, 100]
    result = evaluate_retrieval(space, ks, chunk_rows=5)  # several chunks, the last one partial
    expected, counted = _reference(queries, query_labels, gallery, gallery_labels, ks, same_set)
    assert result.pop("num_queries") == counted and result.pop("num_skipped") == len(queries) - counted
    assert counted < len(queries) or same_set
    assert result == pytest.approx(expected, abs=1e-3)
    assert 0 < expected["map_at_r"] < expected["map"] < expected["recall@8"] < 100  # not trivially right


def _blobs(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(per_class)
    return torch.randn(4, 16, generator=generator)[labels] + 0.8 * torch.randn(len(labels), 16, generator=generator), labels


def test_bpa_ranks_the_transform_of_the_queries_and_gallery_as_one_set():
    gallery, gallery_labels = _blobs(6, seed=1)
    queries, query_labels = _blobs(3, seed=2)
    space = query_gallery_set(queries, query_labels, gallery, gallery_labels)
    moved = retrieval.bpa_retrieval_set(space, BPASettings(reg=0.2, iterations=4))
    expected = F.normalize(bpa(torch.cat([F.normalize(gallery), F.normalize(queries)]), 0.2, 4), dim=1)
    torch.testing.assert_close(moved.gallery, expected[:24])
    torch.testing.assert_close(moved.queries, expected[24:])
    within = retrieval.bpa_retrieval_set(within_set(gallery, gallery_labels), BPASettings(reg=0.2, iterations=4))
    torch.testing.assert_close(within.queries, F.normalize(bpa(F.normalize(gallery), 0.2, 4), dim=1))
    assert torch.equal(within.queries, within.gallery)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("retrieval"), *CNN)


def _stage_result(checkpoint: str, output_dir: str) -> dict:
    common = {"accelerator": "cpu", "bpa": BPASettings(reg=0.2), "query_chunk_rows": 4, "ks": [1, 3, 10]}
    return {
        protocol: run_retrieval(checkpoint, synthetic_data(batch_size=BATCH, train_size=TRAIN, val_size=VAL),
                                protocol=protocol, output_dir=f"{output_dir}/{protocol}", **common)
        for protocol in ("within", "query_gallery")
    }


def _worker(rank: int, world: int, init_file: str, checkpoint: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # 2 processes share 2 cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_stage_result(checkpoint, out_dir), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_equal_one(checkpoint, tmp_path):
    single = _stage_result(str(checkpoint), str(tmp_path / "single"))
    context = mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(checkpoint), str(tmp_path)), nprocs=2, join=False)
    join_workers(context)  # a hang: pytest-timeout ends it, and the workers with it
    assert single["within"]["raw"]["num_queries"] == VAL and single["query_gallery"]["gallery_size"] == TRAIN
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == single


def test_stage_ranks_the_backbone_features_and_reports(checkpoint, tmp_path, capsys, monkeypatch):
    figures = record_figures(monkeypatch, matplotlib.figure)  # the stages draw through frozen.result_plot
    data = synthetic_data(batch_size=BATCH, train_size=TRAIN, val_size=VAL)
    result = run_retrieval(str(checkpoint), data, protocol="query_gallery", ks=[1, 5], bpa=BPASettings(enabled=False), accelerator="cpu",
                           output_dir=str(tmp_path))
    model = build_from_spec(resolve_backbone(str(checkpoint)))
    embedded = {}
    for split in ("train", "val"):
        dataset = data.eval_dataset(split)
        with torch.no_grad():
            embedded[split] = (model(torch.stack([dataset[i][0] for i in range(len(dataset))])),
                               torch.tensor([dataset[i][1] for i in range(len(dataset))]))
    expected, counted = _reference(F.normalize(embedded["val"][0]), embedded["val"][1], F.normalize(embedded["train"][0]),
                                   embedded["train"][1], [1, 5], same_set=False)
    raw = result["raw"]
    assert (raw.pop("num_queries"), raw.pop("num_skipped")) == (VAL, 0) == (counted, 0)
    assert raw == pytest.approx(expected, abs=1e-3)
    assert {key: value for key, value in result.items() if key != "raw"} == {
        "protocol": "query_gallery", "split": "val", "gallery_size": TRAIN, "ks": [1, 5], "backbone": str(checkpoint),
        "feature": "pooled", "bpa_settings": None,
    }
    written = json.loads((tmp_path / "retrieval_results.json").read_text())
    assert written["raw"]["map"] == pytest.approx(expected["map"], abs=1e-3)
    row = result["raw"]
    assert capsys.readouterr().out == (
        f"retrieval (query_gallery): {VAL} val queries against a gallery of {TRAIN} (pooled features; 0 queries "
        "without a match left out; %)\n"
        f"features       R@1     R@5  R-prec   MAP@R     mAP\n"
        f"raw       {row['recall@1']:>8.2f}{row['recall@5']:>8.2f}{row['r_precision']:>8.2f}{row['map_at_r']:>8.2f}"
        f"{row['map']:>8.2f}\n"
    )
    (axes,) = figures[0].axes
    (curve,) = axes.lines
    assert list(curve.get_xdata()) == [1, 5] and list(curve.get_ydata()) == [row["recall@1"], row["recall@5"]]
    assert axes.get_ylabel() == "Recall@K (%)" and (tmp_path / "recall_at_k.png").stat().st_size > 0


@pytest.mark.parametrize("arguments, message", [
    (["--protocol", "all"], "bam retrieval: protocol must be one of within, query_gallery; got 'all'"),
    (["--ks", "[0, 5]"], "bam retrieval: ks must list positive ranks, e.g. [1, 2, 4, 8]; got [0, 5]"),
    (["--protocol", "query_gallery", "--split", "train"],
     "bam retrieval: protocol query_gallery takes the queries from the held-out split: leave split at 'val'"),
])
def test_bad_settings_end_in_one_line(checkpoint, tmp_path, arguments, message):
    data = ["--data", "bam.evaluation.data.BuiltinClassificationData", "--data.name", "synthetic", "--data.options",
            "{train_size: 8, val_size: 8, image_size: 32, num_classes: 4}", "--data.image_size", "32",
            "--data.resize_size", "32", "--data.num_workers", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--backbone", str(checkpoint), "--accelerator", "cpu", "--output_dir", str(tmp_path), *data, *arguments])
    assert str(exit_info.value.code) == message


def test_the_stage_is_in_bam_help():
    assert STAGES["retrieval"][0] == "bam.evaluation.retrieval"
    assert "  retrieval  image retrieval on frozen features, raw and BPA" in usage()


def _labelled_folder(root: Path, images_per_class: dict[str, int], seed: int) -> None:
    """Class folders of 32-px PNGs: each class a colour, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    for index, (name, count) in enumerate(images_per_class.items()):
        (root / name).mkdir(parents=True)
        colour = torch.tensor([(index * 80) % 256, (index * 150) % 256, 255 - index * 60])
        for number in range(count):
            noise = torch.randint(-40, 40, (32, 32, 3), generator=generator)
            pixels = (colour + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{number}.png")


@pytest.fixture(scope="module")
def export(checkpoint, tmp_path_factory) -> Path:
    from bam.io import export_backbone
    from bam.recipe import DataRecipe

    recipe = DataRecipe(mean=(0.5,) * 3, std=(0.25,) * 3, input_size=32, crop_pct=1.0)
    return export_backbone(checkpoint, tmp_path_factory.mktemp("export") / "backbone", recipe=recipe)


@pytest.mark.process
def test_bam_retrieval_on_a_query_gallery_folder_with_the_reid_config(export, tmp_path):
    _labelled_folder(tmp_path / "gallery", {"id1": 5, "id2": 4, "id3": 6}, seed=0)
    _labelled_folder(tmp_path / "query", {"id1": 2, "id2": 2, "id3": 1}, seed=1)
    out = tmp_path / "out"
    run = run_bam(["retrieval", "--config", "market1501", "--backbone", str(export), "--accelerator", "cpu",
                   "--output_dir", str(out), "--data.init_args.root", str(tmp_path / "gallery"),
                   "--data.init_args.val_root", str(tmp_path / "query"), "--data.init_args.num_workers", "0",
                   "--data.init_args.image_size", "32", "--data.init_args.resize_size", "32"])
    assert run.returncode == 0, run.stdout
    result = json.loads((out / "retrieval_results.json").read_text())
    assert (result["protocol"], result["gallery_size"], result["ks"]) == ("query_gallery", 15, [1, 5, 10])
    assert result["raw"]["num_queries"] == result["bpa"]["num_queries"] == 5
    assert "retrieval (query_gallery): 5 val queries against a gallery of 15" in run.stdout
    assert "retrieval: ranking (bpa): 100%" in run.stdout and (out / "recall_at_k.png").exists()
    assert result["raw"]["recall@1"] == 100.0  # one colour per identity: the nearest image is a match


@pytest.mark.process
def test_bam_retrieval_demo_config_on_the_held_out_digits(export, tmp_path):
    run = run_bam(["retrieval", "--config", "demo", "--backbone", str(export), "--output_dir", str(tmp_path)])
    assert run.returncode == 0, run.stdout
    result = json.loads((tmp_path / "retrieval_results.json").read_text())
    assert (result["protocol"], result["split"], result["raw"]["num_queries"]) == ("within", "val", 1000)
    assert f"retrieval (within): 1000 val queries against the rest of the split" in run.stdout


def test_a_missing_query_folder_is_one_line(export, tmp_path):
    """In this process: the stage's exit message is the one line `bam retrieval` prints (the
    tests above run the console script)."""
    _labelled_folder(tmp_path / "gallery", {"id1": 2}, seed=0)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "market1501", "--backbone", str(export), "--accelerator", "cpu",
              "--data.init_args.root", str(tmp_path / "gallery"), "--data.init_args.val_root", str(tmp_path / "nope")])
    assert str(exit_info.value.code) == f"bam retrieval: image folder or list not found: {tmp_path / 'nope'}"
