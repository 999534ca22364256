"""SeLa: the label optimisation against a plain float64 Sinkhorn loop written from the paper's
equations, the loss against its cross-entropy by hand, 2 processes against 1 (loss, gradients,
bank and labels), and the LightningModule's label schedule, checkpointed state and settings."""
from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from cli_runs import printed_pretrain_config

from bam.losses import SeLaLoss, optimal_labels, self_label_loss
from bam.methods import SeLaModule
from bam.models import feature_dim
from bam.ops.errors import UserInputError
from repo_paths import REPO
from tiny_runs import IndexedTinyCrops, TinyCropsDataModule, spawn_gloo_workers

CONFIGS = REPO / "configs" / "pretrain"


def paper_labels(logits: torch.Tensor, lam: float, iterations: int) -> torch.Tensor:
    """SeLa's label optimisation (Asano et al., 2020, eq. 5-6) as written there: `P = softmax(l)`,
    `Q = diag(a) P^lambda diag(b)` with `b <- (1/K) / ((P^lambda)^T a)` and `a <- (1/N) / (P^lambda b)`
    alternately (the image scalings `a` last), in float64; each image's label is its row's argmax."""
    kernel = F.softmax(logits.double(), dim=1) ** lam
    images, classes = kernel.shape
    a = torch.full((images,), 1.0 / images, dtype=torch.float64)
    for _ in range(iterations):
        b = (1.0 / classes) / (kernel.T @ a)
        a = (1.0 / images) / (kernel @ b)
    plan = a[:, None] * kernel * b[None, :]
    return plan.argmax(dim=1), plan


def skewed_logits(images: int = 24, classes: int = 4, seed: int = 0) -> torch.Tensor:
    """Logits whose plain argmax puts most images in class 0: only the equipartition spreads them."""
    logits = torch.randn(images, classes, generator=torch.Generator().manual_seed(seed))
    logits[:, 0] += 1.5
    return logits


# ----------------------------------------------------------------- the objective
@pytest.mark.parametrize("iterations", [1, 5, 300])
def test_labels_are_the_paper_sinkhorns(iterations):
    logits = skewed_logits()
    expected, plan = paper_labels(logits, 25.0, iterations)
    assert torch.equal(optimal_labels(logits, lam=25.0, sinkhorn_iterations=iterations), expected)
    if iterations == 300:  # converged: every class holds N / K = 6 images' mass, and the labels are balanced
        torch.testing.assert_close(plan.sum(dim=0) * len(logits), torch.full((4,), 6.0, dtype=torch.float64), rtol=0.01, atol=0)
        assert torch.bincount(expected, minlength=4).tolist() == [6, 6, 6, 6]
        assert torch.bincount(logits.argmax(dim=1), minlength=4)[0] > 12  # not what the argmax alone gives


def test_loss_is_the_cross_entropy_of_every_crop_against_its_images_label():
    generator = torch.Generator().manual_seed(1)
    heads, crops, batch, classes = 3, 4, 5, 6
    logits = torch.randn(heads, crops * batch, classes, generator=generator, dtype=torch.float64)
    labels = torch.randint(classes, (heads, batch), generator=generator)
    expected = torch.stack([-F.log_softmax(logits[h, c * batch + i] / 0.1, dim=0)[labels[h, i]]
                            for h in range(heads) for c in range(crops) for i in range(batch)]).mean()
    torch.testing.assert_close(self_label_loss(logits, labels, temperature=0.1), expected)


def tiny_loss(cosine: bool = False, num_images: int = 10) -> SeLaLoss:
    torch.manual_seed(3)  # the heads' initialisation
    loss_fn = SeLaLoss(DIM, NUM_CROPS, num_clusters=3, num_heads=2, sinkhorn_iterations=50,
                       temperature=0.1 if cosine else 1.0, cosine_heads=cosine)
    loss_fn.start(num_images, seed=0)
    return loss_fn


@pytest.mark.parametrize("cosine", [False, True], ids=["linear-heads", "cosine-heads"])
def test_loss_reads_each_images_labels_and_the_heads(cosine):
    loss_fn = tiny_loss(cosine)
    embeddings = torch.randn(NUM_CROPS * 3, DIM, generator=torch.Generator().manual_seed(2))
    indices = torch.tensor([7, 2, 4])
    inputs = F.normalize(embeddings, dim=1) if cosine else embeddings
    logits = torch.stack([inputs @ head.weight.T + (0 if head.bias is None else head.bias) for head in loss_fn.heads])
    expected = self_label_loss(logits, loss_fn.labels[:, indices], 0.1 if cosine else 1.0)
    torch.testing.assert_close(loss_fn(embeddings, indices), expected)
    if cosine:
        torch.testing.assert_close(loss_fn.heads[0].weight.norm(dim=1), torch.ones(3))
    assert loss_fn.recorded.tolist() == [i in (7, 2, 4) for i in range(10)]
    torch.testing.assert_close(loss_fn.bank[indices], inputs[:3])  # the first global crop of each image


