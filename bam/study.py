"""`bam study`: several pretraining configs compared over seeds at matched budgets, each run
evaluated by bam's own frozen-feature stages, in one table.

A study is a list of *arms* (a pretraining config plus command-line overrides: another method, or
one of BAM's ablations), a list of seeds, and the evaluations to run on each run's exported
backbone. Every (budget, arm, seed) is a folder `output_dir/<budget>/<arm>/seed_<seed>/`; a folder
holding `result.json` is finished and read back, never rerun, so an interrupted study resumes when
the same command is run again (a folder holding only `pretrain_done.json` reruns its evaluations
on the finished pretraining).

Budgets:
- `epochs`: every arm trains the epochs its config gives.
- `cpu`: every arm gets the CPU-seconds that the reference arm spent in its `epochs` runs (mean
  over seeds). Its epochs are its own scaled by reference cost / its cost, both measured in the
  `epochs` runs, so that its learning-rate and momentum schedules still run to their end (a run
  cut off mid-schedule would be judged on an unfinished recipe).

CPU-seconds are those of the whole `bam pretrain` process tree (user + system, every thread and
worker), which on a shared machine vary far less than wall time.
"""
from __future__ import annotations

import csv
import json
import resource
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import CLI

from bam.shipped_configs import with_config_names

RESULT_FILE = "result.json"
PRETRAIN_DONE_FILE = "pretrain_done.json"
BUDGETS = ("epochs", "cpu")


@dataclass
class Arm:
    """One row of the study: `bam pretrain --config CONFIG OVERRIDES...`."""

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StageOutputs:
    """How the study hands a stage its backbone and where it reads the stage's results."""

    backbone_option: str
    output_option: str
    results_file: str
    default_metrics: dict[str, str]


# stage -> its options and the metrics the study reads by default (column -> dotted JSON path)
STAGES: dict[str, StageOutputs] = {
    "knn": StageOutputs("--backbone", "--output_dir", "knn_results.json", {"knn_top1": "top1"}),
    "linear": StageOutputs("--model.backbone", "--trainer.default_root_dir", "results.json",
                           {"linear_top1": "val.last_top1"}),
    "fewshot": StageOutputs("--backbone", "--output_dir", "fewshot_results.json",
                            {"fewshot_1shot": "results.1-shot.raw.mean", "fewshot_5shot": "results.5-shot.raw.mean"}),
    "cluster": StageOutputs("--backbone", "--output_dir", "cluster_results.json", {"nmi": "raw.nmi"}),
}


@dataclass
class Evaluation:
    """One frozen-feature stage run on every exported backbone: `bam STAGE --config CONFIG ARGS...`;
    `metrics` (column -> dotted path in the stage's results JSON) replaces the stage's defaults."""

    stage: str
    config: str
    args: list[str] = field(default_factory=list)
    metrics: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"evaluation stage {self.stage!r} is not one of {', '.join(STAGES)}")

    @property
    def columns(self) -> dict[str, str]:
        return self.metrics or STAGES[self.stage].default_metrics


class StudyError(RuntimeError):
    """A run of the study failed; the message names the command and its log."""


def run_bam(args: list[str], log: Path) -> float:
    """`bam ARGS` in a child process with its output in `log`; the CPU-seconds of its process tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w") as stream:
        code = subprocess.call([sys.executable, "-m", "bam", *args], stdout=stream, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-5:])
        raise StudyError(f"`bam {' '.join(args)}` exited {code}; its log is {log}:\n{tail}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def configured_epochs(arm: Arm, pretrain_args: list[str]) -> int:
    """The `trainer.max_epochs` that `bam pretrain` resolves for this arm (config + overrides)."""
    printed = subprocess.run(
        [sys.executable, "-m", "bam", "pretrain", "--config", arm.config, *pretrain_args, *arm.overrides, "--print_config"],
        capture_output=True, text=True,
    )
    if printed.returncode != 0:
        raise StudyError(f"arm {arm.name!r}: its config does not parse:\n{printed.stdout[-2000:]}{printed.stderr[-2000:]}")
    return int(yaml.safe_load(printed.stdout)["trainer"]["max_epochs"])


def run_folder(output_dir: Path, budget: str, arm: Arm, seed: int) -> Path:
    """Where one run of a study lives: `<output_dir>/<budget>/<arm>/seed_<seed>`."""
    return output_dir / budget / arm.name / f"seed_{seed}"


def finished_epochs(output_dir: Path, arm: Arm, seeds: list[int]) -> int | None:
    """The epochs of an arm whose `epochs` runs all finished before, as they recorded them; None
    while one is missing. Rerunning a finished study then starts no `--print_config` process per arm."""
    results = [run_folder(output_dir, "epochs", arm, seed) / RESULT_FILE for seed in seeds]
    if not all(result.is_file() for result in results):
        return None
    return int(json.loads(results[0].read_text())["epochs"])


def json_value(document: dict[str, Any], path: str) -> float:
    """The value at a dotted path (`val.last_top1`) of a results document."""
    value: Any = document
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise StudyError(f"results have no {path!r} (no key {key!r}); set the evaluation's metrics")
        value = value[key]
    return float(value)


def evaluate(run_dir: Path, evaluations: list[Evaluation]) -> dict[str, float]:
    """Export the run's last checkpoint and run every evaluation on the export."""
    backbone = run_dir / "backbone"
    run_bam(["export", str(run_dir / "checkpoints" / "last.ckpt"), "--output", str(backbone)], run_dir / "export.log")
    metrics: dict[str, float] = {}
    for evaluation in evaluations:
        outputs = STAGES[evaluation.stage]
        output_dir = run_dir / evaluation.stage
        run_bam([evaluation.stage, "--config", evaluation.config, *evaluation.args,
                 outputs.backbone_option, str(backbone), outputs.output_option, str(output_dir)],
                run_dir / f"{evaluation.stage}.log")
        document = json.loads((output_dir / outputs.results_file).read_text())
        metrics.update({column: json_value(document, path) for column, path in evaluation.columns.items()})
    return metrics


