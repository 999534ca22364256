"""DeepCluster-v2: the loss and the k-means against float64 references written from the paper's
equations, the bank kept by dataset index, multi-process equality (loss, gradients, bank,
centroids and assignments), and the module's clustering at each epoch's start in a tiny run."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from bam.losses import DeepClusterV2Loss, deepcluster_loss
from bam.methods import DeepClusterV2Module
from bam.methods.base import dataset_indices_of
from bam.ops import spherical_kmeans
from bam.ops.errors import UserInputError
from cli_runs import printed_pretrain_config
from repo_paths import REPO
from test_loss_distributed import BATCH, DIM, NUM_CROPS, global_batch, rows_of
from tiny_runs import IndexedTinyCrops, spawn_gloo_workers

NUM_GLOBAL, NUM_IMAGES, HEADS = 2, 20, [4, 3]
SMALL = dict(backbone="bam_cnn4", backbone_kwargs=dict(width=8), num_local_crops=2,
             projector=dict(hidden_dim=32, out_dim=16, num_layers=2), objective=dict(num_prototypes=[4, 3]))
DEMO = REPO / "configs" / "pretrain" / "deepclusterv2_demo.yaml"


# ----------------------------------------------------------------- references (paper's equations)
def reference_loss(embeddings: torch.Tensor, prototypes: list[torch.Tensor], targets: torch.Tensor, num_crops: int,
                   temperature: float = 0.1) -> torch.Tensor:
    """Row by row: crop v of image b predicts, for each head h, its image's cluster y_hb with
    p = softmax(z_vb . c_h / T), z the normalised embedding; the loss is -log p[y_hb] averaged over
    the crops and images, then over the heads."""
    batch = targets.shape[1]
    per_head = []
    for centroids, target in zip(prototypes, targets):
        terms = []
        for row in range(embeddings.shape[0]):
            z = embeddings[row] / embeddings[row].norm()
            logits = centroids @ z / temperature
            terms.append(torch.logsumexp(logits, 0) - logits[target[row % batch]])
        per_head.append(torch.stack(terms).mean())
    return torch.stack(per_head).mean()


def reference_kmeans(points: torch.Tensor, start: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means point by point: assign each point to the centroid of largest cosine, move
    each centroid with points to the unit vector along their mean; the final assignment."""
    centroids = points[start].clone()
    for _ in range(iterations):
        nearest = [int(torch.argmax(centroids @ point)) for point in points]
        for k in range(len(centroids)):
            members = [point for point, n in zip(points, nearest) if n == k]
            if members:
                mean = torch.stack(members).mean(0)
                centroids[k] = mean / mean.norm()
    return centroids, torch.tensor([int(torch.argmax(centroids @ point)) for point in points])


def unit_rows(count: int, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(count, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)), dim=1)


# ----------------------------------------------------------------- loss and k-means
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_loss_and_gradients_match_the_float64_reference(temperature):
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(NUM_CROPS * 5, DIM, dtype=torch.float64, generator=generator)
    prototypes = [unit_rows(count, seed=10 + head) for head, count in enumerate(HEADS)]
    targets = torch.stack([torch.randint(count, (5,), generator=generator) for count in HEADS])
    ours_e, ref_e = embeddings.clone().requires_grad_(), embeddings.clone().requires_grad_()
    ours = deepcluster_loss(ours_e, prototypes, targets, num_crops=NUM_CROPS, temperature=temperature)
    ref = reference_loss(ref_e, prototypes, targets, NUM_CROPS, temperature)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_e.grad, ref_e.grad, rtol=1e-9, atol=1e-12)


def test_kmeans_matches_the_reference_from_the_same_start():
    points = unit_rows(40)
    for seed in range(3):
        centroids, assignments = spherical_kmeans(points, 5, iterations=10, generator=torch.Generator().manual_seed(seed))
        start = torch.randperm(40, generator=torch.Generator().manual_seed(seed))[:5]  # the documented draw
        ref_centroids, ref_assignments = reference_kmeans(points, start, 10)
        torch.testing.assert_close(centroids, ref_centroids, rtol=1e-10, atol=1e-12)
        assert torch.equal(assignments, ref_assignments)
        assert len(assignments.unique()) > 1 and torch.allclose(centroids.norm(dim=1), torch.ones(5, dtype=torch.float64))