def test_first_labels_are_seeded_equipartitions_and_relabelling_uses_the_bank():
    loss_fn = tiny_loss(num_images=9)
    for head_labels in loss_fn.labels:
        assert torch.bincount(head_labels).tolist() == [3, 3, 3]
    assert not torch.equal(loss_fn.labels[0], loss_fn.labels[1])  # each head shuffled on its own
    assert torch.equal(tiny_loss(num_images=9).labels, loss_fn.labels)  # seeded: the same on every process
    before = loss_fn.labels.clone()
    assert loss_fn.optimize_labels() == 0 and torch.equal(loss_fn.labels, before)  # nothing recorded yet
    seen = torch.tensor([0, 3, 5, 8, 6, 1])
    loss_fn.train()
    loss_fn(torch.randn(NUM_CROPS * len(seen), DIM), seen)
    assert loss_fn.optimize_labels() == len(seen)
    for h, head in enumerate(loss_fn.heads):
        rows = seen.sort().values
        assert torch.equal(loss_fn.labels[h, rows], optimal_labels(head(loss_fn.bank[rows]).double(), 25.0, 50))
    unseen = torch.tensor([2, 4, 7])
    assert torch.equal(loss_fn.labels[:, unseen], before[:, unseen])  # never recorded: labels kept


@pytest.mark.parametrize("settings,message", [
    (dict(lam=0), "lam=0 and temperature=1.0 must be positive"),
    (dict(num_clusters=1), "SeLa needs num_clusters >= 2 and num_heads >= 1, got num_clusters=1, num_heads=10"),
    (dict(sinkhorn_iterations=0), "sinkhorn_iterations=0 must be >= 1 (the equipartition needs them)"),
])
def test_bad_settings_are_explained(settings, message):
    with pytest.raises(ValueError) as error:
        SeLaLoss(DIM, NUM_CROPS, **settings)
    assert str(error.value) == message


# ----------------------------------------------------------------- 2 processes = 1
NUM_CROPS, DIM, BATCH, WORLD, IMAGES = 3, 6, 4, 2, 11
INDICES = torch.tensor([9, 0, 4, 7, 2, 10, 5, 1])  # the global batch's images, process r holds 4r..4r+3


