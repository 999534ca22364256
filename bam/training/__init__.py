"""Running pretraining at scale: SLURM checks and requeue, preemption-safe checkpoints, exact
mid-epoch resume of the data order, and batch norm synchronised across CPU or GPU processes."""
from bam.training.fault_tolerance import AtomicCheckpointIO, PreemptionCheckpoint, atomic_save
from bam.data.resumable import ResumableDataLoader, ResumableSampler
from bam.training.slurm import SlurmAllocationError, check_slurm_allocation
from bam.training.sync_batchnorm import CPUSyncBatchNorm, convert_sync_batchnorm
from bam.training.extras import trainer_extras

__all__ = [
    "AtomicCheckpointIO",
    "CPUSyncBatchNorm",
    "PreemptionCheckpoint",
    "ResumableDataLoader",
    "ResumableSampler",
    "SlurmAllocationError",
    "atomic_save",
    "check_slurm_allocation",
    "convert_sync_batchnorm",
    "trainer_extras",
]
