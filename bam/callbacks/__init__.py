"""Lightning callbacks used by the training stages."""
from bam.callbacks.batchnorm_stats import PreciseBatchNorm
from bam.callbacks.contrastive_crop import ContrastiveCrop
from bam.callbacks.file_report import FileReport
from bam.callbacks.knn import OnlineKNN
from bam.callbacks.pictures import EmbeddingPictures
from bam.training.plots import CurvePlots, plot_metrics

__all__ = ["ContrastiveCrop", "CurvePlots", "EmbeddingPictures", "FileReport", "OnlineKNN", "PreciseBatchNorm", "plot_metrics"]