def test_kmeans_refuses_more_clusters_than_rows():
    with pytest.raises(ValueError) as error:
        spherical_kmeans(unit_rows(3), 4)
    assert str(error.value) == ("k-means of 3 rows into 4 clusters: there must be at least one row per cluster; "
                                "use fewer clusters (prototypes) or more images")


def allocated_loss(seed: int = 0) -> DeepClusterV2Loss:
    loss_fn = DeepClusterV2Loss(DIM, NUM_CROPS, NUM_GLOBAL, dict(num_prototypes=HEADS))
    loss_fn.allocate(NUM_IMAGES, seed)
    return loss_fn


def test_heads_cluster_their_global_crops_bank_and_set_prototypes_and_targets():
    loss_fn = allocated_loss()
    assert loss_fn.bank.shape == (NUM_GLOBAL, NUM_IMAGES, DIM) and (loss_fn.assignments == -1).all()
    torch.testing.assert_close(loss_fn.bank.norm(dim=2), torch.ones(NUM_GLOBAL, NUM_IMAGES))  # random unit rows
    loss_fn.cluster(epoch=3, seed=7)
    assert int(loss_fn.clustered_epoch) == 3
    for head, count in enumerate(HEADS):  # head h clusters bank h mod G
        generator = torch.Generator().manual_seed((7 * 1_000_003 + 3) * 1_009 + head)
        centroids, assignments = spherical_kmeans(loss_fn.bank[head % NUM_GLOBAL], count, 10, generator)
        torch.testing.assert_close(loss_fn.prototypes[head], centroids)
        assert torch.equal(loss_fn.assignments[head], assignments)


def test_forward_predicts_the_images_targets_then_writes_their_bank_rows():
    loss_fn = allocated_loss()
    loss_fn.cluster(epoch=0)
    embeddings = torch.randn(NUM_CROPS * 3, DIM, generator=torch.Generator().manual_seed(2))
    indices = torch.tensor([5, 0, 17])
    expected = reference_loss(embeddings.double(), [c.double() for c in loss_fn.prototypes],
                              loss_fn.assignments[:, indices], NUM_CROPS)
    before = loss_fn.bank.clone()
    torch.testing.assert_close(loss_fn(embeddings, indices).double(), expected, rtol=1e-5, atol=1e-6)
    for crop in range(NUM_GLOBAL):
        torch.testing.assert_close(loss_fn.bank[crop, indices], F.normalize(embeddings[crop * 3 : crop * 3 + 3], dim=1))
    untouched = torch.ones(NUM_IMAGES, dtype=torch.bool)
    untouched[indices] = False
    assert torch.equal(loss_fn.bank[:, untouched], before[:, untouched])
    loss_fn.eval()  # evaluation leaves the bank alone
    after = loss_fn.bank.clone()
    loss_fn(torch.randn(NUM_CROPS * 3, DIM), indices)
    assert torch.equal(loss_fn.bank, after)


def test_state_round_trips_with_its_own_training_set_size():
    loss_fn = allocated_loss(seed=4)
    loss_fn.cluster(epoch=2)
    fresh = DeepClusterV2Loss(DIM, NUM_CROPS, NUM_GLOBAL, dict(num_prototypes=HEADS))  # not allocated: size 0
    fresh.load_state_dict(loss_fn.state_dict())
    for name, value in loss_fn.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert set(loss_fn.state_dict()) == {"bank", "assignments", "clustered_epoch", "centroids_0", "centroids_1"}


def test_uniform_predictions_score_chance_level():
    loss_fn = allocated_loss()
    loss_fn.cluster(epoch=0)
    assert loss_fn(torch.zeros(NUM_CROPS * 2, DIM), torch.tensor([1, 2])).item() == pytest.approx(
        (math.log(4) + math.log(3)) / 2) == pytest.approx(loss_fn.chance_level())


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(num_prototypes=[]), "num_prototypes=[]: give each head at least 2 clusters"),
     (dict(num_prototypes=[5, 1]), "num_prototypes=[5, 1]: give each head at least 2 clusters"),
     (dict(temperature=0.0), "temperature=0.0 must be positive"),
     (dict(kmeans_iterations=0), "kmeans_iterations=0 must be at least 1")],
)
def test_bad_settings_are_explained(kwargs, message):
    with pytest.raises(ValueError) as error:
        DeepClusterV2Loss(DIM, NUM_CROPS, NUM_GLOBAL, kwargs)
    assert str(error.value) == message


