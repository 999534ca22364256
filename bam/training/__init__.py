"""Running pretraining at scale: SLURM checks and requeue, preemption-safe checkpoints, exact
mid-epoch resume of the data order, batch norm synchronised across CPU or GPU processes, one run per
run folder, and the command-line behaviour that makes training stages fail safely (`run_cli`)."""
from bam.training.fault_tolerance import AtomicCheckpointIO, DiskFullError, PreemptionCheckpoint, RunCheckpoint, atomic_save
from bam.data.resumable import ResumableDataLoader, ResumableSampler
from bam.training.run_folder import RunFolderBusyError, RunLock
from bam.training.slurm import SlurmAllocationError, check_slurm_allocation
from bam.training.sync_batchnorm import CPUSyncBatchNorm, convert_sync_batchnorm
from bam.training.extras import trainer_extras

__all__ = [
    "AtomicCheckpointIO",
    "CPUSyncBatchNorm",
    "DiskFullError",
    "PreemptionCheckpoint",
    "RunCheckpoint",
    "ResumableDataLoader",
    "ResumableSampler",
    "RunFolderBusyError",
    "RunLock",
    "SlurmAllocationError",
    "atomic_save",
    "check_slurm_allocation",
    "convert_sync_batchnorm",
    "trainer_extras",
]
