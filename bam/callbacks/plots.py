"""PNG plots of a run's logged curves (loss, lr, reg, weight decay, teacher momentum, accuracy).

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

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_info

# bookkeeping columns of Lightning's metrics.csv, never plotted
INDEX_COLUMNS = ("step", "epoch")

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


def plot_metrics(csv_path: str | Path, out_dir: str | Path, metrics: Sequence[str] | None = None) -> list[Path]:
    """Write one PNG per metric of `csv_path` into `out_dir` (created); return the files written.

    `metrics` restricts the plots to those names (all logged metrics by default). A metric
    `train/loss` goes to `train_loss.png`.
    """
    curves = read_curves(csv_path)
    names = [name for name in (metrics if metrics is not None else sorted(curves)) if name in curves]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [_plot_curve(name, *curves[name], out) for name in names]


def _plot_curve(name: str, xs: list[float], ys: list[float], out_dir: Path) -> Path:
    from matplotlib.figure import Figure  # here: importing matplotlib is slow, and only plotting needs it

    figure = Figure(figsize=(5, 3.2), layout="constrained")
    axes = figure.add_subplot()
    # markers keep single points (e.g. one k-NN evaluation) visible
    axes.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3)
    axes.set(xlabel="step", ylabel=name, title=name)
    axes.grid(alpha=0.3)
    path = out_dir / (name.replace("/", "_") + ".png")
    figure.savefig(path, dpi=100)
    return path


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
        self.written = plot_metrics(csv_path, out_dir)
        rank_zero_info(f"CurvePlots: wrote {len(self.written)} plots to {out_dir}")
