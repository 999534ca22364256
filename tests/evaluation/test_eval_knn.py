"""`bam knn`: the stage at toy size, its command line and configs, and two gloo processes giving
exactly the single-process result."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from bam.cli import main as bam_main
from bam.evaluation import frozen, knn_class_scores, knn_stage
from bam.evaluation.backbone import build_from_spec, resolve_backbone
from bam.evaluation.classifier import accuracy_metrics
from bam.evaluation.data import BuiltinClassificationData
from bam.evaluation.frozen import init_distributed, select_device
from bam.features.extract import FeatureExtractor, embed_dataset
from bam.evaluation.knn_stage import main, run_knn
from bam.models.backbones import build_backbone
from bam.transforms import BPASettings, bpa
from eval_fixtures import CNN, VIT, synthetic_args, synthetic_data, write_checkpoint
from tiny_runs import join_workers

# odd sizes: the shards of 2 processes differ in length and the last batches are partial
TRAIN, VAL, BATCH = 37, 21, 8


def knn_and_bank(checkpoint: str, output_dir: str) -> dict:
    data = synthetic_data(batch_size=BATCH, train_size=TRAIN, val_size=VAL)
    result = run_knn(checkpoint, data, accelerator="cpu", output_dir=output_dir, bank_chunk_rows=10)
    torch.manual_seed(0)
    extractor = FeatureExtractor(build_backbone(CNN[0], **CNN[1]))
    bank, labels = embed_dataset(data.eval_dataset("train"), extractor, torch.device("cpu"), BATCH)
    return {"result": result, "bank": bank, "labels": labels}


def _worker(rank: int, world: int, init_file: str, checkpoint: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # 2 processes share 2 cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(knn_and_bank(checkpoint, out_dir), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("knn"), *CNN)


@pytest.mark.distributed
def test_two_processes_equal_one(checkpoint, tmp_path):
    single = knn_and_bank(str(checkpoint), str(tmp_path / "single"))
    context = mp.spawn(
        _worker, args=(2, str(tmp_path / "init"), str(checkpoint), str(tmp_path)), nprocs=2, join=False
    )
    join_workers(context)  # a hang: pytest-timeout ends it, and the workers with it
    for rank in range(2):
        shared = torch.load(tmp_path / f"rank{rank}.pt")
        assert shared["result"] == single["result"]
        assert shared["result"]["bank_size"] == TRAIN and shared["result"]["num_queries"] == VAL
        # every bank row is a real image's features, each image exactly once, in dataset order
        torch.testing.assert_close(shared["bank"], single["bank"])
        assert torch.equal(shared["labels"], single["labels"])


def test_stage_writes_results_and_bank_fraction_bounds_the_bank(checkpoint, tmp_path, capsys):
    common = ["--accelerator", "cpu", "--output_dir", str(tmp_path), *synthetic_args(batch_size=32, train_size=96)]
    main(["--backbone", str(checkpoint), *common])
    progress = capsys.readouterr().err  # progress bars while embedding and classifying
    assert "k-NN: embedding the bank: 100%" in progress and "k-NN: classifying the queries: 100%" in progress
    result = json.loads((tmp_path / "knn_results.json").read_text())
    assert result["k"] == 20 and result["temperature"] == 0.07 and result["feature"] == "pooled"
    assert 0 <= result["top1"] <= result["top5"] <= 100
    assert (result["bank_size"], result["num_queries"]) == (96, 32)
    main(["--backbone", str(checkpoint), "--bank_fraction", "0.25", *common])
    assert json.loads((tmp_path / "knn_results.json").read_text())["bank_size"] == 24  # 6 of each of 4 classes


def test_unknown_option_is_rejected_by_name(checkpoint, capsys):
    with pytest.raises(SystemExit):
        main(["--backbone", str(checkpoint), "--temprature", "0.1", *synthetic_args()])
    assert "temprature" in capsys.readouterr().err


def _embedded(model, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every image of `dataset`, embedded here in one batch."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        return model(images), torch.tensor([dataset[i][1] for i in range(len(dataset))])


def _pooled(data, split: str, checkpoint: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image of `split`, from the checkpoint's teacher built here."""
    return _embedded(build_from_spec(resolve_backbone(str(checkpoint))), data.eval_dataset(split))


