"""`bam study`: the bookkeeping in process (matched epochs, summaries, errors), and a whole toy
study through the console script, resumed by running the same command again."""
from __future__ import annotations

import csv
import json
import statistics

import pytest
import yaml

from bam import study
from bam.shipped_configs import shipped_configs
from cli_runs import run_bam


def test_cpu_budget_scales_each_arms_epochs_by_the_cost_ratio():
    assert study.cpu_matched_epochs(15, arm_cost=600.0, reference_cost=400.0) == 10
    assert study.cpu_matched_epochs(15, arm_cost=300.0, reference_cost=400.0) == 20
    assert study.cpu_matched_epochs(2, arm_cost=1000.0, reference_cost=10.0) == 1  # never zero epochs


def test_summary_is_the_mean_and_sample_std_per_budget_and_arm():
    runs = [
        {"budget": "epochs", "arm": "a", "seed": 0, "epochs": 3, "cpu_seconds": 10.0, "acc": 50.0},
        {"budget": "epochs", "arm": "a", "seed": 1, "epochs": 3, "cpu_seconds": 14.0, "acc": 56.0},
        {"budget": "epochs", "arm": "b", "seed": 0, "epochs": 3, "cpu_seconds": 20.0, "acc": 61.0},
    ]
    rows = study.summarise(runs, ["acc"])
    assert [(row["budget"], row["arm"], row["seeds"]) for row in rows] == [("epochs", "a", 2), ("epochs", "b", 1)]
    assert rows[0]["acc"] == 53.0 and rows[0]["acc_std"] == pytest.approx(statistics.stdev([50.0, 56.0]))
    assert rows[0]["cpu_seconds"] == 12.0 and rows[1]["acc_std"] == 0.0
    table = study.format_table(rows, ["acc"]).splitlines()
    assert table[0] == "| budget | arm | seeds | epochs | CPU-s | acc |"
    assert table[2] == "| epochs | a | 2 | 3 | 12 | 53.00 ± 4.24 |"


def test_metrics_are_read_by_dotted_path_and_a_missing_one_is_named():
    document = {"val": {"last_top1": 81.5}, "results": {"1-shot": {"raw": {"mean": 40.0}}}}
    assert study.json_value(document, "val.last_top1") == 81.5
    assert study.json_value(document, "results.1-shot.raw.mean") == 40.0
    with pytest.raises(study.StudyError, match=r"results have no 'val\.best' \(no key 'best'\)"):
        study.json_value(document, "val.best")


@pytest.mark.parametrize(("arms", "budgets", "reference", "message"), [
    (["a", "a"], ["epochs"], None, r"arms need unique names, got \['a', 'a'\]"),
    (["a"], ["wall"], None, r"budgets must be among epochs, cpu, got \['wall'\]"),
    (["a"], ["epochs"], "b", r"reference 'b' is not an arm; arms: a"),
])
def test_an_impossible_study_is_refused_before_any_run(arms, budgets, reference, message):
    with pytest.raises(ValueError, match=message):
        study.check_study([study.Arm(name, "demo") for name in arms], budgets, reference)


def test_an_unknown_stage_is_named():
    with pytest.raises(ValueError, match="evaluation stage 'knnn' is not one of knn, linear, fewshot, cluster"):
        study.Evaluation("knnn", "knn_demo")


def test_the_shipped_demo_study_names_configs_and_overrides_that_exist():
    config = yaml.safe_load(shipped_configs("study")["demo"].read_text())
    assert len(config["seeds"]) >= 3 and config["reference"] == "bam"
    pretrain = shipped_configs("pretrain")
    assert all(arm["config"] in pretrain for arm in config["arms"])
    for evaluation in config["evaluations"]:
        assert evaluation["config"] in shipped_configs(evaluation["stage"])


