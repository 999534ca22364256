"""Lightning callbacks used by the training stages."""
from bam.callbacks.knn import OnlineKNN

__all__ = ["OnlineKNN"]
