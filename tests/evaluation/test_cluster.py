"""`bam cluster`: k-means, the clustering metrics, the stage end to end, and BPA in `bam knn`."""
from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from bam.cli import STAGES
from bam.evaluation import cluster, knn_stage
from bam.evaluation.backbone import build_from_spec, resolve_backbone
from bam.evaluation.cluster import cluster_accuracy, clustering_metrics, kmeans, run_clustering
from bam.transforms import BPASettings, bpa
from eval_fixtures import CNN, record_figures, synthetic_args, synthetic_data, write_checkpoint

bpa_module = importlib.import_module("bam.transforms.bpa")  # the package exports the function under the same name


def _blobs(per_cluster: int = 30, num_clusters: int = 4, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.randn(num_clusters, dim, generator=generator)
    labels = torch.arange(num_clusters).repeat_interleave(per_cluster)
    points = centres[labels] + 0.1 * torch.randn(len(labels), dim, generator=generator)
    order = torch.randperm(len(labels), generator=generator)
    return points[order], labels[order]


# --- k-means -------------------------------------------------------------------------------------


def test_kmeans_recovers_separated_blobs():
    points, labels = _blobs()
    assignment, centroids, inertia = kmeans(points, 4, restarts=5, seed=0)
    metrics = clustering_metrics(labels, assignment)
    assert metrics["accuracy"] == 1.0 and metrics["nmi"] == pytest.approx(1.0) and metrics["ari"] == pytest.approx(1.0)
    assert centroids.shape == (4, 8) and inertia == pytest.approx(120 * 8 * 0.01, rel=0.5)


def test_kmeans_is_seeded_and_keeps_the_lowest_inertia():
    points = torch.randn(200, 5, generator=torch.Generator().manual_seed(1))
    first, again = kmeans(points, 6, restarts=3, seed=7), kmeans(points, 6, restarts=3, seed=7)
    assert torch.equal(first[0], again[0]) and first[2] == again[2]
    single_runs = [kmeans(points, 6, restarts=1, seed=seed)[2] for seed in range(3)]
    # more restarts (from the same seed's stream) can only lower the kept inertia
    assert kmeans(points, 6, restarts=8, seed=0)[2] <= single_runs[0]


def test_kmeans_with_duplicates_and_bad_arguments():
    points = torch.zeros(10, 3)
    points[5:] = 1.0
    assignment, _, inertia = kmeans(points, 4, restarts=2)  # more clusters than distinct points
    assert inertia == 0.0 and len(assignment.unique()) >= 2
    with pytest.raises(ValueError, match="between 1 and the number of points"):
        kmeans(points, 11)
    with pytest.raises(ValueError, match="2-D tensor"):
        kmeans(torch.zeros(4), 2)


def test_one_cluster_is_the_mean_and_centroids_keep_the_points_dtype():
    points = torch.randn(20, 3, generator=torch.Generator().manual_seed(2))
    assignment, centroids, inertia = kmeans(points, 1, restarts=1)
    assert assignment.tolist() == [0] * 20
    torch.testing.assert_close(centroids, points.mean(dim=0, keepdim=True))
    assert inertia == pytest.approx(float(((points - points.mean(dim=0)) ** 2).sum()), rel=1e-5)
    assert kmeans(points, 2, restarts=1)[1].dtype == torch.float32
    assert kmeans(points.double(), 2, restarts=1)[1].dtype == torch.float64


# --- metrics -------------------------------------------------------------------------------------


def test_accuracy_matching_is_invariant_to_label_permutation():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    clusters = torch.tensor([1, 1, 0, 2, 2, 3, 3, 3, 0, 0])
    renamed = torch.tensor([3, 0, 2, 1])[clusters]
    assert cluster_accuracy(labels, clusters) == cluster_accuracy(labels, renamed) == 0.8
    assert clustering_metrics(labels, renamed) == pytest.approx(clustering_metrics(labels, clusters))
    assert cluster_accuracy(labels, torch.tensor([5, 5, 5, 7, 7, 9, 9, 9, 9, 2])) == 1.0


def test_metrics_on_a_hand_computed_case():
    # classes {0,1} {2,3}; clusters {0,1,2} {3}
    labels, clusters = [0, 0, 1, 1], [0, 0, 0, 1]
    metrics = clustering_metrics(labels, clusters)
    assert metrics["accuracy"] == 0.75
    # ARI: pair agreements sum C(n_ij, 2) = 1, row pairs 2, column pairs 3, all pairs 6:
    # expected 2 * 3 / 6 = 1, maximum (2 + 3) / 2, so ARI = (1 - 1) / (2.5 - 1) = 0
    assert metrics["ari"] == pytest.approx(0.0)
    entropy_classes = math.log(2)
    entropy_clusters = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    mutual = 0.5 * math.log(0.5 / (0.75 * 0.5)) + 0.25 * math.log(0.25 / (0.75 * 0.5)) + 0.25 * math.log(2)
    assert metrics["nmi"] == pytest.approx(mutual / ((entropy_classes + entropy_clusters) / 2))
    assert clustering_metrics([0, 1, 2], [0, 1, 2]) == pytest.approx({"nmi": 1.0, "ari": 1.0, "accuracy": 1.0})


def test_metrics_take_any_tensor_and_explain_a_shape_mismatch():
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0], requires_grad=True)  # e.g. straight from a model's output
    assert clustering_metrics(labels, torch.tensor([1, 1, 0, 0])) == pytest.approx({"nmi": 1.0, "ari": 1.0, "accuracy": 1.0})
    with pytest.raises(ValueError) as error:
        clustering_metrics([0, 1], [0, 1, 2])
    assert str(error.value) == "labels and clusters differ in shape: (2,) vs (3,)"


