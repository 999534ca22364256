"""SLURM: check the allocation against the trainer before anything starts, and requeue a job.

Lightning starts one process per SLURM task and expects `devices` of them on each of `num_nodes`
nodes. When the batch script asks for something else (4 tasks per node for `devices=8`, 2 nodes
for `num_nodes=1`, 8 GPUs for 4 tasks), ranks wait for peers that never come and the job hangs
until its time limit. `check_slurm_allocation` turns that into an immediate error that lists every
number that disagrees and the settings that would fix it.

What Lightning's `SLURMEnvironment` already does is left to it: process ranks, the main address
and port, the automatic requeue on its signal. Its `validate_settings` compares two numbers
(`--ntasks-per-node` with `devices`, `--nodes` with `num_nodes`), raises on the first one only, and
reads only `SLURM_NTASKS_PER_NODE` and `SLURM_NNODES`. The check here is kept because it also
covers what that does not (tests/training/test_scale_slurm.py): the total task count, nodes given different
task counts (`SLURM_TASKS_PER_NODE="4,3"`), GPUs per node against `devices`, and every
disagreement named in one message; it takes the environment as an argument so it is testable
without touching `os.environ`. `in_slurm_job` follows Lightning's detection rule (`SLURM_NTASKS`
set, job name not `bash`/`interactive`) plus torchrun's precedence.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)


class SlurmAllocationError(ValueError):
    """The SLURM allocation does not match the trainer's `num_nodes` x `devices`."""


def in_slurm_job(env: Mapping[str, str] = os.environ) -> bool:
    """True inside the tasks of a SLURM job step (`srun`), as Lightning decides it; not in an
    interactive allocation named `bash`/`interactive` (Lightning's opt-out) or under torchrun,
    which starts the processes itself."""
    if "TORCHELASTIC_RUN_ID" in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return False
    return "SLURM_NTASKS" in env


def _first_count(value: str) -> int | None:
    """Leading count of a SLURM per-node list: '4(x2),2' -> 4 (the first node's value)."""
    match = re.match(r"\s*(?:[A-Za-z0-9_-]+:)?(\d+)", value)
    return int(match.group(1)) if match else None


def _is_uniform(value: str) -> bool:
    """'4(x2)' and '4' are uniform; '4(x2),2' (nodes with different counts) is not."""
    return "," not in value


def allocation(env: Mapping[str, str] = os.environ) -> dict[str, int]:
    """The SLURM numbers that the trainer must agree with (only those that are set)."""
    numbers: dict[str, int] = {}
    nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if nodes:
        numbers["nodes"] = int(nodes)
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node and _first_count(per_node) is not None:
        numbers["tasks_per_node"] = _first_count(per_node)
    if env.get("SLURM_NTASKS"):
        numbers["tasks"] = int(env["SLURM_NTASKS"])
    gpus = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE")
    if gpus and _first_count(gpus) is not None:
        numbers["gpus_per_node"] = _first_count(gpus)
    return numbers


def allocation_mismatches(
    num_nodes: int, devices: int, uses_gpus: bool, env: Mapping[str, str] = os.environ
) -> list[str]:
    """One line per SLURM number that disagrees with `num_nodes` x `devices` (empty: all agree)."""
    slurm = allocation(env)
    problems = []
    if "nodes" in slurm and slurm["nodes"] != num_nodes:
        problems.append(f"nodes: SLURM allocated {slurm['nodes']} (--nodes), the trainer has num_nodes={num_nodes}")
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    if per_node and not _is_uniform(per_node):
        problems.append(f"tasks per node: SLURM gives nodes different task counts ({per_node}); use --ntasks-per-node")
    elif "tasks_per_node" in slurm and slurm["tasks_per_node"] != devices:
        problems.append(
            f"tasks per node: SLURM starts {slurm['tasks_per_node']} (--ntasks-per-node), "
            f"the trainer expects devices={devices} processes per node"
        )
    if "tasks" in slurm and slurm["tasks"] != num_nodes * devices:
        problems.append(
            f"tasks: SLURM starts {slurm['tasks']} in total (SLURM_NTASKS), "
            f"the trainer expects num_nodes x devices = {num_nodes} x {devices} = {num_nodes * devices}"
        )
    if uses_gpus and "gpus_per_node" in slurm and slurm["gpus_per_node"] != devices:
        problems.append(
            f"GPUs per node: SLURM allocated {slurm['gpus_per_node']} (--gpus-per-node), "
            f"the trainer uses devices={devices}"
        )
    return problems


def check_slurm_allocation(
    num_nodes: int, devices: int, uses_gpus: bool = True, env: Mapping[str, str] = os.environ
) -> None:
    """Raise `SlurmAllocationError` naming every disagreement; do nothing outside SLURM tasks."""
    if not in_slurm_job(env):
        return
    problems = allocation_mismatches(num_nodes, devices, uses_gpus, env)
    if problems:
        raise SlurmAllocationError(
            "the SLURM allocation does not match the trainer; fix the #SBATCH lines or the trainer settings "
            "(one task per device: --ntasks-per-node = --gpus-per-node = trainer.devices, "
            "--nodes = trainer.num_nodes):\n  " + "\n  ".join(problems)
        )


def devices_per_node(devices: int | str | Sequence[int] | None, visible_gpus: int) -> int | None:
    """The number of processes per node that a Trainer's `devices` value asks for; None when it
    cannot be told before the trainer exists ('auto' or -1 without visible GPUs)."""
    if devices is None:
        return None
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return len(devices)
    text = str(devices).strip()
    if "," in text:  # "0,1,3": a list of device indices
        return len([part for part in text.split(",") if part.strip()])
    if text in ("auto", "-1"):
        return visible_gpus or None
    return int(text)


def slurm_job_id(env: Mapping[str, str] = os.environ) -> str | None:
    """The id `scontrol requeue` needs (array jobs: `<array job>_<task>`)."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue_slurm_job(env: Mapping[str, str] = os.environ) -> bool:
    """`scontrol requeue` this job (the batch script then runs again from the top); True on success."""
    job_id = slurm_job_id(env)
    if job_id is None or not re.fullmatch(r"[0-9_]+", job_id):
        log.warning("not requeueing: no valid SLURM job id in the environment (got %r)", job_id)
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], check=False)
    except FileNotFoundError:
        log.warning("not requeueing job %s: scontrol is not on PATH", job_id)
        return False
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed with exit code %d", job_id, result.returncode)
    return result.returncode == 0
