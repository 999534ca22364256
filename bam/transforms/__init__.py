"""Feature transforms (pure torch): parameterless maps of a set of features to new features."""
from bam.transforms.bpa import BPA, BPASettings, bpa

__all__ = ["BPA", "BPASettings", "bpa"]