def test_more_clusters_than_classes_count_unmatched_as_wrong():
    assert cluster_accuracy([0, 0, 1, 1], [0, 1, 2, 3]) == 0.5


# --- the stage -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cluster"), *CNN)


def test_stage_writes_the_json_and_prints_a_table(checkpoint, tmp_path, capsys):
    assert STAGES["cluster"][0] == "bam.evaluation.cluster"
    cluster.main([
        "--backbone", str(checkpoint), "--accelerator", "cpu", "--output_dir", str(tmp_path),
        "--restarts", "2", *synthetic_args(batch_size=16, train_size=32, val_size=24),
    ])
    result = json.loads((tmp_path / "cluster_results.json").read_text())
    assert (result["num_images"], result["num_clusters"], result["split"]) == (24, 4, "val")
    for space in ("raw", "bpa"):
        assert set(result[space]) == {"nmi", "ari", "accuracy", "inertia"}
        assert 0 <= result[space]["nmi"] <= 1 and 0.25 <= result[space]["accuracy"] <= 1
    assert result["bpa_settings"] == {"reg": 0.1, "iterations": 10}
    printed = capsys.readouterr()
    assert "NMI" in printed.out and "\nraw " in printed.out and "\nBPA " in printed.out
    assert "clustering: embedding the val split" in printed.err  # a progress bar while embedding
    assert (tmp_path / "clusters.png").read_bytes().startswith(b"\x89PNG")


def test_table_has_one_row_per_feature_space():
    result = {
        "num_images": 24, "split": "val", "num_clusters": 4, "feature": "pooled", "restarts": 2,
        "raw": {"nmi": 0.12345, "ari": -0.01, "accuracy": 0.375, "inertia": 3.0},
        "bpa": {"nmi": 0.5, "ari": 0.25, "accuracy": 0.54166, "inertia": 1.0},
    }
    assert cluster.format_table(result).splitlines() == [
        "k-means of 24 val images into 4 clusters (pooled features, best of 2 k-means++ runs)",
        "features       NMI     ARI     acc",
        "raw         0.1235 -0.0100  0.3750",
        "BPA         0.5000  0.2500  0.5417",
    ]
    del result["bpa"]
    assert cluster.format_table(result).splitlines()[2:] == ["raw         0.1235 -0.0100  0.3750"]


