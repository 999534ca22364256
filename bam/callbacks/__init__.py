"""Lightning callbacks used by the training stages."""
from bam.callbacks.knn import OnlineKNN
from bam.callbacks.plots import CurvePlots, plot_metrics

__all__ = ["CurvePlots", "OnlineKNN", "plot_metrics"]