def test_bad_use_is_explained():
    loss_fn = DeepClusterV2Loss(DIM, NUM_CROPS, NUM_GLOBAL, dict(num_prototypes=HEADS))
    with pytest.raises(RuntimeError, match=r"^DeepCluster-v2 has no clusters yet: call allocate\(num_images\)"):
        loss_fn(torch.randn(NUM_CROPS * 2, DIM), torch.tensor([0, 1]))
    with pytest.raises(ValueError) as error:
        loss_fn.allocate(3)
    assert str(error.value) == ("num_prototypes=[4, 3]: k-means cannot make 4 clusters of 3 training images; set "
                                "model.init_args.objective.num_prototypes to at most 3 per head")
    loss_fn.allocate(NUM_IMAGES)
    loss_fn.cluster(epoch=0)
    with pytest.raises(ValueError, match=r"^dataset indices must lie in \[0, 20\) \(the bank's training set size\), got 1..20$"):
        loss_fn(torch.randn(NUM_CROPS * 2, DIM), torch.tensor([1, 20]))
    with pytest.raises(UserInputError) as error:
        dataset_indices_of(([torch.zeros(2, 3, 4, 4)], torch.zeros(2)), "DeepCluster-v2's memory bank")
    assert str(error.value) == (
        "DeepCluster-v2's memory bank needs each image's dataset index: training batches must be (crops, labels, "
        "indices), as bam's data modules make them (FFCV data without ContrastiveCrop carries none)")


# ----------------------------------------------------------------- 2 processes = 1 process
GLOBAL_INDICES = torch.tensor([7, 2, 15, 11, 0, 19])  # world * BATCH images of the NUM_IMAGES