def test_bpa_option_changes_the_result_path(checkpoint, tmp_path, monkeypatch):
    clustered = []
    real = cluster.kmeans
    monkeypatch.setattr(cluster, "kmeans",
                        lambda points, *args, **kwargs: clustered.append(points) or real(points, *args, **kwargs))
    data = synthetic_data(batch_size=16, train_size=32, val_size=20)
    common = dict(accelerator="cpu", restarts=1, split="train", fraction=0.5)
    without = run_clustering(str(checkpoint), data, bpa=BPASettings(enabled=False), output_dir=str(tmp_path / "runs" / "raw"), **common)
    assert {key: value for key, value in without.items() if key != "raw"} == {
        "num_images": 16, "num_clusters": 4, "split": "train", "files": None, "backbone": str(checkpoint),
        "feature": "pooled", "restarts": 1, "seed": 0, "bpa_settings": None,
    }  # no "bpa" entry; files: images held in memory
    assert len(clustered) == 1 and set(without["raw"]) == {"nmi", "ari", "accuracy", "inertia"}
    assert json.loads((tmp_path / "runs" / "raw" / "cluster_results.json").read_text()) == without
    assert without["num_images"] == 16  # class-balanced half of the 32 training images
    with_bpa = run_clustering(str(checkpoint), data, bpa=BPASettings(), output_dir=str(tmp_path / "runs" / "bpa"), **common)
    assert with_bpa["raw"] == without["raw"]
    raw, transformed = clustered[1:]
    assert raw.shape == (16, 32) and transformed.shape == (16, 16)  # BPA: one affinity per set member
    assert "bpa" in json.loads((tmp_path / "runs" / "bpa" / "cluster_results.json").read_text())


def test_unknown_split_is_rejected(checkpoint):
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        run_clustering(str(checkpoint), synthetic_data(), split="test", accelerator="cpu")


# --- BPA in `bam knn` ----------------------------------------------------------------------------


def test_knn_bpa_flag_changes_the_features_the_classifier_sees(checkpoint, tmp_path, monkeypatch):
    seen = []
    real = knn_stage.nearest_neighbours_streamed

    def recording(query, bank, *args):
        seen.append((query.shape, bank.shape))
        return real(query, bank, *args)

    monkeypatch.setattr(knn_stage, "nearest_neighbours_streamed", recording)
    common = ["--backbone", str(checkpoint), "--accelerator", "cpu", *synthetic_args(batch_size=8, train_size=32, val_size=12)]
    knn_stage.main([*common, "--output_dir", str(tmp_path / "plain")])
    assert seen == [((8, 32), (32, 32)), ((4, 32), (32, 32))]  # pooled features of width 32
    seen.clear()
    knn_stage.main([*common, "--output_dir", str(tmp_path / "bpa"), "--bpa.enabled", "true"])
    # each query batch is transformed with the bank: features are affinities to bank + batch
    assert seen == [((8, 40), (32, 40)), ((4, 36), (32, 36))]
    result = json.loads((tmp_path / "bpa" / "knn_results.json").read_text())
    assert result["bpa"] == {"reg": 0.1, "iterations": 10} and 0 <= result["top1"] <= 100


def test_old_flat_bpa_keys_keep_loading_with_one_line_naming_the_new_key(checkpoint, tmp_path, capsys):
    """Configs and command lines written before the BPA settings became one `bpa` group still run,
    at the same settings, each old key announced once with its new name."""
    old_config = tmp_path / "old.yaml"
    old_config.write_text("bpa: true\nbpa_iterations: 3\n")
    common = ["--backbone", str(checkpoint), "--accelerator", "cpu", *synthetic_args(batch_size=8, train_size=32, val_size=12)]
    knn_stage.main([*common, "--config", str(old_config), "--output_dir", str(tmp_path / "old"), "--bpa_reg=0.2"])
    notes = [line for line in capsys.readouterr().err.splitlines() if "is now" in line]
    assert notes == [
        f"bam knn: note: {old_config}: `bpa` is now `bpa.enabled`; read as bpa.enabled=True",
        f"bam knn: note: {old_config}: `bpa_iterations` is now `bpa.iterations`; read as bpa.iterations=3",
        "bam knn: note: the command line: `bpa_reg` is now `bpa.reg`; read as bpa.reg=0.2",
    ]
    knn_stage.main([*common, "--output_dir", str(tmp_path / "new"), "--bpa.enabled", "true", "--bpa.reg", "0.2",
                    "--bpa.iterations", "3"])
    old, new = (json.loads((tmp_path / name / "knn_results.json").read_text()) for name in ("old", "new"))
    assert old["bpa"] == new["bpa"] == {"reg": 0.2, "iterations": 3}
    assert (old["top1"], old["top5"]) == (new["top1"], new["top5"])


