"""PNG plots of a run's logged curves (loss, lr, reg, weight decay, teacher momentum, accuracy):
one per metric, and one summary figure per run (`summary.png`: loss, accuracy against the
baselines the run computed, the schedules), all with axis labels in words.

The plots are drawn from the CSV logger's `metrics.csv` after training, so they show exactly what
the run logged and can be redrawn later from any run directory with :func:`plot_metrics`.
Figures are built with `matplotlib.figure.Figure` (not pyplot): this needs no display and touches
no global backend state, so it is safe on headless nodes and inside notebooks alike.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_info

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# bookkeeping columns of Lightning's metrics.csv, never plotted
INDEX_COLUMNS = ("step", "epoch")
SUMMARY_FILE = "summary.png"

# logged metric -> what it is, in words (axis labels and titles)
METRIC_NAMES = {
    "train/loss": "training loss",
    "train/lr": "learning rate",
    "train/weight_decay": "weight decay",
    "train/teacher_momentum": "teacher momentum",
    "train/reg": "Sinkhorn regularisation (reg)",
    "train/temperature": "temperature",
    "knn/top1": "k-NN top-1 accuracy (%)",
    "knn/top5": "k-NN top-5 accuracy (%)",
    "knn_student/top1": "k-NN top-1 accuracy of the student (%)",
    "knn_student/top5": "k-NN top-5 accuracy of the student (%)",
    "val/top1": "validation top-1 accuracy (%)",
    "val/top5": "validation top-5 accuracy (%)",
    "val_ema/top1": "validation top-1 of the EMA (%)",
    "val_ema/top5": "validation top-5 of the EMA (%)",
    "contrastive_crop/box_area": "ContrastiveCrop box area (fraction)",
}
ACCURACY_METRICS = ("knn/top1", "val/top1", "val_ema/top1")
SCHEDULE_METRICS = ("train/lr", "train/weight_decay", "train/teacher_momentum", "train/reg")


def metric_label(name: str) -> str:
    """A metric's name in words (the key itself for metrics without one)."""
    return METRIC_NAMES.get(name, name)

Curves = dict[str, tuple[list[float], list[float]]]  # metric -> (x values, y values)


def read_curves(csv_path: str | Path) -> Curves:
    """Every metric of a Lightning `metrics.csv` as (step, value) points, skipping empty cells.

    Lightning writes one row per logging call, with only that call's metrics filled in, so each
    metric keeps only the rows where it has a value. Rows without a step use their row number.
    """
    curves: Curves = {}
    with open(csv_path, newline="") as file:
        for row_number, row in enumerate(csv.DictReader(file)):
            step = _number(row.get("step"))
            x = float(row_number) if step is None else step
            for name, cell in row.items():
                value = _number(cell)
                if name in INDEX_COLUMNS or value is None:
                    continue
                xs, ys = curves.setdefault(name, ([], []))
                xs.append(x)
                ys.append(value)
    return curves


def _number(cell: str | None) -> float | None:
    try:
        value = float(cell) if cell not in (None, "") else None
    except ValueError:  # a non-numeric column (e.g. logged text): not a curve
        return None
    return value if value is not None and math.isfinite(value) else None


def plot_metrics(
    csv_path: str | Path,
    out_dir: str | Path,
    metrics: Sequence[str] | None = None,
    knn_baselines: dict[str, float] | None = None,
) -> list[Path]:
    """Write one PNG per metric of `csv_path` into `out_dir` (created); return the files written.

    `metrics` restricts the plots to those names (all logged metrics by default). A metric
    `train/loss` goes to `train_loss.png`. `knn_baselines` (name -> top-1, e.g. random init and
    raw pixels) are drawn as horizontal lines on the k-NN top-1 plot.
    """
    curves = read_curves(csv_path)
    names = [name for name in (metrics if metrics is not None else sorted(curves)) if name in curves]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        _plot_curve(name, *curves[name], out, knn_baselines if name == "knn/top1" else None) for name in names
    ]


def _plot_curve(
    name: str, xs: list[float], ys: list[float], out_dir: Path, baselines: dict[str, float] | None = None
) -> Path:
    path = out_dir / (name.replace("/", "_") + ".png")
    curve_figure(name, xs, ys, baselines).savefig(path, dpi=100)
    return path


