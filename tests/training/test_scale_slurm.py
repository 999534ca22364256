"""SLURM: an allocation that disagrees with the trainer stops before training, naming the numbers;
requeueing calls scontrol with the job's id; the launch scripts are valid shell."""
from __future__ import annotations

import subprocess
import sys

import pytest

from bam.pretrain import main as pretrain_main
from bam.training import SlurmAllocationError, check_slurm_allocation
from bam.training.slurm import devices_per_node, requeue_slurm_job
from processes import run_process_group
from repo_paths import REPO

# What srun exports for `--nodes=2 --ntasks-per-node=4 --gpus-per-node=4`.
TWO_BY_FOUR = {
    "SLURM_JOB_ID": "123", "SLURM_JOB_NAME": "bam", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
    "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_GPUS_ON_NODE": "4",
}


def test_matching_allocation_passes():
    check_slurm_allocation(num_nodes=2, devices=4, env=TWO_BY_FOUR)


def test_every_disagreeing_number_is_named():
    with pytest.raises(SlurmAllocationError) as error:
        check_slurm_allocation(num_nodes=1, devices=8, env=TWO_BY_FOUR)
    message = str(error.value)
    assert "nodes: SLURM allocated 2 (--nodes), the trainer has num_nodes=1" in message
    assert "tasks per node: SLURM starts 4 (--ntasks-per-node), the trainer expects devices=8" in message
    assert "GPUs per node: SLURM allocated 4 (--gpus-per-node), the trainer uses devices=8" in message


def test_total_task_count_is_checked():
    with pytest.raises(SlurmAllocationError, match=r"SLURM starts 8 in total .* = 2 x 2 = 4"):
        check_slurm_allocation(num_nodes=2, devices=2, env=TWO_BY_FOUR)


def test_more_gpus_than_tasks_is_reported():
    env = {**TWO_BY_FOUR, "SLURM_GPUS_ON_NODE": "8"}
    with pytest.raises(SlurmAllocationError, match=r"GPUs per node: SLURM allocated 8 .* devices=4"):
        check_slurm_allocation(num_nodes=2, devices=4, env=env)
    check_slurm_allocation(num_nodes=2, devices=4, uses_gpus=False, env=env)  # CPU processes: GPUs irrelevant


def test_uneven_tasks_per_node_are_reported():
    env = {key: value for key, value in TWO_BY_FOUR.items() if key != "SLURM_NTASKS_PER_NODE"}
    env.update(SLURM_TASKS_PER_NODE="4,3", SLURM_NTASKS="7")
    with pytest.raises(SlurmAllocationError, match=r"different task counts \(4,3\)"):
        check_slurm_allocation(num_nodes=2, devices=4, env=env)


@pytest.mark.parametrize("env", [
    {},  # not in SLURM
    {**TWO_BY_FOUR, "SLURM_JOB_NAME": "interactive"},  # Lightning's opt-out for interactive allocations
    {**TWO_BY_FOUR, "TORCHELASTIC_RUN_ID": "x"},  # torchrun started the processes
])
def test_no_check_outside_slurm_tasks(env):
    check_slurm_allocation(num_nodes=1, devices=1, env=env)


@pytest.mark.parametrize(("devices", "visible", "expected"), [
    (4, 8, 4), ("4", 8, 4), ("0,1,3", 8, 3), ([0, 1], 8, 2), ("auto", 8, 8), (-1, 2, 2), ("auto", 0, None), (None, 4, None),
])
def test_devices_per_node(devices, visible, expected):
    assert devices_per_node(devices, visible) == expected


def test_bam_pretrain_stops_before_training_on_a_mismatch(monkeypatch, tmp_path):
    for key, value in TWO_BY_FOUR.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["bam"])
    argv = ["--model", "BAMModule", "--data", "BuiltinDataModule", "--trainer.accelerator", "gpu", "--trainer.devices", "2",
            "--trainer.num_nodes", "2", "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(SlurmAllocationError, match="the trainer expects devices=2 processes per node"):
        pretrain_main(argv)
    assert not any(tmp_path.iterdir())  # nothing was started or written


def test_requeue_calls_scontrol_with_the_job_id(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, check: calls.append(command) or subprocess.CompletedProcess(command, 0))
    assert requeue_slurm_job({"SLURM_JOB_ID": "4242"})
    assert requeue_slurm_job({"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "7"})
    assert not requeue_slurm_job({})
    assert calls == [["scontrol", "requeue", "4242"], ["scontrol", "requeue", "40_7"]]


@pytest.mark.process
@pytest.mark.parametrize("script", ["slurm_pretrain.sbatch", "torchrun_single_node.sh", "torchrun_multi_node.sh"])
def test_launch_scripts_are_valid_bash(script):
    done = run_process_group(["bash", "-n", str(REPO / "launch" / script)])
    assert done.returncode == 0, done.stderr


def test_sbatch_template_runs_one_task_per_gpu_and_requeues():
    text = (REPO / "launch" / "slurm_pretrain.sbatch").read_text()
    assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text
    assert '--trainer.devices "${SLURM_NTASKS_PER_NODE}"' in text
    assert '--trainer.num_nodes "${SLURM_JOB_NUM_NODES}"' in text
    assert "--ckpt_path last" in text and "srun" in text