def test_a_study_runs_every_arm_and_seed_once_and_matches_cpu_budgets(tmp_path, monkeypatch):
    """The study's bookkeeping over seeds, in process: pretraining and evaluation stand-ins cost
    10 CPU-s per epoch for the reference and 5 for the cheap arm, so the cheap arm's CPU budget
    is 4 epochs; the summary is the mean and std over both seeds; a second call reruns nothing.
    (The toy study below runs the real stages, with one seed.)"""
    cost_per_epoch = {"ref": 10.0, "cheap": 5.0}
    pretrained = []

    def pretrain_once(run_dir, arm, seed, epochs, pretrain_args):
        pretrained.append((run_dir.relative_to(tmp_path).as_posix(), seed, epochs, pretrain_args))
        return cost_per_epoch[arm.name] * epochs + seed

    def evaluate(run_dir, evaluations):
        budget, arm, seed = run_dir.relative_to(tmp_path).parts
        return {"knn_top1": 50.0 + 10 * int(seed[-1]) + (arm == "cheap") + (budget == "cpu")}

    monkeypatch.setattr(study, "pretrain_once", pretrain_once)
    monkeypatch.setattr(study, "evaluate", evaluate)
    monkeypatch.setattr(study, "configured_epochs", lambda arm, pretrain_args: 2)
    arms = [study.Arm("ref", "demo"), study.Arm("cheap", "demo", ["--x=1"])]
    arguments = dict(arms=arms, evaluations=[study.Evaluation("knn", "knn_demo")], seeds=[0, 1],
                     budgets=["epochs", "cpu"], pretrain_args=["--y=2"], output_dir=tmp_path)
    summary = study.run_study(**arguments)

    assert pretrained == [("epochs/ref/seed_0", 0, 2, ["--y=2"]), ("epochs/ref/seed_1", 1, 2, ["--y=2"]),
                          ("epochs/cheap/seed_0", 0, 2, ["--y=2"]), ("epochs/cheap/seed_1", 1, 2, ["--y=2"]),
                          ("cpu/cheap/seed_0", 0, 4, ["--y=2"]), ("cpu/cheap/seed_1", 1, 4, ["--y=2"])]
    rows = {(row["budget"], row["arm"]): row for row in summary}
    assert list(rows) == [("epochs", "ref"), ("epochs", "cheap"), ("cpu", "ref"), ("cpu", "cheap")]
    assert (rows["cpu", "ref"]["epochs"], rows["cpu", "cheap"]["epochs"]) == (2, 4)
    assert rows["epochs", "cheap"]["knn_top1"] == 56.0 and rows["cpu", "cheap"]["knn_top1"] == 57.0
    assert rows["cpu", "ref"]["knn_top1_std"] == pytest.approx(statistics.stdev([50.0, 60.0]))
    assert rows["epochs", "ref"]["cpu_seconds"] == 20.5 and rows["cpu", "cheap"]["seeds"] == 2
    assert len(list(csv.DictReader((tmp_path / "runs.csv").open()))) == 8

    pretrained.clear()
    monkeypatch.setattr(study, "configured_epochs", None)  # finished arms need no `--print_config`
    assert study.run_study(**arguments) == summary and pretrained == []


# a toy study: 200 digits, 2 epochs of a small head; k-NN of the held-out digits against 200 training digits
TOY_PRETRAIN = ["--data.init_args.fraction=0.05", "--data.init_args.batch_size=32", "--trainer.log_every_n_steps=1",
                "--model.init_args.projector.hidden_dim=64", "--model.init_args.projector.out_dim=32", "--trainer.max_epochs=2",
                "--knn.every_n_epochs=1000", "--knn.compare_baselines=false", "--plots.enabled=false",
                "--precise_bn.enabled=false"]