def test_run_knn_defaults_are_the_weighted_vote_of_pooled_features(checkpoint, tmp_path, capsys):
    data = synthetic_data(batch_size=BATCH, train_size=TRAIN, val_size=VAL)
    out = tmp_path / "runs" / "knn"  # made with its parents
    result = run_knn(str(checkpoint), data, accelerator="cpu", output_dir=str(out))  # feature: auto
    bank, bank_labels = _pooled(data, "train", checkpoint)
    queries, labels = _pooled(data, "val", checkpoint)
    scores = knn_class_scores(queries, bank, bank_labels, num_classes=4, k=20, temperature=0.07)
    correct = int((scores.argmax(dim=1) == labels).sum())
    assert result.pop("top1") == pytest.approx(100 * correct / VAL, abs=1e-3)
    assert result.pop("by_k") == {"20": {"top1": pytest.approx(100 * correct / VAL, abs=1e-3), "top5": 100.0}}
    assert result == {
        "top5": 100.0, "k": 20, "temperature": 0.07, "bank_size": TRAIN, "num_queries": VAL, "files": None,
        "backbone": str(checkpoint), "feature": "pooled", "bpa": None,
    }  # top-5 of 4 classes: always right
    text = (out / "knn_results.json").read_text()
    written = json.loads(text)
    assert text == json.dumps(written, indent=2)  # for people to read
    written.pop("by_k")
    assert written.pop("top1") == pytest.approx(100 * correct / VAL, abs=1e-3) and written == result
    top1 = 100 * correct / VAL
    assert capsys.readouterr().out == (
        f"k-NN (T=0.07, pooled features; {VAL} queries, bank of {TRAIN})\n"
        "     k    top-1    top-5\n"
        f"    20 {top1:>7.2f}%  100.00%\n"
    )


def test_under_torchrun_the_stage_joins_a_gloo_process_group_on_the_cpu(checkpoint, tmp_path, monkeypatch):
    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; the group itself is not created here
    monkeypatch.setattr(dist, "init_process_group", lambda backend=None, **kwargs: joined.append(backend))
    result = run_knn(str(checkpoint), synthetic_data(batch_size=BATCH, train_size=TRAIN, val_size=VAL),
                     accelerator="cpu", output_dir=str(tmp_path))
    assert joined == ["gloo"] and result["num_queries"] == VAL


# --- the set-up of the frozen-feature stages (bam.evaluation.frozen) ------------------------------


def test_select_device_takes_this_process_gpu(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)  # no GPU needed: record the choice
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("cpu") == select_device("auto") == torch.device("cpu")
    assert select_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert select_device("cuda") == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda", 3)
    assert select_device("cpu") == torch.device("cpu")
    assert chosen == [torch.device("cuda", 0), torch.device("cuda", 3), torch.device("cuda", 3)]