def train_and_evaluate(run_dir: Path, arm: Arm, seed: int, epochs: int, budget: str, pretrain_args: list[str],
                       evaluations: list[Evaluation]) -> dict[str, Any]:
    """One run of the study, read back when it finished before."""
    done = run_dir / RESULT_FILE
    if done.is_file():
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    cpu_seconds = pretrain_once(run_dir, arm, seed, epochs, pretrain_args)
    result = {"budget": budget, "arm": arm.name, "seed": seed, "epochs": epochs, "cpu_seconds": round(cpu_seconds, 1),
              **evaluate(run_dir, evaluations)}
    write_atomically(done, result)  # a run counts as finished only once its whole result is on disk
    return result


def pretrain_once(run_dir: Path, arm: Arm, seed: int, epochs: int, pretrain_args: list[str]) -> float:
    """The run's pretraining and its CPU-seconds; a pretraining that finished before (an evaluation
    failed after it) is read back, not rerun: it is most of a run's cost."""
    done = run_dir / PRETRAIN_DONE_FILE
    if done.is_file():
        return float(json.loads(done.read_text())["cpu_seconds"])
    cpu_seconds = run_bam(
        ["pretrain", "--config", arm.config, *pretrain_args, *arm.overrides, f"--seed_everything={seed}",
         f"--trainer.max_epochs={epochs}", f"--trainer.default_root_dir={run_dir}", "--trainer.enable_progress_bar=false"],
        run_dir / "pretrain.log",
    )
    write_atomically(done, {"cpu_seconds": cpu_seconds})
    return cpu_seconds


def write_atomically(path: Path, document: dict[str, Any]) -> None:
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(document, indent=2))
    partial.replace(path)


def cpu_matched_epochs(arm_epochs: int, arm_cost: float, reference_cost: float) -> int:
    """The epochs in which this arm spends the reference's CPU-seconds (at least one)."""
    return max(1, round(arm_epochs * reference_cost / arm_cost))


