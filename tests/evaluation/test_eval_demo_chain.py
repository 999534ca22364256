"""The demo chain of docs/demo.md at toy size, with the shipped configs: pretrain (and its end-of-run
pictures) -> export -> k-NN and linear probe on the built-in MNIST digits."""
from __future__ import annotations

import json
import re

import matplotlib.figure
import pytest

from bam.cli import main as bam
from bam.evaluation import knn_stage, linear
from bam.evaluation.data import RecipeMismatchWarning
from eval_fixtures import record_figures
from repo_paths import REPO

CONFIGS = REPO / "configs"
QUIET = [
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--trainer.logger", "false",
]


@pytest.mark.slow
def test_pretrain_export_knn_linear(tmp_path, monkeypatch):
    figures = record_figures(monkeypatch, matplotlib.figure)
    bam([
        "pretrain", "--config", str(CONFIGS / "pretrain" / "demo.yaml"), *QUIET,
        "--trainer.default_root_dir", str(tmp_path / "pretrain"), "--trainer.max_epochs", "1",
        "--data.init_args.fraction", "0.05", "--data.init_args.batch_size", "64",
        "--data.init_args.knn_bank_fraction", "0.1", "--knn.compare_baselines", "false",
        "--model.init_args.projector.hidden_dim", "64", "--model.init_args.projector.out_dim", "32",
    ])
    # the demo ends with pictures of the 1,000 held-out digits: 6 queries with 5 neighbours each, and
    # their 2-D map coloured by the 10 classes
    plots = tmp_path / "pretrain" / "plots"
    assert (plots / "neighbours.png").stat().st_size > 0 and (plots / "embedding_map.png").stat().st_size > 0
    grid, layout = figures
    assert grid.get_suptitle() == "nearest neighbours (cosine similarity of the embeddings)" and len(grid.axes) == 36
    assert re.fullmatch(r"(t-SNE|UMAP) of 1000 embeddings \(coloured by class\)", layout.axes[0].get_title())
    assert [text.get_text() for text in layout.axes[0].get_legend().get_texts()] == [str(digit) for digit in range(10)]
    checkpoint = tmp_path / "pretrain" / "checkpoints" / "last.ckpt"
    bam(["export", str(checkpoint), "--output", str(tmp_path / "backbone")])
    backbone = str(tmp_path / "backbone")

    # the export carries the demo's data recipe, which the k-NN config no longer retypes
    recipe = json.loads((tmp_path / "backbone" / "config.json").read_text())["pretrained_cfg"]
    assert (recipe["mean"], recipe["std"]) == ([0.1307] * 3, [0.3081] * 3)
    assert (recipe["input_size"], recipe["crop_pct"]) == ([3, 28, 28], 1.0)
    knn_stage.main([
        "--config", str(CONFIGS / "eval" / "knn_demo.yaml"), "--backbone", backbone,
        "--bank_fraction", "0.1", "--output_dir", str(tmp_path / "knn"),
    ])
    knn = json.loads((tmp_path / "knn" / "knn_results.json").read_text())
    assert (knn["bank_size"], knn["num_queries"]) == (400, 1000)
    hand_typed = [  # what the demo's config used to spell out
        "--data.init_args.image_size", "28", "--data.init_args.resize_size", "28",
        "--data.init_args.mean", "[0.1307, 0.1307, 0.1307]", "--data.init_args.std", "[0.3081, 0.3081, 0.3081]",
    ]
    knn_stage.main([
        "--config", str(CONFIGS / "eval" / "knn_demo.yaml"), "--backbone", backbone,
        "--bank_fraction", "0.1", "--output_dir", str(tmp_path / "knn_typed"), *hand_typed,
    ])
    typed = json.loads((tmp_path / "knn_typed" / "knn_results.json").read_text())
    assert (knn["top1"], knn["top5"]) == (typed["top1"], typed["top5"])
    imagenet = ["--data.init_args.mean", "[0.485, 0.456, 0.406]", "--data.init_args.std", "[0.229, 0.224, 0.225]"]
    with pytest.warns(RecipeMismatchWarning, match="data.mean"):
        knn_stage.main([
            "--config", str(CONFIGS / "eval" / "knn_demo.yaml"), "--backbone", backbone,
            "--bank_fraction", "0.1", "--output_dir", str(tmp_path / "knn_imagenet"), *imagenet,
        ])

    linear.main([
        "--config", str(CONFIGS / "eval" / "linear_demo.yaml"), "--model.backbone", backbone, *QUIET,
        "--trainer.default_root_dir", str(tmp_path / "linear"), "--trainer.max_epochs", "1",
        "--data.init_args.fraction", "0.1",
    ])
    probe = json.loads((tmp_path / "linear" / "results.json").read_text())
    assert probe["val"]["best_epoch"] == 1
    assert probe["val"]["best_top1"] > 10  # above chance (10 classes) after one epoch on 400 digits
