"""Training methods (LightningModules); the math lives in `bam.losses`."""
from bam.methods.bam import BAMModule
from bam.methods.base import SSLMethod
from bam.methods.monitoring import LossMonitor, NonFiniteLossError, StuckLossWarning

__all__ = ["BAMModule", "SSLMethod", "LossMonitor", "NonFiniteLossError", "StuckLossWarning"]