def curve_figure(name: str, xs: list[float], ys: list[float], baselines: dict[str, float] | None = None) -> "Figure":
    """One metric against the training step, titled in words, with `baselines` as horizontal lines."""
    from matplotlib.figure import Figure  # here: importing matplotlib is slow, and only plotting needs it

    figure = Figure(figsize=(5, 3.2), layout="constrained")
    axes = figure.add_subplot()
    # markers keep single points (e.g. one k-NN evaluation) visible
    axes.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label="trained backbone")
    if baselines:
        _draw_baselines(axes, baselines)
        axes.legend(fontsize="small")
    axes.set(xlabel="training step", ylabel=metric_label(name), title=metric_label(name))
    axes.grid(alpha=0.3)
    return figure


def plot_summary(curves: Curves, path: str | Path, baselines: dict[str, float] | None = None) -> Path | None:
    """Write `summary_figure` to `path` (a PNG); None when there is nothing to draw."""
    figure = summary_figure(curves, baselines)
    if figure is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def summary_figure(curves: Curves, baselines: dict[str, float] | None = None) -> "Figure | None":
    """One figure of a run: the training loss, the accuracy curves with `baselines` (name -> top-1
    of e.g. a random-init backbone, drawn as horizontal lines) and each schedule; None when the
    run logged none of them."""
    from matplotlib.figure import Figure

    panels = [("train/loss",)] if "train/loss" in curves else []
    accuracy = tuple(name for name in ACCURACY_METRICS if name in curves)
    panels += [accuracy] if accuracy else []
    panels += [(name,) for name in SCHEDULE_METRICS if name in curves]
    if not panels:
        return None
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows), layout="constrained")
    for index, names in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        for name in names:
            xs, ys = curves[name]
            axes.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=metric_label(name))
        if names == accuracy:
            _draw_baselines(axes, baselines or {})
        title = "accuracy (%)" if names == accuracy and len(names) > 1 else metric_label(names[0])
        axes.set(xlabel="training step", ylabel=title, title=title)
        axes.grid(alpha=0.3)
        if len(axes.get_lines()) > 1:
            axes.legend(fontsize="small")
    return figure


def _draw_baselines(axes: "Axes", baselines: dict[str, float]) -> None:
    for (name, value), style in zip(baselines.items(), ("--", ":", "-.", (0, (5, 1)))):
        axes.axhline(value, linestyle=style, color="grey", label=f"{name}: {value:.1f}%")


class CurvePlots(pl.Callback):
    """At the end of fitting, plot every curve of the CSV logger into `<run dir>/<dirname>/*.png`.

    Args:
        enabled: Set false to write no plots.
        dirname: Sub-folder of `trainer.default_root_dir` that receives the PNG files.
    """

    def __init__(self, enabled: bool = True, dirname: str = "plots") -> None:
        self.enabled = enabled
        self.dirname = dirname
        self.written: list[Path] = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        logger = next((logger for logger in trainer.loggers if isinstance(logger, CSVLogger)), None)
        if logger is None:
            rank_zero_info("CurvePlots: no CSV logger in this run, so no curve plots are written")
            return
        logger.save()  # flush rows still buffered in memory
        csv_path = Path(logger.experiment.metrics_file_path)
        if not csv_path.is_file():
            rank_zero_info(f"CurvePlots: {csv_path} does not exist (nothing logged), so no plots are written")
            return
        out_dir = Path(trainer.default_root_dir) / self.dirname
        baselines = _knn_baselines(trainer)
        self.written = plot_metrics(csv_path, out_dir, knn_baselines=baselines)
        summary = plot_summary(read_curves(csv_path), out_dir / SUMMARY_FILE, baselines)
        self.written += [summary] if summary else []
        rank_zero_info(f"CurvePlots: wrote {len(self.written)} plots to {out_dir}")


def _knn_baselines(trainer: pl.Trainer) -> dict[str, float]:
    """Top-1 k-NN accuracies of the baselines a callback computed (random init, raw pixels): any
    callback with a `baseline_top1()` method reports them (bam's `OnlineKNN` does), so this
    engine-floor module needs no import of the callbacks above it."""
    reporters = [callback for callback in trainer.callbacks if callable(getattr(callback, "baseline_top1", None))]
    return reporters[0].baseline_top1() if reporters else {}