@pytest.mark.slow
@pytest.mark.process
def test_toy_study_through_the_console_script_and_resumed(tmp_path):
    """One seed (the bookkeeping over several is the in-process test above): 3 pretrainings, the
    cheaper arm's CPU-budget run among them, then one rerun after an evaluation was lost."""
    config = {
        "output_dir": str(tmp_path / "study"), "seeds": [1], "budgets": ["epochs", "cpu"], "reference": "bam",
        "pretrain_args": TOY_PRETRAIN,
        "arms": [{"name": "bam", "config": "demo"},
                 {"name": "no_local_crops", "config": "demo", "overrides": ["--data.init_args.crops.num_local_crops=0"]}],
        "evaluations": [{"stage": "knn", "config": "knn_demo", "args": ["--bank_fraction=0.05"],
                         "metrics": {"knn_top1": "top1", "knn_top5": "top5"}}],
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    first = run_bam(["study", "--config", str(tmp_path / "study.yaml")])
    assert first.returncode == 0, first.stdout[-3000:]

    runs = list(csv.DictReader((tmp_path / "study" / "runs.csv").open()))
    assert sorted((run["budget"], run["arm"], run["seed"]) for run in runs) == sorted(
        (budget, arm, "1") for budget in ("epochs", "cpu") for arm in ("bam", "no_local_crops"))
    for run in runs:  # every run's figures are its own stages' results, of a pretraining with its seed
        # a CPU-budget run of an arm's own epochs (2) is its equal-epochs run, read from there
        budget = "epochs" if int(run["epochs"]) == 2 else run["budget"]
        run_dir = tmp_path / "study" / budget / run["arm"] / f"seed_{run['seed']}"
        knn = json.loads((run_dir / "knn" / "knn_results.json").read_text())
        assert (float(run["knn_top1"]), float(run["knn_top5"])) == (knn["top1"], knn["top5"])
        assert yaml.safe_load(next(run_dir.rglob("config.yaml")).read_text())["seed_everything"] == 1
    cost = {run["arm"]: float(run["cpu_seconds"]) for run in runs if run["budget"] == "epochs"}
    matched = {run["arm"]: int(run["epochs"]) for run in runs if run["budget"] == "cpu"}
    assert matched == {"bam": 2, "no_local_crops": study.cpu_matched_epochs(2, cost["no_local_crops"], cost["bam"])}
    # the reference's CPU budget is its own epochs: the same runs, not run twice
    assert not (tmp_path / "study" / "cpu" / "bam").exists()

    summary = list(csv.DictReader((tmp_path / "study" / "summary.csv").open()))
    bam_epochs = next(row for row in summary if (row["budget"], row["arm"]) == ("epochs", "bam"))
    top1 = next(float(run["knn_top1"]) for run in runs if (run["budget"], run["arm"]) == ("epochs", "bam"))
    assert (float(bam_epochs["knn_top1"]), float(bam_epochs["knn_top1_std"])) == (pytest.approx(top1), 0.0)
    assert (tmp_path / "study" / "study.png").stat().st_size > 0
    table = (tmp_path / "study" / "summary.md").read_text()
    assert table.splitlines()[0].startswith("| budget | arm |") and table in first.stdout

    # a run whose evaluation failed after its pretraining finished reruns the evaluations only;
    # finished runs are read back: no new pretraining or evaluation log, the same table
    logs = {path: path.stat().st_mtime_ns for path in (tmp_path / "study").rglob("*.log")}
    redo = tmp_path / "study" / "epochs" / "bam" / "seed_1"
    (redo / "result.json").unlink()
    second = run_bam(["study", "--config", str(tmp_path / "study.yaml")])
    assert second.returncode == 0, second.stdout[-3000:]
    rewritten = {redo / "export.log", redo / "knn.log"}
    assert {path: path.stat().st_mtime_ns for path in logs if path not in rewritten} == {
        path: mtime for path, mtime in logs.items() if path not in rewritten}
    assert all(path.stat().st_mtime_ns != logs[path] for path in rewritten)
    assert json.loads((redo / "result.json").read_text())["cpu_seconds"] == pytest.approx(
        json.loads((redo / "pretrain_done.json").read_text())["cpu_seconds"], abs=0.05)
    assert (tmp_path / "study" / "summary.md").read_text() == table and table in second.stdout