def test_knn_bpa_set_too_large_is_explained(monkeypatch):
    monkeypatch.setattr(bpa_module, "BPA_MAX_SET", 10)
    with pytest.raises(ValueError, match="lower bank_fraction or the batch size"):
        knn_stage.bpa_with_bank(torch.randn(4, 3), torch.randn(8, 3))


@pytest.fixture
def figures(monkeypatch) -> list:
    """Every matplotlib Figure created during the test, in order."""
    import matplotlib.figure

    return record_figures(monkeypatch, matplotlib.figure)


def test_plot_shows_classes_then_each_clustering_with_its_scores(tmp_path, figures):
    points, labels = _blobs(per_cluster=5, num_clusters=3)
    assignments = {"raw": labels.flip(0), "bpa": labels}
    metrics = {"raw": {"nmi": 0.123, "ari": 0.456, "accuracy": 0.789}, "bpa": {"nmi": 1.0, "ari": 1.0, "accuracy": 1.0}}
    path = cluster.plot_clusters(points, labels, assignments, metrics, tmp_path / "new" / "folder" / "clusters.png")
    assert path == tmp_path / "new" / "folder" / "clusters.png" and path.read_bytes().startswith(b"\x89PNG")
    panels = figures[0].axes
    assert tuple(figures[0].get_size_inches()) == pytest.approx((3 * 4.6, 4.2))  # one 4.6-inch panel each
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    assert isinstance(figures[0].get_layout_engine(), ConstrainedLayoutEngine)  # titles and labels kept apart
    assert [axes.get_title() for axes in panels] == [
        "classes (labels)",
        "k-means on the features: NMI 0.12, ARI 0.46, acc 0.79",
        "k-means on their BPA transform: NMI 1.00, ARI 1.00, acc 1.00",
    ]
    for axes, colours in zip(panels, (labels, labels.flip(0), labels)):
        (scatter,) = axes.collections
        assert scatter.get_offsets().shape == (15, 2)
        assert scatter.get_array().tolist() == colours.tolist()
        assert (axes.get_xlabel(), axes.get_ylabel()) == ("first principal component", "second principal component")


