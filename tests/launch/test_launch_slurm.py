"""`launch/slurm_pretrain.sbatch` submitted to a real (one-node, CPU-only) SLURM cluster, as the
docs/distributed.md tells users to: `sbatch --nodes=1 --ntasks-per-node=2 launch/slurm_pretrain.sbatch
--config ... --trainer.accelerator cpu` (no GPU request on a CPU cluster).

- a job runs to its end on 2 tasks, exits 0 and writes its report once;
- a job signalled with SIGUSR1 (what `--signal=USR1@120` sends before the time limit) saves
  `last.ckpt`, requeues itself, resumes from it and ends at the same step with the same losses as
  the uninterrupted job;
- a job of the user's own `srun bam pretrain ...` whose tasks per node and trainer devices
  disagree stops before training, naming both.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from product_runs import REPO, logged_losses, shrunk_recipe_args
from slurm_cluster import SlurmCluster, slurm_available

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.slow]

DEMO = REPO / "configs" / "pretrain" / "demo.yaml"
EPOCHS = 10  # 2 steps each on 16 digits: 16 steps still to go when the test signals the job after step 4
JOB_TIMEOUT_S = 900  # only to turn a hang into a failure


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_available()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def submit(cluster: SlurmCluster, run_dir: Path, *extra: str) -> str:
    """docs/distributed.md's sbatch command with 1 node x 2 tasks, the demo recipe shrunk, on CPU."""
    args = shrunk_recipe_args(DEMO, run_dir, run_dir, max_epochs=EPOCHS)
    # k-NN of the trained backbone only (its baselines and the curve plots are other tests' concern)
    args += ["--knn.every_n_epochs", "100", "--knn.compare_baselines", "false", "--plots.enabled", "false",
             "--checkpoint.every_n_epochs", "2", "--trainer.accelerator", "cpu", *extra]
    output = run_dir.parent / f"{run_dir.name}.out"
    return cluster.command(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", f"--output={output}",
                            str(REPO / "launch" / "slurm_pretrain.sbatch"), *args], cwd=REPO).strip()


def job_output(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.out").read_text(errors="replace")


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    record = cluster.wait_for(submit(cluster, run_dir), JOB_TIMEOUT_S)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", f"{record}\n{job_output(run_dir)[-4000:]}"
    return run_dir


def test_the_sbatch_script_runs_a_two_task_job_to_its_end(uninterrupted: Path):
    output = job_output(uninterrupted)
    assert "1 nodes x 2 tasks" in output
    assert output.count("k-NN (k=20) on the held-out split") == 1  # rank 0 only
    assert (uninterrupted / "csv" / "version_0" / "knn_report.json").is_file()
    assert max(logged_losses(uninterrupted)) == 2 * EPOCHS - 1


def test_a_signalled_job_saves_requeues_and_resumes_to_the_same_losses(cluster, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(cluster, run_dir)
    checkpoints = run_dir / "checkpoints"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(checkpoints.glob("epoch=*.ckpt")):  # in the middle of training
        assert time.monotonic() < deadline, job_output(run_dir)[-4000:]
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), job_output(run_dir)[-4000:]
        time.sleep(0.2)
    cluster.command(["scancel", "--signal=USR1", job])
    record = cluster.wait_for(job, JOB_TIMEOUT_S)
    output = job_output(run_dir)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", f"{record}\n{output[-4000:]}"
    assert int(record["Restarts"]) == 1, output[-4000:]
    assert "restart 1" in output and "Signal received: saving" in output
    resumed, reference = logged_losses(run_dir), logged_losses(uninterrupted)
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        assert math.isclose(resumed[step], reference[step], rel_tol=1e-5), (step, resumed[step], reference[step])


def test_a_job_whose_tasks_and_devices_disagree_stops_naming_both(cluster, tmp_path):
    run_dir = tmp_path / "run"
    command = " ".join(["srun", "bam", "pretrain", *shrunk_recipe_args(DEMO, run_dir, run_dir)])  # devices: 1
    output = tmp_path / "run.out"
    job = cluster.command(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", f"--output={output}",
                           f"--wrap={command}"], cwd=REPO).strip()
    record = cluster.wait_for(job, JOB_TIMEOUT_S)
    text = output.read_text(errors="replace")
    assert record["JobState"] == "FAILED", text[-3000:]
    assert "SLURM starts 2 (--ntasks-per-node), the trainer expects devices=1" in text, text[-3000:]
    assert not (run_dir / "checkpoints").exists()
