"""Curve plots: the pure `plot_metrics` on a constructed metrics.csv, and `bam pretrain` writing
its plots into the run directory."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bam.callbacks import CurvePlots, plot_metrics
from bam.training.plots import curve_figure, plot_summary, read_curves, summary_figure
from bam.cli import main as bam
from repo_paths import REPO

CONFIGS = REPO / "configs"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_metrics_csv(path: Path) -> None:
    """Rows as Lightning's CSV logger writes them: one per logging call, other cells empty."""
    fields = ["epoch", "step", "knn/top1", "train/loss", "train/lr"]
    rows = [{"epoch": 0, "step": s, "train/loss": 5.0 - 0.1 * s, "train/lr": 1e-3 * s} for s in range(10)]
    rows.append({"epoch": 0, "step": 9, "knn/top1": 42.0})
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _assert_pngs(paths: list[Path]) -> None:
    for path in paths:
        assert path.read_bytes().startswith(PNG_SIGNATURE), path


def test_read_curves_skips_empty_cells(tmp_path):
    _write_metrics_csv(tmp_path / "metrics.csv")
    curves = read_curves(tmp_path / "metrics.csv")
    assert sorted(curves) == ["knn/top1", "train/loss", "train/lr"]
    assert curves["knn/top1"] == ([9.0], [42.0])
    assert len(curves["train/loss"][0]) == 10


def test_plot_metrics_writes_one_png_per_metric(tmp_path):
    _write_metrics_csv(tmp_path / "metrics.csv")
    written = plot_metrics(tmp_path / "metrics.csv", tmp_path / "plots")
    assert sorted(path.name for path in written) == ["knn_top1.png", "train_loss.png", "train_lr.png"]
    _assert_pngs(written)


def test_plot_metrics_selects_and_ignores_unknown_names(tmp_path):
    _write_metrics_csv(tmp_path / "metrics.csv")
    written = plot_metrics(tmp_path / "metrics.csv", tmp_path / "plots", metrics=["train/loss", "val/top1"])
    assert [path.name for path in written] == ["train_loss.png"]


def test_summary_figure_has_word_labels_and_the_knn_baselines(tmp_path):
    _write_metrics_csv(tmp_path / "metrics.csv")
    curves = read_curves(tmp_path / "metrics.csv")
    figure = summary_figure(curves, {"random init": 30.0, "raw pixels": 35.5})
    loss, accuracy, lr = figure.axes
    assert (loss.get_xlabel(), loss.get_ylabel()) == ("training step", "training loss")
    assert accuracy.get_ylabel() == "k-NN top-1 accuracy (%)" and lr.get_ylabel() == "learning rate"
    labels = [line.get_label() for line in accuracy.get_lines()]
    assert labels == ["k-NN top-1 accuracy (%)", "random init: 30.0%", "raw pixels: 35.5%"]
    assert [line.get_ydata()[0] for line in accuracy.get_lines()[1:]] == [30.0, 35.5]
    _assert_pngs([plot_summary(curves, tmp_path / "summary.png")])
    assert summary_figure({"other/metric": ([0.0], [1.0])}) is None


def test_knn_plot_draws_the_baselines():
    axes = curve_figure("knn/top1", [10.0, 20.0], [50.0, 60.0], {"random init": 30.0}).axes[0]
    assert [line.get_label() for line in axes.get_lines()] == ["trained backbone", "random init: 30.0%"]
    assert axes.get_title() == "k-NN top-1 accuracy (%)"


def test_callback_without_csv_logger_writes_nothing(tmp_path):
    class Trainer:  # the attributes the callback reads
        is_global_zero = True
        loggers: list = []
        default_root_dir = str(tmp_path)

    callback = CurvePlots()
    callback.on_fit_end(Trainer(), None)
    assert callback.written == [] and not (tmp_path / "plots").exists()


@pytest.mark.slow  # 7 CPU-seconds: longer than a fast-tier test may take (a few seconds)
def test_pretrain_writes_curve_plots(tmp_path):
    run_dir = tmp_path / "run"
    bam([
        "pretrain", "--config", str(CONFIGS / "pretrain" / "demo.yaml"),
        "--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", "3",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--data.init_args.fraction", "0.05", "--data.init_args.batch_size", "64",
        "--data.init_args.knn_bank_fraction", "0.05",
        "--knn.every_n_epochs", "1", "--knn.compare_baselines", "false",
        "--model.init_args.projector.hidden_dim", "64", "--model.init_args.projector.out_dim", "32",
        "--pictures.enabled", "false",  # the t-SNE map: tests/evaluation/test_eval_demo_chain.py draws it
    ])
    names = {path.name for path in (run_dir / "plots").glob("*.png")}
    expected = {"train_loss.png", "train_lr.png", "train_reg.png", "train_weight_decay.png", "knn_top1.png", "summary.png"}
    assert expected <= names, names
    _assert_pngs(sorted((run_dir / "plots").glob("*.png")))


def test_linear_stage_writes_accuracy_plots(tmp_path):
    from bam.evaluation import linear

    run_dir = tmp_path / "linear"
    linear.main([
        "--config", str(CONFIGS / "eval" / "linear_demo.yaml"), "--model.backbone", "bam_cnn4",
        "--trainer.default_root_dir", str(run_dir), "--trainer.max_epochs", "1",
        "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
        "--data.init_args.fraction", "0.1", "--data.init_args.batch_size", "64",
        "--data.init_args.image_size", "28", "--data.init_args.resize_size", "28",  # random init: no recipe
    ])
    names = {path.name for path in (run_dir / "plots").glob("*.png")}
    assert {"train_loss.png", "val_top1.png", "summary.png"} <= names, names
    _assert_pngs(sorted((run_dir / "plots").glob("*.png")))
    # one run, one version folder: CSV and TensorBoard both in version_0, as in pretraining
    versions = sorted(str(path.relative_to(run_dir)) for path in run_dir.glob("*/version_*"))
    assert versions == ["csv/version_0", "tensorboard/version_0"]
    assert list((run_dir / "tensorboard" / "version_0").glob("events.out.tfevents.*"))


def test_plots_survive_a_logger_of_the_users_choice(tmp_path):
    from bam.evaluation import linear

    run_dir = tmp_path / "linear"
    linear.main([  # as `--trainer.logger WandbLogger` would: a logger that is not a CSV logger
        "--config", str(CONFIGS / "eval" / "linear_demo.yaml"), "--model.backbone", "bam_cnn4",
        "--trainer.default_root_dir", str(run_dir), "--trainer.max_epochs", "1",
        "--trainer.logger", "pytorch_lightning.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir", str(tmp_path / "users_logs"),
        "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
        "--data.init_args.fraction", "0.1", "--data.init_args.batch_size", "64",
        "--data.init_args.image_size", "28", "--data.init_args.resize_size", "28",  # random init: no recipe
    ])
    assert list((tmp_path / "users_logs").rglob("events.out.tfevents.*"))  # the user's logger logged
    assert (run_dir / "plots" / "summary.png").is_file()
