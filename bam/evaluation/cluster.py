"""`bam cluster`: unsupervised clustering of a labelled split with a frozen backbone.

The split's images (evaluation transform) are embedded by the frozen backbone, L2-normalised
and clustered by k-means (k-means++ initialisation, several seeded restarts, the lowest inertia
kept; as many clusters as classes by default), once on the features themselves and once on
their BPA transform (`bam.transforms.bpa`: the whole split is one set, as in the BPA paper's
clustering experiments). The clusters are scored against the labels by normalised mutual
information (NMI), adjusted Rand index (ARI) and accuracy under the best one-to-one matching of
clusters to classes (Hungarian algorithm), all in [0, 1]; printed as a table and written to
`output_dir/cluster_results.json`.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from jsonargparse import CLI
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import Tensor

from bam.data.file_report import SKIPPED_LOG, report_files
from bam.ops.distributed import rank
from bam.training.run_cli import one_line_errors
from bam.evaluation.data import ClassificationDataModule
from bam.evaluation.frozen import SPACE_LABELS, embed_split, report_on_first_process, spaces_in, stage_arguments
from bam.transforms import BPASettings

RESULTS_FILE = "cluster_results.json"
PLOT_FILE = "clusters.png"
SPACE_NAMES = {"raw": "the features", "bpa": "their BPA transform"}


# -- k-means ------------------------------------------------------------------------------------
def kmeans(
    points: Tensor, num_clusters: int, restarts: int = 10, iterations: int = 100, seed: int = 0
) -> tuple[Tensor, Tensor, float]:
    """k-means of the rows of `points` (scikit-learn's `KMeans`): `(assignment, centroids, inertia)`
    of the best of `restarts` seeded k-means++ runs (lowest sum of squared distances), on the
    device of `points`. Deterministic for a given `seed`."""
    if points.dim() != 2:
        raise ValueError(f"k-means clusters the rows of a 2-D tensor, got shape {tuple(points.shape)}")
    if not 1 <= num_clusters <= len(points):
        raise ValueError(f"num_clusters must be between 1 and the number of points ({len(points)}), got {num_clusters}")
    if restarts < 1:
        raise ValueError(f"restarts must be at least 1, got {restarts}")
    array = points.detach().cpu().numpy().astype(np.float64 if points.dtype == torch.float64 else np.float32)
    with warnings.catch_warnings():
        # fewer distinct points than clusters (duplicates) is a valid input: some clusters stay empty
        warnings.simplefilter("ignore", ConvergenceWarning)
        fitted = KMeans(num_clusters, init="k-means++", n_init=restarts, max_iter=iterations, random_state=seed).fit(array)
    assignment = torch.from_numpy(fitted.labels_.astype(np.int64)).to(points.device)
    return assignment, torch.from_numpy(fitted.cluster_centers_).to(points.device), float(fitted.inertia_)


# -- metrics ------------------------------------------------------------------------------------
def cluster_accuracy(labels: Tensor | np.ndarray, clusters: Tensor | np.ndarray) -> float:
    """Fraction of items whose cluster maps to their class under the best one-to-one matching of
    clusters to classes (Hungarian algorithm); clusters left unmatched count as wrong."""
    labels, clusters = _as_numpy(labels), _as_numpy(clusters)
    counts = np.zeros((clusters.max() + 1, labels.max() + 1), dtype=np.int64)
    np.add.at(counts, (clusters, labels), 1)
    rows, columns = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, columns].sum() / len(labels))


def clustering_metrics(labels: Tensor | np.ndarray, clusters: Tensor | np.ndarray) -> dict[str, float]:
    """`nmi` (arithmetic-mean normalisation), `ari` and Hungarian `accuracy`, each in [0, 1] (ARI
    may be slightly negative: worse than chance)."""
    labels, clusters = _as_numpy(labels), _as_numpy(clusters)
    if labels.shape != clusters.shape:
        raise ValueError(f"labels and clusters differ in shape: {labels.shape} vs {clusters.shape}")
    return {
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
        "accuracy": cluster_accuracy(labels, clusters),
    }


def _as_numpy(values: Tensor | np.ndarray) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    return array.astype(np.int64).ravel()


# -- the stage ----------------------------------------------------------------------------------
def cluster_features(
    features: Tensor,
    labels: Tensor,
    num_clusters: int,
    bpa: BPASettings = BPASettings(),
    **kmeans_settings: Any,
) -> tuple[dict[str, dict[str, float]], dict[str, Tensor]]:
    """Metrics and cluster assignments of k-means on the L2-normalised `features` (`raw`) and,
    with `bpa.enabled`, on their BPA transform (the whole set at once, rows L2-normalised as well: `bpa`).
    `kmeans_settings` (restarts, iterations, seed) are those of `kmeans`, with its defaults."""
    spaces = {"raw": F.normalize(features.float(), dim=1)}
    if bpa.enabled:
        spaces["bpa"] = F.normalize(bpa.transform(spaces["raw"], "cluster a class-balanced `fraction` of the split"), dim=1)
    results, assignments = {}, {}
    for name, points in spaces.items():
        assignments[name], _, inertia = kmeans(points, num_clusters, **kmeans_settings)
        results[name] = {**clustering_metrics(labels, assignments[name]), "inertia": inertia}
    return results, assignments


def run_clustering(
    backbone: str,
    data: ClassificationDataModule,
    num_clusters: Optional[int] = None,
    restarts: int = 10,
    kmeans_iterations: int = 100,
    seed: int = 0,
    bpa: BPASettings = BPASettings(),
    output_dir: str = "runs/cluster",
    **frozen: Any,
) -> dict[str, Any]:
    """Cluster a labelled split's frozen features by k-means, raw and after BPA; printed and
    written to `output_dir/cluster_results.json`.

    Args:
        backbone: The clustered backbone: an export, a checkpoint, a released file or a timm name.
        data: The labelled data, whose `split` is clustered.
        num_clusters: Number of clusters (default: the number of classes).
        restarts: k-means++ restarts; the lowest inertia is kept.
        kmeans_iterations: Most Lloyd iterations per restart (stops earlier once stable).
        seed: Seed of the k-means initialisations.
        bpa: BPA settings (`bam.transforms.BPASettings`: `enabled`, `reg`, `iterations`); with
            `enabled`, also cluster the BPA transform of the features (the whole clustered set as one set).
        output_dir: Where the JSON result is written (by process 0).
        **frozen: encoder, arch, feature, split, fraction, accelerator: see `embed_split`.

    Unreadable files are left out (not replaced); `files` in the result counts what was found,
    read and skipped (the paths in `output_dir/skipped_files.tsv`).

    Returns:
        `raw` (and `bpa`): `nmi`, `ari`, `accuracy` and `inertia`; the sizes, file report and
        settings used.
    """
    features, labels, extractor, device, split = embed_split(backbone, data, "clustering", **frozen)
    files = report_files(data.file_statuses(), Path(output_dir) / SKIPPED_LOG, device)
    num_clusters = num_clusters or data.num_classes
    metrics, assignments = cluster_features(
        features.to(device), labels, num_clusters, bpa,
        restarts=restarts, iterations=kmeans_iterations, seed=seed,
    )
    result = {
        **metrics, "num_images": len(labels), "num_clusters": num_clusters, "split": split, "files": files,
        "backbone": backbone, "feature": extractor.readout, "restarts": restarts, "seed": seed,
        "bpa_settings": bpa.recorded(),
    }
    _report(result, Path(output_dir))
    if rank() == 0:
        plot_clusters(features, labels, assignments, metrics, Path(output_dir) / PLOT_FILE)
    return result


def plot_clusters(
    features: Tensor, labels: Tensor, assignments: dict[str, Tensor], metrics: dict[str, dict[str, float]], path: Path
) -> Path:
    """The clustered images on the first two principal components of their (L2-normalised) features:
    coloured by class, then by each k-means clustering (raw, BPA) with its scores in the title."""
    from matplotlib.figure import Figure  # here: importing matplotlib is slow, and only plotting needs it

    points = F.normalize(features.float().cpu(), dim=1)
    _, _, directions = torch.pca_lowrank(points, q=2, center=True)
    xy = ((points - points.mean(0)) @ directions).numpy()
    panels = [("classes (labels)", labels)] + [
        (f"k-means on {SPACE_NAMES[name]}: NMI {metrics[name]['nmi']:.2f}, ARI {metrics[name]['ari']:.2f}, "
         f"acc {metrics[name]['accuracy']:.2f}", assignment)
        for name, assignment in assignments.items()
    ]
    figure = Figure(figsize=(4.6 * len(panels), 4.2), layout="constrained")
    for index, (title, colours) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        axes.scatter(xy[:, 0], xy[:, 1], c=colours.cpu().numpy(), cmap="tab20", s=6, alpha=0.8)
        axes.set(title=title, xlabel="first principal component", ylabel="second principal component")
        axes.title.set_fontsize("small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def format_table(result: dict[str, Any]) -> str:
    """The metrics as a small text table, one row per feature space."""
    lines = [
        f"k-means of {result['num_images']} {result['split']} images into {result['num_clusters']} clusters "
        f"({result['feature']} features, best of {result['restarts']} k-means++ runs)",
        f"{'features':<10}{'NMI':>8}{'ARI':>8}{'acc':>8}",
    ]
    for name in spaces_in(result):
        row = result[name]
        lines.append(f"{SPACE_LABELS[name]:<10}{row['nmi']:>8.4f}{row['ari']:>8.4f}{row['accuracy']:>8.4f}")
    return "\n".join(lines)


def _report(result: dict[str, Any], output_dir: Path) -> None:
    report_on_first_process(format_table(result), result, output_dir / RESULTS_FILE)


def main(argv: list[str]) -> None:
    """`bam cluster --backbone PATH --data CLASS [--config FILE] [--print_config] [overrides]`."""
    with one_line_errors("bam cluster"):
        CLI(run_clustering, args=stage_arguments("cluster", argv), as_positional=False, prog="bam cluster")
