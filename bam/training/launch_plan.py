"""Can this machine run the trainer's layout? Checked before any process starts or waits.

A config written for a cluster (`accelerator: gpu`, `devices: 8`, `num_nodes: 2`) started on a
laptop either fails deep inside Lightning ("No supported gpu backend found!") or starts the
processes of one node and waits forever for a second node that nothing will start. Both become
one line that names the settings and the flags that run the config on this machine.

Other nodes exist only when a launcher starts them: a SLURM job step (its allocation is checked
against the trainer by `bam.training.slurm`), torchrun, or the variables of Lightning's
general-cluster launch (`WORLD_SIZE`, `NODE_RANK`) set by hand on every node.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from bam.training.slurm import devices_per_node, in_slurm_job

GPU_ACCELERATORS = ("gpu", "cuda")
# variables through which torchrun, or a person following Lightning's general-cluster recipe,
# tells each process how many processes the run has in all
WORLD_VARIABLES = ("WORLD_SIZE", "NODE_RANK", "TORCHELASTIC_RUN_ID")


class LaunchPlanError(ValueError):
    """The trainer asks for GPUs or nodes that this machine and its launcher cannot provide."""


@dataclass(frozen=True)
class Machine:
    """What the trainer can use here: CUDA GPUs (Apple's MPS counts as a GPU for `gpu`) and the
    launcher's environment."""

    cuda_gpus: int
    mps: bool
    env: Mapping[str, str]

    @classmethod
    def this_one(cls) -> "Machine":
        mps = getattr(torch.backends, "mps", None)
        return cls(torch.cuda.device_count() if torch.cuda.is_available() else 0,
                   bool(mps and mps.is_available()), os.environ)


def launch_problems(accelerator: str, devices: object, num_nodes: int, machine: Machine) -> list[str]:
    """What in the trainer's layout this machine cannot run (empty: nothing)."""
    problems = []
    if str(accelerator) in GPU_ACCELERATORS and machine.cuda_gpus == 0 and not (accelerator == "gpu" and machine.mps):
        problems.append(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU "
                        "(torch.cuda.is_available() is False)")
    if num_nodes > 1 and not (in_slurm_job(machine.env) or any(name in machine.env for name in WORLD_VARIABLES)):
        problems.append(f"trainer.num_nodes={num_nodes} but nothing starts the other {num_nodes - 1} node(s) "
                        "(no SLURM job step, no torchrun, no WORLD_SIZE/NODE_RANK)")
    world = machine.env.get("WORLD_SIZE", "")
    per_node = devices_per_node(devices, machine.cuda_gpus)
    if world.isdigit() and per_node is not None and not in_slurm_job(machine.env) and int(world) != num_nodes * per_node:
        problems.append(f"the launcher starts WORLD_SIZE={world} processes but the trainer expects "
                        f"num_nodes x devices = {num_nodes} x {per_node} = {num_nodes * per_node}")
    return problems


def local_run_flags(accelerator: str, precision: object, machine: Machine) -> list[str]:
    """The command-line flags that run the config on this machine alone."""
    if machine.cuda_gpus and str(accelerator) not in ("cpu",):
        return ["--trainer.num_nodes", "1", "--trainer.devices", str(machine.cuda_gpus)]
    flags = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1"]
    if precision is not None and str(precision) not in ("32", "32-true"):
        flags += ["--trainer.precision", "32-true"]  # CPUs have no fp16 and emulate bf16 slowly
    return flags


def check_launch_plan(accelerator: str, devices: object, num_nodes: int, precision: object,
                      machine: Machine | None = None) -> None:
    """Raise `LaunchPlanError` naming every setting this machine cannot run and the flags that
    run the config here instead; do nothing when the layout can start."""
    machine = machine or Machine.this_one()
    problems = launch_problems(accelerator, devices, num_nodes, machine)
    if problems:
        flags = " ".join(local_run_flags(accelerator, precision, machine))
        raise LaunchPlanError(
            f"{'; '.join(problems)}. To run on this machine alone add: {flags} "
            "(several machines: start bam through SLURM or torchrun, see docs/distributed.md)"
        )
