"""Training methods (LightningModules); the math lives in `bam.losses`."""
from bam.methods.bam import BAMModule
from bam.methods.base import SSLMethod
from bam.methods.deepcluster import DeepClusterV2Module
from bam.methods.dino import DINOModule
from bam.methods.monitoring import LossMonitor, NonFiniteLossError, StuckLossWarning
from bam.methods.sela import SeLaModule
from bam.methods.swav import SwAVModule

__all__ = ["BAMModule", "SwAVModule", "DINOModule", "DeepClusterV2Module", "SeLaModule", "SSLMethod", "LossMonitor", "NonFiniteLossError", "StuckLossWarning"]
