"""Frozen-backbone features and k-NN voting: shared by the online k-NN callback and the evaluation
stages, so it lives on a floor below both (neither imports the other)."""
from bam.features.extract import FeatureExtractor, embed_dataset, resolve_recipe
from bam.features.knn import knn_accuracy, knn_class_scores, topk_accuracy

__all__ = ["FeatureExtractor", "embed_dataset", "knn_accuracy", "knn_class_scores", "resolve_recipe", "topk_accuracy"]