def step_results(embeddings: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cluster the seeded bank, one step on `embeddings`, then cluster the updated bank."""
    loss_fn = allocated_loss(seed=3)
    loss_fn.cluster(epoch=0)
    first = {"centroids_0": loss_fn.prototypes[0].clone(), "assignments_0": loss_fn.assignments.clone()}
    embeddings = embeddings.clone().requires_grad_()
    loss = loss_fn(embeddings, indices)
    loss.backward()
    loss_fn.cluster(epoch=1)
    return {**first, "loss": loss.detach(), "grad": embeddings.grad, "bank": loss_fn.bank.clone(),
            "centroids_1": torch.cat(loss_fn.prototypes), "assignments_1": loss_fn.assignments.clone()}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        indices = GLOBAL_INDICES[rank * BATCH : (rank + 1) * BATCH]
        torch.save(step_results(rows_of(global_batch(world, seed=0), rank), indices), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_match_one_process_with_one_bank_and_the_same_clusters(tmp_path):
    world = 2
    spawn_gloo_workers(_worker, world, tmp_path)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    single = step_results(global_batch(world, seed=0).reshape(-1, DIM), GLOBAL_INDICES)
    grad = single["grad"].view(NUM_CROPS, world * BATCH, DIM)
    losses = torch.stack([result["loss"] for result in results])
    torch.testing.assert_close(losses.mean(), single["loss"], rtol=1e-6, atol=1e-6)
    assert (losses - single["loss"]).abs().max() > 1e-4  # each process's own loss differs: not vacuous
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["grad"] / world, rows_of(grad, rank), rtol=1e-5, atol=1e-7)
        for name in ("bank", "centroids_0", "centroids_1"):  # every process's images in every bank
            torch.testing.assert_close(result[name], single[name], rtol=1e-5, atol=1e-6)
        for name in ("assignments_0", "assignments_1"):
            assert torch.equal(result[name], single[name]), name
    assert not torch.equal(single["assignments_0"], single["assignments_1"])  # the step changed the clusters


# ----------------------------------------------------------------- the LightningModule
class RecordClustering(pl.Callback):
    """At each epoch's start the bank the module is about to cluster (callbacks run before the
    module's hook), then at the epoch's first step the prototypes and targets it trains against."""

    def __init__(self) -> None:
        self.banks, self.prototypes, self.targets = [], [], []

    def on_train_epoch_start(self, trainer, module):
        self.banks.append(module.loss_fn.bank.clone())

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            self.prototypes.append([c.clone() for c in module.loss_fn.prototypes])
            self.targets.append(module.loss_fn.assignments.clone())


def test_each_epoch_trains_against_kmeans_of_the_previous_epochs_bank(tmp_path):
    torch.manual_seed(0)
    model = DeepClusterV2Module(**SMALL, warmup_epochs=0, cluster_seed=5)
    record = RecordClustering()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[record])
    trainer.fit(model, IndexedTinyCrops(num_images=16, batch_size=4))
    start = torch.Generator().manual_seed(5)
    expected_start = F.normalize(torch.randn(NUM_GLOBAL, 16, 16, generator=start), dim=2)
    torch.testing.assert_close(record.banks[0], expected_start)  # epoch 0: the seeded random bank
    for epoch in range(2):
        for head, count in enumerate([4, 3]):
            generator = torch.Generator().manual_seed((5 * 1_000_003 + epoch) * 1_009 + head)
            centroids, assignments = spherical_kmeans(record.banks[epoch][head % NUM_GLOBAL], count, 10, generator)
            torch.testing.assert_close(record.prototypes[epoch][head], centroids)
            assert torch.equal(record.targets[epoch][head], assignments)
    assert not torch.isclose(record.banks[1], record.banks[0]).any(dim=2).all()  # epoch 0 wrote every image's rows
    assert int(model.loss_fn.clustered_epoch) == 1
    assert not any(p.requires_grad for p in model.loss_fn.parameters())  # the prototypes are set, never trained


def test_the_module_refuses_a_teacher_and_data_without_indices(tmp_path):
    with pytest.raises(ValueError, match=r"^DeepCluster-v2 has no momentum teacher"):
        DeepClusterV2Module(**SMALL, momentum_teacher=True)
    model = DeepClusterV2Module(**SMALL)
    crops = [torch.rand(2, 3, 32, 32)] * 2 + [torch.rand(2, 3, 16, 16)] * 2
    with pytest.raises(UserInputError, match=r"^DeepCluster-v2's memory bank needs each image's dataset index"):
        model.step_loss(crops, (crops, torch.zeros(2)))


# ----------------------------------------------------------------- configs
def test_demo_config_matches_the_bam_demo_except_the_model():
    ours, bam = yaml.safe_load(DEMO.read_text()), yaml.safe_load((DEMO.parent / "demo.yaml").read_text())
    assert ours["data"] == bam["data"] and ours["trainer"] == {**bam["trainer"], "default_root_dir": "runs/deepclusterv2_demo"}
    assert ours["knn"] == bam["knn"] and ours["seed_everything"] == bam["seed_everything"]
    for key in ("backbone", "backbone_kwargs", "channels_last", "lr", "warmup_epochs"):
        assert ours["model"]["init_args"][key] == bam["model"]["init_args"][key]
    for key in ("hidden_dim", "out_dim", "num_layers", "batch_norm"):
        assert ours["model"]["init_args"]["projector"][key] == bam["model"]["init_args"]["projector"][key]


@pytest.mark.parametrize("name", ["deepclusterv2_demo", "deepclusterv2_resnet50"])
def test_deepclusterv2_configs_parse_and_build(name, capsys):
    config = DEMO.parent / f"{name}.yaml"
    printed = printed_pretrain_config(config, capsys)
    assert printed["model"]["class_path"] == "bam.methods.DeepClusterV2Module"
    init_args = yaml.safe_load(config.read_text())["model"]["init_args"]
    assert printed["model"]["init_args"]["objective"] == init_args["objective"]
    if name == "deepclusterv2_demo":  # the ResNet-50 one is too big to build in a unit test
        model = DeepClusterV2Module(**init_args, num_local_crops=4)
        assert [len(c) for c in model.loss_fn.prototypes] == [30, 30, 30]