def step_and_relabel(embeddings: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss, gradients (embeddings and heads) of one training step, then the bank and new labels."""
    loss_fn = tiny_loss(num_images=IMAGES)
    embeddings = embeddings.clone().requires_grad_()
    loss = loss_fn(embeddings, indices)
    loss.backward()
    loss_fn.optimize_labels()
    return {"loss": loss.detach(), "grad": embeddings.grad, "head_grad": loss_fn.heads[0].weight.grad,
            "labels": loss_fn.labels, "bank": loss_fn.bank}


def global_embeddings() -> torch.Tensor:
    """`(V, W*B, D)`: crop, image of the global batch, feature."""
    return torch.randn(NUM_CROPS, WORLD * BATCH, DIM, generator=torch.Generator().manual_seed(5))


def rows(embeddings: torch.Tensor, rank: int) -> torch.Tensor:
    return embeddings[:, rank * BATCH : (rank + 1) * BATCH].reshape(-1, DIM)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = step_and_relabel(rows(global_embeddings(), rank), INDICES[rank * BATCH : (rank + 1) * BATCH])
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_match_one_process_loss_gradients_bank_and_labels(tmp_path):
    spawn_gloo_workers(_worker, WORLD, tmp_path)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    one = step_and_relabel(global_embeddings().reshape(-1, DIM), INDICES)
    losses = torch.stack([result["loss"] for result in results])
    torch.testing.assert_close(losses.mean(), one["loss"])  # DDP averages the processes' means
    grad = one["grad"].view(NUM_CROPS, WORLD * BATCH, DIM)
    torch.testing.assert_close(torch.stack([r["head_grad"] for r in results]).mean(dim=0), one["head_grad"])
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["grad"] / WORLD, rows(grad, rank))
        assert torch.equal(result["bank"], one["bank"])  # every process recorded every process's images
        assert torch.equal(result["labels"], one["labels"])  # the row-sharded Sinkhorn solved the same problem
    assert (losses - one["loss"]).abs().max() > 1e-4  # each process's own loss differs: not vacuous
    relabelled = one["labels"][:, INDICES.sort().values]
    assert not torch.equal(relabelled, tiny_loss(num_images=IMAGES).labels[:, INDICES.sort().values])
    alone = tiny_loss(num_images=IMAGES)  # one process's half alone balances another problem
    alone.train()
    alone(rows(global_embeddings(), 0), INDICES[:BATCH])
    alone.optimize_labels()
    assert not torch.equal(alone.labels[:, INDICES[:BATCH]], one["labels"][:, INDICES[:BATCH]])


# ----------------------------------------------------------------- the LightningModule
SMALL = dict(backbone="bam_cnn4", backbone_kwargs=dict(pool_size=2, width=8), num_local_crops=2, warmup_epochs=0,
             objective=dict(num_clusters=4, num_heads=2, sinkhorn_iterations=20))


class RecordLabels(pl.Callback):
    def __init__(self) -> None:
        self.changed_at: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = module.loss_fn.labels.clone()

    def on_before_optimizer_step(self, trainer, module, optimizer):
        # module hooks run after callbacks': the step's relabelling happened between the two
        if not torch.equal(self.before, module.loss_fn.labels):
            self.changed_at.append(trainer.global_step)


def tiny_trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    return pl.Trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize("schedule,updates,expected", [("every_epoch", 1, [0, 4, 8]), ("quadratic", 3, [0, 1, 5])])
def test_labels_are_reoptimised_on_schedule_and_checkpointed(tmp_path, schedule, updates, expected):
    # 16 images in batches of 4, 3 epochs = 12 steps: every_epoch at steps 0, 4, 8; quadratic (3) at
    # 0, 12/9 -> 1, 48/9 -> 5; step 0 finds an empty bank, step 1 a bank of 4 of the 16 images
    model = SeLaModule(**SMALL, label_schedule=schedule, label_updates=updates)
    record = RecordLabels()
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[record])
    trainer.fit(model, IndexedTinyCrops(num_images=16, batch_size=4))
    relabel_steps = sorted(model.label_steps())
    assert relabel_steps == expected
    assert record.changed_at == expected[1:]  # then only, and each time (not at 0: nothing recorded yet)
    assert bool(model.loss_fn.recorded.all())
    path = tmp_path / "sela.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)["sela_labels"]
    assert torch.equal(state["labels"], model.loss_fn.labels) and torch.equal(state["bank"], model.loss_fn.bank)
    restored = SeLaModule(**SMALL, label_schedule=schedule, label_updates=updates)
    restored.on_load_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
    assert torch.equal(restored.loss_fn.labels, model.loss_fn.labels)


def test_batches_without_indices_and_bad_settings_are_explained(tmp_path):
    model = SeLaModule(**SMALL)
    with pytest.raises(UserInputError, match=r"^SeLa's pseudo-labels needs each image's dataset index: training batches must be \(crops, labels, indices\)"):
        tiny_trainer(tmp_path, max_steps=1).fit(model, TinyCropsDataModule(num_images=8, batch_size=4))
    with pytest.raises(ValueError) as error:
        SeLaModule(**SMALL, label_schedule="daily")
    assert str(error.value) == "unknown label_schedule 'daily'; choose one of ['every_epoch', 'quadratic']"
    with pytest.raises(ValueError, match=r"^SeLa has no momentum teacher"):
        SeLaModule(**SMALL, momentum_teacher=True)


def test_resuming_labels_of_another_data_set_is_explained(tmp_path):
    model = SeLaModule(**SMALL)
    model.loss_fn.start(5)  # as a checkpoint of a 5-image run restores it
    with pytest.raises(ValueError) as error:
        tiny_trainer(tmp_path, max_steps=1).fit(model, IndexedTinyCrops(num_images=16, batch_size=4))
    assert str(error.value) == (
        "the checkpoint holds SeLa labels of 5 training images but the data has 16; resume with the data it was "
        "trained on, or start a new run from its weights (--model.init_args.init_weights CHECKPOINT)")


def test_heads_read_the_backbone_without_a_projector_and_the_projection_with_one():
    plain, projected = SeLaModule(**SMALL), SeLaModule(**SMALL, projector=dict(num_layers=2, hidden_dim=16, out_dim=8))
    assert isinstance(plain.student.projector, torch.nn.Identity)
    assert plain.loss_fn.heads[0].in_features == feature_dim(plain.student.backbone)  # the CNN's features
    assert projected.loss_fn.heads[0].in_features == 8


# ----------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["sela_demo", "sela_v2_demo"])
def test_demo_configs_match_the_bam_demo_except_the_model(name):
    sela, bam = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()), yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    assert sela["data"] == bam["data"] and sela["trainer"] == {**bam["trainer"], "default_root_dir": f"runs/{name}"}
    assert sela["knn"] == bam["knn"] and sela["seed_everything"] == bam["seed_everything"]
    for key in ("backbone", "backbone_kwargs", "channels_last"):
        assert sela["model"]["init_args"][key] == bam["model"]["init_args"][key]


@pytest.mark.parametrize("name", ["sela_demo", "sela_v2_demo", "sela_resnet50", "sela_v2_resnet50"])
def test_sela_configs_parse(name, capsys):
    printed = printed_pretrain_config(CONFIGS / f"{name}.yaml", capsys)
    assert printed["model"]["class_path"] == "bam.methods.SeLaModule"
    if name.startswith("sela_v2"):
        assert printed["model"]["init_args"]["objective"]["cosine_heads"] is True
        assert printed["model"]["init_args"]["label_schedule"] == "every_epoch"
