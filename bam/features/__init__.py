"""Frozen-backbone features, k-NN voting and label-free embedding checks: shared by the online k-NN callback and the evaluation
stages, so it lives on a floor below both (neither imports the other)."""
from bam.features.extract import FeatureExtractor, embed_dataset, resolve_readout
from bam.features.knn import knn_accuracy, knn_class_scores, topk_accuracy
from bam.features.spread import embedding_spread

__all__ = ["FeatureExtractor", "embed_dataset", "embedding_spread", "knn_accuracy", "knn_class_scores", "resolve_readout", "topk_accuracy"]
