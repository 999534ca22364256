"""The engine floor that pretraining and evaluation share: the optimiser setup and per-step
schedules, the run folder (one run per folder, loggers, curve plots), SLURM checks and requeue,
preemption-safe checkpoints, batch norm synchronised across CPU or GPU processes, divergence
health checks, and the command-line behaviour that makes training stages fail safely (`run_cli`).
It imports nothing from methods, callbacks or evaluation (see tests/test_layers.py)."""
from bam.training.fault_tolerance import AtomicCheckpointIO, DiskFullError, PreemptionCheckpoint, RunCheckpoint, atomic_save
from bam.training.run_folder import RunFolderBusyError, RunLock
from bam.training.slurm import SlurmAllocationError, check_slurm_allocation
from bam.training.sync_batchnorm import CPUSyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "AtomicCheckpointIO",
    "CPUSyncBatchNorm",
    "DiskFullError",
    "PreemptionCheckpoint",
    "RunCheckpoint",
    "RunFolderBusyError",
    "RunLock",
    "SlurmAllocationError",
    "atomic_save",
    "check_slurm_allocation",
    "convert_sync_batchnorm",
]
