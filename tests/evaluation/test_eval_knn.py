"""`bam knn`: the stage at toy size, its command line and configs, and two gloo processes giving
exactly the single-process result."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bam.features.extract import FeatureExtractor, embed_dataset
from bam.evaluation.knn_stage import main, run_knn
from bam.models.backbones import build_backbone
from eval_fixtures import CNN, synthetic_args, synthetic_data, write_checkpoint

HANG_GUARD_S = 180  # only to turn a deadlock into a failure; not a performance limit
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
    context.join(timeout=HANG_GUARD_S) or context.join(timeout=HANG_GUARD_S)
    hung = [process for process in context.processes if process.is_alive()]
    for process in hung:  # a failed test must not leave its workers running
        process.kill()
    assert not hung, "processes hung"
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