def test_run_clustering_settings_reach_k_means_and_bpa(checkpoint, tmp_path, capsys, monkeypatch):
    """Every setting changed from its default, against k-means recomputed here on the student's
    features of a class-balanced half of the training split and on their BPA transform."""
    calls = []
    real = cluster.kmeans
    monkeypatch.setattr(cluster, "kmeans", lambda points, *args, **kwargs: calls.append((args, kwargs)) or real(points, *args, **kwargs))
    data = synthetic_data(batch_size=16, train_size=32, val_size=20)
    out = tmp_path / "out"
    result = run_clustering(str(checkpoint), data, num_clusters=3, restarts=2, kmeans_iterations=7, seed=5,
                            bpa=BPASettings(reg=0.3, iterations=4), output_dir=str(out), encoder="student", split="train",
                            fraction=0.5, accelerator="cpu")
    assert calls == [((3,), {"restarts": 2, "iterations": 7, "seed": 5})] * 2
    model = build_from_spec(resolve_backbone(str(checkpoint), encoder="student"))
    dataset = data.eval_dataset("train", 0.5)
    with torch.no_grad():
        features = model(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    raw = F.normalize(features, dim=1)
    expected = {}
    for name, points in (("raw", raw), ("bpa", F.normalize(bpa(raw, 0.3, 4), dim=1))):
        assignment, _, inertia = real(points, 3, restarts=2, iterations=7, seed=5)
        expected[name] = {**clustering_metrics(labels, assignment), "inertia": pytest.approx(inertia, rel=1e-4)}
    assert result == {
        **expected, "num_images": 16, "num_clusters": 3, "split": "train", "files": None, "backbone": str(checkpoint),
        "feature": "pooled", "restarts": 2, "seed": 5, "bpa_settings": {"reg": 0.3, "iterations": 4},
    }
    text = (out / "cluster_results.json").read_text()
    assert json.loads(text) == result and text == json.dumps(result, indent=2)
    assert capsys.readouterr().out == cluster.format_table(result) + "\n"
    assert (out / "clusters.png").read_bytes().startswith(b"\x89PNG")


def test_clusters_default_to_the_number_of_classes_and_the_features_of_the_teacher(checkpoint, tmp_path):
    data = synthetic_data(batch_size=16, train_size=32, val_size=20)
    result = run_clustering(str(checkpoint), data, restarts=1, bpa=BPASettings(enabled=False), output_dir=str(tmp_path), accelerator="cpu")
    model = build_from_spec(resolve_backbone(str(checkpoint)))
    dataset = data.eval_dataset("val")
    with torch.no_grad():
        features = model(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    assignment, _, inertia = kmeans(F.normalize(features, dim=1), 4, restarts=1, iterations=100, seed=0)
    assert result["raw"] == {**clustering_metrics(labels, assignment), "inertia": pytest.approx(inertia, rel=1e-4)}
    assert (result["num_clusters"], result["num_images"], result["split"]) == (4, 20, "val")


def test_results_go_to_runs_cluster_by_default(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_clustering(str(checkpoint), synthetic_data(batch_size=16, train_size=8, val_size=8), restarts=1, bpa=BPASettings(enabled=False),
                   accelerator="cpu")
    assert sorted(path.name for path in (tmp_path / "runs" / "cluster").iterdir()) == ["cluster_results.json", "clusters.png"]


def test_kmeans_into_as_many_clusters_as_points_gives_integer_assignments():
    points = torch.randn(6, 3, generator=torch.Generator().manual_seed(4))
    assignment, centroids, inertia = kmeans(points, 6, restarts=1)
    assert assignment.dtype == torch.int64 and sorted(assignment.tolist()) == list(range(6))  # one point each
    assert inertia == pytest.approx(0.0, abs=1e-10)
    torch.testing.assert_close(centroids[assignment], points)


def test_cluster_features_adds_the_bpa_space_by_default_and_up_to_the_set_limit(monkeypatch):
    points, labels = _blobs(per_cluster=5, num_clusters=3)
    metrics, assignments = cluster.cluster_features(points, labels, 3, restarts=1)
    assert list(metrics) == list(assignments) == ["raw", "bpa"]
    monkeypatch.setattr(bpa_module, "BPA_MAX_SET", 15)
    assert list(cluster.cluster_features(points, labels, 3, restarts=1)[0]) == ["raw", "bpa"]  # 15 images: allowed
    monkeypatch.setattr(bpa_module, "BPA_MAX_SET", 14)
    with pytest.raises(ValueError) as error:
        cluster.cluster_features(points, labels, 3, restarts=1)
    assert str(error.value) == (
        "BPA transforms 15 items as one set, more than BPA_MAX_SET=14 (its affinities would not fit); "
        "cluster a class-balanced `fraction` of the split"
    )


def test_plot_points_are_the_centred_principal_components_in_tab20(tmp_path, figures):
    points, labels = _blobs(per_cluster=6, num_clusters=3, dim=5)
    points = points + 3.0  # far from the origin: centring matters
    metrics = {"raw": {"nmi": 1.0, "ari": 1.0, "accuracy": 1.0}}
    cluster.plot_clusters(points, labels, {"raw": labels}, metrics, tmp_path / "clusters.png")
    unit = F.normalize(points, dim=1)
    centred = unit - unit.mean(0)
    _, _, right = torch.linalg.svd(centred, full_matrices=False)
    expected = centred @ right[:2].T
    for axes in figures[0].axes:
        (scatter,) = axes.collections
        offsets = torch.tensor(scatter.get_offsets().data, dtype=torch.float32)
        signs = torch.sign((offsets * expected).sum(0))  # a principal direction's sign is arbitrary
        torch.testing.assert_close(offsets * signs, expected, atol=1e-4, rtol=1e-3)
        assert scatter.get_cmap().name == "tab20" and scatter.get_alpha() == 0.8


def test_bpa_defaults_and_the_file_report_on_the_selected_device(checkpoint, tmp_path, monkeypatch):
    settled = []
    real = cluster.report_files
    monkeypatch.setattr(cluster, "report_files", lambda *args: settled.append(args[1:]) or real(*args))
    data = synthetic_data(batch_size=16, train_size=8, val_size=12)
    result = run_clustering(str(checkpoint), data, restarts=1, output_dir=str(tmp_path), accelerator="cpu")
    assert settled == [(tmp_path / "skipped_files.tsv", torch.device("cpu"))]
    assert result["bpa_settings"] == {"reg": 0.1, "iterations": 10} and set(result) >= {"raw", "bpa"}
