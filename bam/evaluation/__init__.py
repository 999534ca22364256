"""Evaluation: k-NN, linear probe and fine-tuning of (exported) backbones."""
from bam.features.knn import knn_accuracy, knn_class_scores, topk_accuracy

__all__ = ["knn_accuracy", "knn_class_scores", "topk_accuracy"]