def summarise(runs: list[dict[str, Any]], columns: list[str]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation of every column per (budget, arm), in run order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["budget"], run["arm"]), []).append(run)
    rows = []
    for (budget, arm), members in groups.items():
        row: dict[str, Any] = {"budget": budget, "arm": arm, "seeds": len(members)}
        for column in ["epochs", "cpu_seconds", *columns]:
            values = [member[column] for member in members]
            row[column] = statistics.fmean(values)
            row[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def format_table(summary: list[dict[str, Any]], columns: list[str]) -> str:
    """The summary as a Markdown table: mean ± std over seeds."""
    header = ["budget", "arm", "seeds", "epochs", "CPU-s", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary:
        cells = [row["budget"], row["arm"], str(row["seeds"]), f"{row['epochs']:.0f}", f"{row['cpu_seconds']:.0f}"]
        cells += [f"{row[column]:.2f} ± {row[f'{column}_std']:.2f}" for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_summary(summary: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    """One panel per metric: a bar per arm and budget, the standard deviation over seeds as error bars."""
    from matplotlib.figure import Figure

    budgets = list(dict.fromkeys(row["budget"] for row in summary))
    arms = list(dict.fromkeys(row["arm"] for row in summary))
    figure = Figure(figsize=(4 * len(columns), 0.35 * len(arms) + 2), layout="constrained")
    width = 0.8 / len(budgets)
    for panel, column in enumerate(columns):
        axes = figure.add_subplot(1, len(columns), panel + 1)
        for offset, budget in enumerate(budgets):
            rows = {row["arm"]: row for row in summary if row["budget"] == budget}
            positions = [index + offset * width for index, arm in enumerate(arms) if arm in rows]
            present = [arm for arm in arms if arm in rows]
            axes.barh(positions, [rows[arm][column] for arm in present], width,
                      xerr=[rows[arm][f"{column}_std"] for arm in present], capsize=3, label=f"equal {budget}")
        axes.set_yticks([index + width * (len(budgets) - 1) / 2 for index in range(len(arms))], arms)
        axes.invert_yaxis()
        axes.set_title(column)
        if panel == 0:
            axes.legend(fontsize="small")
    figure.savefig(path, dpi=110)


def run_study(
    arms: list[Arm],
    evaluations: list[Evaluation],
    seeds: list[int] = [0, 1, 2],  # noqa: B006 (jsonargparse reads the default from the signature)
    budgets: list[str] = ["epochs", "cpu"],  # noqa: B006
    reference: str | None = None,
    pretrain_args: list[str] = [],  # noqa: B006
    output_dir: str | Path = "runs/study",
) -> list[dict[str, Any]]:
    """Pretrain every arm with every seed, under each budget, evaluate each run, and write the table.

    Args:
        arms: the configs compared (`name`, `config`, `overrides`); names must be unique.
        evaluations: the stages run on every export (`stage` one of knn, linear, fewshot, cluster;
            `config`; extra `args`; optional `metrics`, column -> dotted path in its results JSON).
        seeds: `seed_everything` of each run.
        budgets: `epochs` (each config's own) and/or `cpu` (the reference arm's CPU-seconds).
        reference: the arm whose CPU-seconds the `cpu` budget gives every arm (default: the first).
        pretrain_args: overrides given to every arm before its own (e.g. to shrink a study).
        output_dir: where the runs, `runs.csv`, `summary.csv`, `summary.md` and `study.png` go.

    Returns the summary rows (mean and standard deviation per budget and arm).
    """
    check_study(arms, budgets, reference)
    reference, output_dir = reference or arms[0].name, Path(output_dir)
    base_epochs = {arm.name: finished_epochs(output_dir, arm, seeds) or configured_epochs(arm, pretrain_args)
                   for arm in arms}
    columns = [column for evaluation in evaluations for column in evaluation.columns]
    runs = [train_and_evaluate(run_folder(output_dir, "epochs", arm, seed), arm, seed, base_epochs[arm.name],
                               "epochs", pretrain_args, evaluations) for arm in arms for seed in seeds]
    if "cpu" in budgets:
        runs += cpu_budget_runs(runs, arms, seeds, base_epochs, reference, pretrain_args, evaluations, output_dir)
    runs = [run for run in runs if run["budget"] in budgets]
    summary = summarise(runs, columns)
    write_outputs(output_dir, runs, summary, columns)
    return summary


def cpu_budget_runs(epoch_runs: list[dict[str, Any]], arms: list[Arm], seeds: list[int], base_epochs: dict[str, int],
                    reference: str, pretrain_args: list[str], evaluations: list[Evaluation],
                    output_dir: Path) -> list[dict[str, Any]]:
    """Every arm at the reference's CPU-seconds; an arm whose matched epochs are its own epochs
    (the reference, at least) is the same command as its `epochs` run, whose result it reuses."""
    cost = {arm.name: statistics.fmean(run["cpu_seconds"] for run in epoch_runs if run["arm"] == arm.name)
            for arm in arms}
    runs = []
    for arm in arms:
        epochs = cpu_matched_epochs(base_epochs[arm.name], cost[arm.name], cost[reference])
        for seed in seeds:
            if epochs == base_epochs[arm.name]:
                same = next(run for run in epoch_runs if (run["arm"], run["seed"]) == (arm.name, seed))
                runs.append({**same, "budget": "cpu"})
            else:
                runs.append(train_and_evaluate(run_folder(output_dir, "cpu", arm, seed), arm, seed, epochs,
                                               "cpu", pretrain_args, evaluations))
    return runs


def check_study(arms: list[Arm], budgets: list[str], reference: str | None) -> None:
    """Refuse a study that cannot be run, before any run starts."""
    names = [arm.name for arm in arms]
    if not arms or len(set(names)) != len(names):
        raise ValueError(f"arms need unique names, got {names}")
    unknown = sorted(set(budgets) - set(BUDGETS))
    if unknown or not budgets:
        raise ValueError(f"budgets must be among {', '.join(BUDGETS)}, got {budgets}")
    if reference is not None and reference not in names:
        raise ValueError(f"reference {reference!r} is not an arm; arms: {', '.join(names)}")


def write_outputs(output_dir: Path, runs: list[dict[str, Any]], summary: list[dict[str, Any]], columns: list[str]) -> None:
    table = format_table(summary, columns)
    print(table)
    write_csv(output_dir / "runs.csv", runs)
    write_csv(output_dir / "summary.csv", summary)
    (output_dir / "summary.md").write_text(table + "\n")
    plot_summary(summary, columns, output_dir / "study.png")
    print(f"(runs.csv, summary.csv, summary.md and study.png in {output_dir})")


def main(argv: list[str]) -> None:
    """`bam study --config FILE|NAME [overrides]`."""
    try:
        CLI(run_study, args=with_config_names("study", argv), as_positional=False, prog="bam study")
    except (StudyError, ValueError) as error:
        sys.exit(f"bam study: {error}")