def test_init_distributed_joins_once_with_the_backend_of_the_device(monkeypatch):
    joined = []
    monkeypatch.setattr(dist, "init_process_group", joined.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    init_distributed(torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    init_distributed(torch.device("cpu"))
    assert joined == []  # not under torchrun, or a single process: no group
    monkeypatch.setenv("WORLD_SIZE", "2")
    init_distributed(torch.device("cpu"))
    init_distributed(torch.device("cuda", 1))
    assert joined == ["gloo", "nccl"]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    init_distributed(torch.device("cpu"))
    assert joined == ["gloo", "nccl"]  # already joined


def test_embed_split_embeds_on_the_selected_device(checkpoint, monkeypatch):
    devices = []
    real, real_extractor = frozen.embed_dataset, frozen.frozen_extractor

    def recording(dataset, fn, device, *args, **kwargs):
        devices.append(device)
        return real(dataset, fn, device, *args, **kwargs)

    def extractor_recording_moves(*args):
        extractor = real_extractor(*args)
        move = extractor.to
        extractor.to = lambda *where: devices.append(("extractor moved to", *where)) or move(*where)
        return extractor

    monkeypatch.setattr(frozen, "embed_dataset", recording)
    monkeypatch.setattr(frozen, "frozen_extractor", extractor_recording_moves)
    data = synthetic_data(batch_size=BATCH, train_size=TRAIN, val_size=VAL)
    embedded = frozen.embed_split(str(checkpoint), data, "testing", split="train", accelerator="cpu")
    assert devices == [("extractor moved to", torch.device("cpu")), torch.device("cpu")] and embedded.device == torch.device("cpu") and embedded.split == "train"
    features, labels = _pooled(data, "train", checkpoint)
    torch.testing.assert_close(embedded.features, features)
    assert torch.equal(embedded.labels, labels) and embedded.extractor.readout == "pooled"


def test_frozen_extractor_takes_the_chosen_encoder(checkpoint):
    data = synthetic_data(batch_size=BATCH, train_size=TRAIN, val_size=VAL)
    images = torch.stack([data.eval_dataset("val")[i][0] for i in range(4)])
    for encoder in ("student", "teacher"):
        extractor = frozen.frozen_extractor(str(checkpoint), encoder, None, "auto", data)
        expected = build_from_spec(resolve_backbone(str(checkpoint), encoder=encoder))
        with torch.no_grad():
            torch.testing.assert_close(extractor(images), expected(images))
    student = resolve_backbone(str(checkpoint), encoder="student").state
    teacher = resolve_backbone(str(checkpoint)).state
    assert any(not torch.equal(student[name], teacher[name]) for name in teacher)  # the test tells them apart


def test_accelerator_defaults_to_auto(checkpoint, tmp_path, monkeypatch):
    asked = []

    def cpu_whatever_asked(accelerator):
        asked.append(accelerator)
        return torch.device("cpu")

    monkeypatch.setattr(frozen, "select_device", cpu_whatever_asked)
    monkeypatch.setattr(knn_stage, "select_device", cpu_whatever_asked)
    data = synthetic_data(batch_size=BATCH, train_size=TRAIN, val_size=VAL)
    frozen.embed_split(str(checkpoint), data, "testing")
    run_knn(str(checkpoint), data, output_dir=str(tmp_path))
    assert asked == ["auto", "auto"]  # CUDA when available


def test_run_knn_settings_reach_the_vote_of_bpa_features(checkpoint, tmp_path, capsys):
    """Every setting changed from its default, against the vote recomputed here: the student's
    features, a class-balanced half of the training split as bank, each query batch transformed by
    BPA (reg 0.2, 3 iterations) together with the bank, then k=17 neighbours at T=0.5 over 8 classes
    (top-5 is not trivially right). 17 neighbours from a bank of 3 images per class vote for at least
    6 classes, so no top-5 is decided among tied zero votes, whose order no sort promises."""
    options = {"train_size": 48, "val_size": 22, "image_size": 32, "num_classes": 8}
    data = BuiltinClassificationData("synthetic", options, image_size=32, resize_size=32, num_workers=0, batch_size=8)
    out = tmp_path / "out"
    result = run_knn(str(checkpoint), data, encoder="student", k=17, temperature=0.5, bank_fraction=0.5,
                     bank_chunk_rows=5, accelerator="cpu", output_dir=str(out), bpa=BPASettings(reg=0.2, iterations=3))
    student = build_from_spec(resolve_backbone(str(checkpoint), encoder="student"))
    bank, bank_labels = _embedded(student, data.eval_dataset("train", 0.5))
    queries, labels = _embedded(student, data.eval_dataset("val"))
    assert len(bank) == 24 and torch.equal(bank_labels.bincount(), torch.full((8,), 3))
    bank = F.normalize(bank, dim=1)
    metrics = accuracy_metrics(8)
    for start in range(0, len(queries), 8):  # one BPA set per query batch of 8: bank + batch
        moved = bpa(torch.cat([bank, queries[start : start + 8]]), 0.2, 3)
        scores = knn_class_scores(moved[24:], moved[:24], bank_labels, 8, k=17, temperature=0.5)
        metrics.update(scores, labels[start : start + 8])
    expected = {name: round(100.0 * value.item(), 4) for name, value in metrics.compute().items()}
    assert 0 < expected["top1"] < expected["top5"] < 100  # the test can tell top-1 from top-5 and from chance
    assert result == {
        **expected, "k": 17, "by_k": {"17": expected}, "temperature": 0.5, "bank_size": 24, "num_queries": 22,
        "files": None, "backbone": str(checkpoint), "feature": "pooled", "bpa": {"reg": 0.2, "iterations": 3},
    }
    assert json.loads((out / "knn_results.json").read_text()) == result
    assert capsys.readouterr().out == (
        "k-NN (T=0.5, pooled features + BPA; 22 queries, bank of 24)\n"
        "     k    top-1    top-5\n"
        f"    17 {expected['top1']:>7.2f}% {expected['top5']:>7.2f}%\n"
    )


def test_several_k_are_one_pass_and_each_is_the_single_k_result(checkpoint, tmp_path, capsys):
    data = synthetic_data(batch_size=BATCH, train_size=TRAIN, val_size=VAL)
    counts = [10, 1, 37, 5]  # any order; 37 is the whole bank
    several = run_knn(str(checkpoint), data, k=counts, temperature=0.3, accelerator="cpu", output_dir=str(tmp_path))
    printed = capsys.readouterr().out
    bank, bank_labels = _pooled(data, "train", checkpoint)
    queries, labels = _pooled(data, "val", checkpoint)
    expected = {}
    for count in counts:
        metrics = accuracy_metrics(4)
        metrics.update(knn_class_scores(queries, bank, bank_labels, num_classes=4, k=count, temperature=0.3), labels)
        expected[str(count)] = {name: round(100.0 * value.item(), 4) for name, value in metrics.compute().items()}
    assert len({row["top1"] for row in expected.values()}) > 1, "the counts would not show on this data"
    assert list(several["by_k"]) == ["10", "1", "37", "5"]
    for count, row in expected.items():
        assert several["by_k"][count] == pytest.approx(row), count
    assert (several["k"], several["top1"], several["top5"]) == (10, *expected["10"].values())  # the first is the headline
    assert json.loads((tmp_path / "knn_results.json").read_text()) == several
    rows = "".join(f"{k:>6} {row['top1']:>7.2f}% {row['top5']:>7.2f}%\n" for k, row in several["by_k"].items())
    assert printed == f"k-NN (T=0.3, pooled features; {VAL} queries, bank of {TRAIN})\n     k    top-1    top-5\n{rows}"


@pytest.mark.parametrize("k", [0, [], [10, 10], [20, -1]])
def test_bad_neighbour_counts_are_named(checkpoint, tmp_path, k):
    with pytest.raises(ValueError) as error:
        run_knn(str(checkpoint), synthetic_data(), k=k, accelerator="cpu", output_dir=str(tmp_path))
    assert str(error.value) == (
        f"k must be one or more distinct neighbour counts of at least 1, e.g. 20 or [10, 20, 100, 200]; got {k}"
    )


def test_a_repeated_k_on_the_bam_command_line_is_one_line(checkpoint, tmp_path):
    """`bam knn ... --k 20 20` (the command's entry point, in this process: the stage's exit message
    is the one line the console script prints)."""
    with pytest.raises(SystemExit) as stop:
        bam_main(["knn", "--backbone", str(checkpoint), *synthetic_args(), "--accelerator", "cpu",
                  "--output_dir", str(tmp_path), "--k", "20", "20"])
    assert str(stop.value.code) == (
        "bam knn: k must be one or more distinct neighbour counts of at least 1, e.g. 20 or [10, 20, 100, 200]; "
        "got [20, 20]"
    )


def test_gather_values_writes_several_values_as_a_list():
    argv = ["--k", "10", "20", "100", "--temperature", "0.1", "--k", "7", "--bpa", "true"]
    assert knn_stage.gather_values(argv, "--k") == [
        "--k", "[10, 20, 100]", "--temperature", "0.1", "--k", "7", "--bpa", "true"]


def test_results_go_to_runs_knn_by_default(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_knn(str(checkpoint), synthetic_data(batch_size=BATCH, train_size=8, val_size=8), accelerator="cpu")
    assert [path.name for path in (tmp_path / "runs" / "knn").iterdir()] == ["knn_results.json"]


def test_embed_split_takes_the_chosen_encoder_split_fraction_and_names_its_purpose(checkpoint, capsys):
    data = synthetic_data(batch_size=BATCH, train_size=TRAIN, val_size=24)
    embedded = frozen.embed_split(str(checkpoint), data, "testing", encoder="student", feature="pooled", split="val",
                                  fraction=0.5, accelerator="cpu")
    features, labels = _embedded(build_from_spec(resolve_backbone(str(checkpoint), encoder="student")),
                                 data.eval_dataset("val", 0.5))
    assert len(labels) == 12
    torch.testing.assert_close(embedded.features, features)
    assert torch.equal(embedded.labels, labels) and embedded.split == "val"
    assert "testing: embedding the val split: 100%" in capsys.readouterr().err


def test_run_knn_embeds_the_bank_on_the_selected_device(checkpoint, tmp_path, monkeypatch):
    devices = []
    real = knn_stage.embed_dataset
    monkeypatch.setattr(knn_stage, "embed_dataset",
                        lambda dataset, fn, device, *args, **kwargs: devices.append(device) or real(dataset, fn, device, *args, **kwargs))
    run_knn(str(checkpoint), synthetic_data(batch_size=BATCH, train_size=8, val_size=8), accelerator="cpu",
            output_dir=str(tmp_path))
    assert devices == [torch.device("cpu")]


@pytest.fixture(scope="module")
def unnamed_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint that records its architecture's settings but not its name: loadable with arch= only."""
    from io_layouts import bam_checkpoint

    torch.manual_seed(1)
    teacher, student = (build_backbone(CNN[0], **CNN[1]) for _ in range(2))
    path = tmp_path_factory.mktemp("unnamed") / "unnamed.ckpt"
    torch.save(bam_checkpoint(student, teacher, {"backbone_kwargs": CNN[1]}), path)
    return path


def test_arch_reaches_every_stage_that_reads_a_checkpoint(unnamed_checkpoint, tmp_path):
    from bam.evaluation.finetune import FineTune
    from bam.evaluation.linear import LinearProbe

    path = str(unnamed_checkpoint)
    with pytest.raises(Exception, match="pass arch= / --arch"):
        resolve_backbone(path)  # without arch= the architecture is unknown
    spec = resolve_backbone(path, arch="bam_cnn4")
    assert (spec.model_name, spec.model_kwargs) == ("bam_cnn4", CNN[1])
    data = synthetic_data(batch_size=BATCH, train_size=8, val_size=8)
    assert frozen.frozen_extractor(path, None, "bam_cnn4", "auto", data).readout == "pooled"
    assert frozen.embed_split(path, data, "testing", arch="bam_cnn4", accelerator="cpu").features.shape == (8, 32)
    assert run_knn(path, data, arch="bam_cnn4", accelerator="cpu", output_dir=str(tmp_path))["bank_size"] == 8
    assert LinearProbe(path, num_classes=4, arch="bam_cnn4").extractor.out_dim == 32
    assert FineTune(path, num_classes=4, arch="bam_cnn4", drop_path_rate=0).architecture["model"] == "bam_cnn4"


def test_a_random_init_baseline_by_timm_name():
    spec = resolve_backbone("bam_cnn4")
    assert (spec.model_name, spec.model_kwargs, spec.state, spec.recipe, spec.encoder, spec.source_format) == (
        "bam_cnn4", {}, {}, None, "random init", "timm")


def test_a_mismatching_architecture_is_named_in_the_error(checkpoint):
    spec = resolve_backbone(str(checkpoint))
    spec.model_kwargs = {"width": 16}  # the weights are width 8
    with pytest.raises(Exception, match="do not fit architecture 'bam_cnn4'"):
        build_from_spec(spec)


def test_the_frozen_extractor_gives_the_data_the_backbone_recipe_and_vits_their_class_token(checkpoint, tmp_path):
    from bam.evaluation.data import RecipeMismatchWarning
    from bam.io import export_backbone
    from bam.recipe import DataRecipe

    recipe = DataRecipe(mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4), input_size=48, crop_pct=1.0)
    export = export_backbone(checkpoint, tmp_path / "export", recipe=recipe)
    data = synthetic_data()  # 32 px set explicitly, mean and std left to the backbone
    with pytest.warns(RecipeMismatchWarning) as caught:
        frozen.frozen_extractor(str(export), None, None, "auto", data)
    assert [str(warning.message) for warning in caught] == [
        f"data.image_size=32 differs from the image_size 48 that {export} was trained with (its data recipe); "
        "using data.image_size=32 as set. Leave data.image_size unset to use the recipe's."
    ]
    assert (data.mean, data.std, data.image_size) == ((0.5, 0.4, 0.3), (0.2, 0.3, 0.4), 32)
    vit = write_checkpoint(tmp_path, *VIT)
    assert frozen.frozen_extractor(str(vit), None, None, "auto", synthetic_data()).readout == "cls"


def test_run_knn_reports_the_files_on_the_selected_device(checkpoint, tmp_path, monkeypatch):
    settled = []
    real = knn_stage.report_files
    monkeypatch.setattr(knn_stage, "report_files", lambda *args: settled.append(args[1:]) or real(*args))
    run_knn(str(checkpoint), synthetic_data(batch_size=BATCH, train_size=8, val_size=8), accelerator="cpu",
            output_dir=str(tmp_path))
    assert settled == [(tmp_path / "skipped_files.tsv", torch.device("cpu"))]
