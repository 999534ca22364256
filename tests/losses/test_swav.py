"""SwAV: codes from bam's Sinkhorn, the loss against a float64 reference written from the paper,
the prototypes' freeze and normalisation, multi-process equality, and a training step."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from cli_runs import printed_pretrain_config
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from bam.losses import SwAVLoss, SwAVObjective, swav_codes, swav_loss
from bam.ops import sinkhorn_distributed
from bam.methods import SwAVModule
from tiny_runs import TinyCropsDataModule, spawn_gloo_workers
from test_loss_distributed import BATCH, DIM, NUM_CROPS, global_batch, rows_of
from repo_paths import REPO

NUM_GLOBAL, NUM_PROTOTYPES = 2, 5
SMALL_HEAD = dict(projector=dict(hidden_dim=64, out_dim=32, num_layers=2))
DEMO = REPO / "configs" / "pretrain" / "swav_demo.yaml"


# ----------------------------------------------------------------- reference (paper's formulas)
def reference_codes(scores: torch.Tensor, reg: float, iterations: int) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp as the paper states it, in float64 on a (K, B) matrix: Q = exp(S^T / eps)
    scaled to total mass 1, then alternately each prototype (row) to mass 1/K and each image
    (column) to mass 1/B; the codes are the columns scaled to sum to 1."""
    q = torch.exp(scores.double().T / reg)
    q = q / q.sum()
    num_prototypes, batch = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / num_prototypes
        q = q / q.sum(dim=0, keepdim=True) / batch
    return (q * batch).T


def reference_loss(embeddings: torch.Tensor, prototypes: torch.Tensor, num_crops: int, num_global: int,
                   reg: float = 0.05, temperature: float = 0.1, iterations: int = 3) -> torch.Tensor:
    """Swapped prediction, pair by pair: for every global crop i and every other crop j,
    the mean over images of -sum_k q_ik log softmax(s_j / T)_k, averaged over the pairs."""
    batch = embeddings.shape[0] // num_crops
    scores = F.normalize(embeddings, dim=1) @ prototypes.T
    blocks = scores.split(batch)
    losses = []
    for i in range(num_global):
        q = reference_codes(blocks[i].detach(), reg, iterations)
        for j in range(num_crops):
            if j != i:
                losses.append(-(q * F.log_softmax(blocks[j] / temperature, dim=1)).sum(dim=1).mean())
    return torch.stack(losses).mean()


def unit_prototypes(num: int = NUM_PROTOTYPES, dim: int = DIM, seed: int = 2) -> torch.Tensor:
    return F.normalize(torch.randn(num, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


# ----------------------------------------------------------------- codes
def test_codes_are_equipartitioned_distributions():
    scores = F.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), dim=1) @ unit_prototypes(4, 8).T
    codes = swav_codes(scores, reg=0.05, sinkhorn_iterations=200)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(12))                 # each image: one unit of mass
    torch.testing.assert_close(codes.sum(dim=0), torch.full((4,), 12 / 4), rtol=0, atol=1e-4)  # each prototype: B / K
    # With SwAV's 3 iterations the rows are still exact distributions, the columns nearly balanced.
    codes = swav_codes(scores, reg=0.05, sinkhorn_iterations=3)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(12))
    assert (codes >= 0).all()


def test_codes_are_bams_sinkhorn_and_match_the_paper():
    scores = F.normalize(torch.randn(10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=1) @ unit_prototypes(6, 8).double().T
    codes = swav_codes(scores, reg=0.05, sinkhorn_iterations=3)
    torch.testing.assert_close(codes, reference_codes(scores, 0.05, 3), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(codes, sinkhorn_distributed(scores / 0.05, 3))            # one shared implementation


def test_codes_carry_no_gradient():
    scores = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    codes = swav_codes(scores)
    assert not codes.requires_grad and codes.grad_fn is None


# ----------------------------------------------------------------- loss
@pytest.mark.parametrize("num_crops,num_global", [(4, 2), (2, 2), (3, 1)])
def test_loss_and_gradients_match_float64_reference(num_crops, num_global):
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(num_crops * 5, DIM, dtype=torch.float64, generator=generator)
    prototypes = unit_prototypes().double()
    ours_e, ours_p = embeddings.clone().requires_grad_(), prototypes.clone().requires_grad_()
    ref_e, ref_p = embeddings.clone().requires_grad_(), prototypes.clone().requires_grad_()
    ours = swav_loss(ours_e, ours_p, num_crops=num_crops, num_global_crops=num_global)
    ref = reference_loss(ref_e, ref_p, num_crops, num_global)
    ours.backward()
    ref.backward()  # codes detached in the reference: equal gradients mean none flows through ours
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_e.grad, ref_e.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours_p.grad, ref_p.grad, rtol=1e-9, atol=1e-12)


def test_float32_and_module_agree_with_reference():
    embeddings = torch.randn(NUM_CROPS * 6, DIM, generator=torch.Generator().manual_seed(1))
    loss_fn = SwAVLoss(NUM_CROPS, NUM_GLOBAL, dim=DIM, num_prototypes=NUM_PROTOTYPES)
    with torch.no_grad():
        loss_fn.prototypes.weight.copy_(unit_prototypes())
    expected = reference_loss(embeddings.double(), unit_prototypes().double(), NUM_CROPS, NUM_GLOBAL)
    torch.testing.assert_close(loss_fn(embeddings).double(), expected, rtol=1e-5, atol=1e-5)


def test_uniform_predictions_score_chance_level():
    loss_fn = SwAVLoss(NUM_CROPS, NUM_GLOBAL, dim=DIM, num_prototypes=NUM_PROTOTYPES)
    loss = loss_fn(torch.zeros(NUM_CROPS * 3, DIM))  # all scores 0: every prediction uniform
    assert loss.item() == pytest.approx(math.log(NUM_PROTOTYPES)) == pytest.approx(loss_fn.chance_level())


def test_normalize_prototypes_gives_unit_rows():
    loss_fn = SwAVLoss(NUM_CROPS, dim=DIM, num_prototypes=7)
    with torch.no_grad():
        loss_fn.prototypes.weight.mul_(3.0)
    loss_fn.normalize_prototypes_()
    torch.testing.assert_close(loss_fn.prototypes.weight.norm(dim=1), torch.ones(7))


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(num_crops=1, num_global_crops=1), "at least 2 crops"), (dict(num_crops=4, num_global_crops=5), "num_global_crops"),
     (dict(num_crops=4, reg=0.0), "reg"), (dict(num_crops=4, num_prototypes=1), "num_prototypes")],
)
def test_bad_arguments_are_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SwAVLoss(dim=DIM, **kwargs)


def test_bad_shapes_are_explained():
    loss_fn = SwAVLoss(NUM_CROPS, dim=DIM, num_prototypes=NUM_PROTOTYPES)
    with pytest.raises(ValueError, match="crop-major"):
        loss_fn(torch.randn(NUM_CROPS * 3 + 1, DIM))
    with pytest.raises(ValueError, match="projector's output dimension"):
        loss_fn(torch.randn(NUM_CROPS * 3, DIM + 1))


# ----------------------------------------------------------------- 2 processes = 1 process
def local_loss_and_grads(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    embeddings, prototypes = embeddings.clone().requires_grad_(), unit_prototypes().requires_grad_()
    loss = swav_loss(embeddings, prototypes, num_crops=NUM_CROPS, num_global_crops=NUM_GLOBAL)
    loss.backward()
    return loss.detach(), embeddings.grad, prototypes.grad


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(local_loss_and_grads(rows_of(global_batch(world, seed=0), rank)), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    world = 2
    spawn_gloo_workers(_worker, world, tmp_path)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]

    batch = global_batch(world, seed=0)
    loss, grad, prototype_grad = local_loss_and_grads(batch.reshape(-1, DIM))
    grad = grad.view(NUM_CROPS, world * BATCH, DIM)
    losses = torch.stack([result[0] for result in results])
    # DDP averages gradients over processes; each loss is a mean over the process's own images.
    torch.testing.assert_close(losses.mean(), loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.stack([r[2] for r in results]).mean(dim=0), prototype_grad, rtol=1e-5, atol=1e-6)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result[1] / world, rows_of(grad, rank), rtol=1e-5, atol=1e-6)
    assert (losses - loss).abs().max() > 1e-4  # the per-process losses differ: the check is not vacuous
    # A Sinkhorn balanced per process (no all-reduce) would give other codes, hence another loss.
    per_process = torch.stack([local_loss_and_grads(rows_of(batch, rank))[0] for rank in range(world)])
    assert (per_process - losses).abs().max() > 1e-4


# ----------------------------------------------------------------- the LightningModule
def tiny_trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    return pl.Trainer(**{**defaults, **kwargs})


def test_training_step_moves_the_student(tmp_path):
    model = SwAVModule(backbone="bam_cnn4", num_local_crops=2, objective=SwAVObjective(num_prototypes=8),
                       warmup_epochs=0, **SMALL_HEAD)
    before = [p.detach().clone() for p in model.student.parameters()]
    tiny_trainer(tmp_path, fast_dev_run=1).fit(model, TinyCropsDataModule(num_images=8, batch_size=4))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.student.parameters()))
    assert model.chance_level(batch_size=16) == pytest.approx(math.log(8))


class RecordPrototypes(pl.Callback):
    """Per step: the prototypes' norms as the loss saw them, their gradient at the optimiser step,
    and their value after it."""

    def __init__(self) -> None:
        self.norms, self.has_grad, self.after = [], [], []

    def on_before_backward(self, trainer, module, loss):
        self.norms.append(module.loss_fn.prototypes.weight.detach().norm(dim=1).clone())

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grad = module.loss_fn.prototypes.weight.grad
        self.has_grad.append(grad is not None and bool(grad.abs().sum() > 0))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append(module.loss_fn.prototypes.weight.detach().clone())


def test_prototypes_frozen_for_the_first_epoch_then_trained_without_decay(tmp_path):
    model = SwAVModule(backbone="bam_cnn4", num_local_crops=2, objective=SwAVObjective(num_prototypes=8),
                       freeze_prototypes_epochs=1, warmup_epochs=0, lr=0.5, weight_decay=0.1, weight_decay_final=0.1, **SMALL_HEAD)
    start = model.loss_fn.prototypes.weight.detach().clone()
    record = RecordPrototypes()
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[record])
    trainer.fit(model, TinyCropsDataModule(num_images=16, batch_size=4))  # 4 steps per epoch
    assert record.has_grad == [False] * 4 + [True] * 4
    for weight in record.after[:4]:  # frozen: only re-normalised, which moves unit rows by rounding only
        torch.testing.assert_close(weight, start, rtol=0, atol=1e-6)
    assert (record.after[4] - start).abs().max() > 1e-3                          # then trained
    for norms in record.norms:                                                   # the loss sees unit prototypes
        torch.testing.assert_close(norms, torch.ones(8))
    group = next(g for g in trainer.optimizers[0].param_groups if g["params"][0] is model.loss_fn.prototypes.weight)
    assert group["weight_decay"] == 0 and group["initial_weight_decay"] == 0
    assert group["lr"] == pytest.approx(trainer.optimizers[0].param_groups[0]["lr"])  # on the lr schedule


def test_teacher_and_crop_mismatch_are_explained(tmp_path):
    with pytest.raises(ValueError, match="no momentum teacher"):
        SwAVModule(backbone="bam_cnn4", momentum_teacher=True, **SMALL_HEAD)
    model = SwAVModule(backbone="bam_cnn4", num_local_crops=6, objective=SwAVObjective(num_prototypes=8), **SMALL_HEAD)
    with pytest.raises(ValueError, match="provides 4 crops per image but the model expects 8"):
        tiny_trainer(tmp_path, fast_dev_run=1).fit(model, TinyCropsDataModule(num_images=8, batch_size=4))


# ----------------------------------------------------------------- configs
def test_demo_config_matches_the_bam_demo_except_the_model():
    swav, bam = yaml.safe_load(DEMO.read_text()), yaml.safe_load((DEMO.parent / "demo.yaml").read_text())
    assert swav["data"] == bam["data"] and swav["trainer"] == {**bam["trainer"], "default_root_dir": "runs/swav_demo"}
    assert swav["knn"] == bam["knn"] and swav["seed_everything"] == bam["seed_everything"]
    for key in ("backbone", "backbone_kwargs", "channels_last"):  # crop counts: one setting, under data
        assert swav["model"]["init_args"][key] == bam["model"]["init_args"][key]


@pytest.mark.parametrize("name", ["swav_demo", "swav_resnet50"])
def test_swav_configs_parse_and_build(name, capsys):
    config = DEMO.parent / f"{name}.yaml"
    printed = printed_pretrain_config(config, capsys)
    assert printed["model"]["class_path"] == "bam.methods.SwAVModule"
    init_args = yaml.safe_load(config.read_text())["model"]["init_args"]
    if name == "swav_demo":  # the ResNet-50 one is too big to build in a unit test
        model = SwAVModule(**init_args)
        assert model.loss_fn.prototypes.out_features == init_args["objective"]["num_prototypes"]


# ----------------------------------------------------------------- the queue
QUEUE = 6  # rows per global crop; a multiple of 2 processes


def reference_queue_loss(embeddings: torch.Tensor, prototypes: torch.Tensor, queue: torch.Tensor, num_crops: int,
                         num_global: int, reg: float = 0.05, temperature: float = 0.1, iterations: int = 3) -> torch.Tensor:
    """SwAV with its queue: each global crop's Sinkhorn runs on [its images; the queue's rows of that
    crop], scored by the same prototypes, and only the images' codes are kept."""
    batch = embeddings.shape[0] // num_crops
    scores = F.normalize(embeddings, dim=1) @ prototypes.T
    blocks = scores.split(batch)
    losses = []
    for i in range(num_global):
        q = reference_codes(torch.cat([blocks[i].detach(), queue[i] @ prototypes.detach().T]), reg, iterations)[:batch]
        for j in range(num_crops):
            if j != i:
                losses.append(-(q * F.log_softmax(blocks[j] / temperature, dim=1)).sum(dim=1).mean())
    return torch.stack(losses).mean()


def full_queue(length: int = QUEUE, dtype=torch.float32, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(NUM_GLOBAL, length, DIM, dtype=dtype, generator=generator), dim=2)


def queued_loss_fn(queue: torch.Tensor) -> SwAVLoss:
    loss_fn = SwAVLoss(NUM_CROPS, NUM_GLOBAL, dim=DIM, num_prototypes=NUM_PROTOTYPES, queue_length=queue.shape[1])
    with torch.no_grad():
        loss_fn.prototypes.weight.copy_(unit_prototypes())
    loss_fn.queue.copy_(queue)
    loss_fn.queue_rows.fill_(queue.shape[1])
    loss_fn.queue_enabled = True
    return loss_fn


def test_queue_loss_and_gradients_match_the_reference():
    embeddings = torch.randn(NUM_CROPS * 4, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    queue = full_queue(dtype=torch.float64)
    ours_e, ref_e = embeddings.clone().requires_grad_(), embeddings.clone().requires_grad_()
    prototypes = unit_prototypes().double()
    ours = swav_loss(ours_e, prototypes, num_crops=NUM_CROPS, num_global_crops=NUM_GLOBAL, queue=queue)
    ref = reference_queue_loss(ref_e, prototypes, queue, NUM_CROPS, NUM_GLOBAL)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_e.grad, ref_e.grad, rtol=1e-9, atol=1e-12)
    assert not torch.isclose(ours, swav_loss(embeddings, prototypes, num_crops=NUM_CROPS, num_global_crops=NUM_GLOBAL))


def test_queue_is_filled_newest_first_and_used_once_full():
    embeddings = torch.randn(NUM_CROPS * 4, DIM, generator=torch.Generator().manual_seed(1))
    loss_fn = queued_loss_fn(full_queue())
    loss_fn.queue_rows.fill_(0)
    assert loss_fn.queue_length == QUEUE and {"queue", "queue_rows"} <= set(loss_fn.state_dict())
    no_queue = SwAVLoss(NUM_CROPS, NUM_GLOBAL, dim=DIM, num_prototypes=NUM_PROTOTYPES)
    assert not {"queue", "queue_rows"} & set(no_queue.state_dict())  # queue-less checkpoints keep their keys
    with torch.no_grad():
        no_queue.prototypes.weight.copy_(unit_prototypes())
    before = loss_fn.queue.clone()
    torch.testing.assert_close(loss_fn(embeddings), no_queue(embeddings))  # not full yet: not used
    normalised = F.normalize(embeddings, dim=1).view(NUM_CROPS, 4, DIM)
    for crop in range(NUM_GLOBAL):
        torch.testing.assert_close(loss_fn.queue[crop], torch.cat([normalised[crop], before[crop, :2]]))
    assert int(loss_fn.queue_rows) == 4
    loss_fn(embeddings)
    assert int(loss_fn.queue_rows) == QUEUE
    queue = loss_fn.queue.clone()
    expected = reference_queue_loss(embeddings.double(), unit_prototypes().double(), queue.double(), NUM_CROPS, NUM_GLOBAL)
    torch.testing.assert_close(loss_fn(embeddings).double(), expected, rtol=1e-5, atol=1e-5)  # full: used
    loss_fn.queue_enabled = False  # before the start epoch: neither used nor filled
    torch.testing.assert_close(loss_fn(embeddings), no_queue(embeddings))
    torch.testing.assert_close(loss_fn.queue, torch.cat([normalised[:NUM_GLOBAL], queue[:, :2]], dim=1))


def _queue_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(queued_loss_and_grads(rows_of(global_batch(world, seed=0), rank)), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def queued_loss_and_grads(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    embeddings = embeddings.clone().requires_grad_()
    loss_fn = queued_loss_fn(full_queue())
    loss = loss_fn(embeddings)
    loss.backward()
    return loss.detach(), embeddings.grad, loss_fn.queue.clone()


@pytest.mark.distributed
def test_two_processes_with_the_queue_match_one_process(tmp_path):
    world = 2
    spawn_gloo_workers(_queue_worker, world, tmp_path)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    batch = global_batch(world, seed=0)
    loss, grad, queue = queued_loss_and_grads(batch.reshape(-1, DIM))
    grad = grad.view(NUM_CROPS, world * BATCH, DIM)
    losses = torch.stack([result[0] for result in results])
    torch.testing.assert_close(losses.mean(), loss, rtol=1e-6, atol=1e-6)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result[1] / world, rows_of(grad, rank), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result[2], queue, rtol=0, atol=1e-6)  # the global batch's, on every process
    assert (losses - loss).abs().max() > 1e-4


def test_swav_module_fills_its_queue_from_the_start_epoch_and_checkpoints_it(tmp_path):
    model = SwAVModule(backbone="bam_cnn4", num_local_crops=2, objective=SwAVObjective(num_prototypes=8),
                       queue_length=8, queue_start_epoch=1, warmup_epochs=0, **SMALL_HEAD)
    trainer = tiny_trainer(tmp_path, max_epochs=2)
    trainer.fit(model, TinyCropsDataModule(num_images=16, batch_size=4))  # 4 steps per epoch, filled in the 2nd
    assert int(model.loss_fn.queue_rows) == 8 and trainer.logged_metrics["train/queue_rows"] == 8.0
    assert model.loss_fn.queue.norm(dim=2).allclose(torch.ones(2, 8))  # normalised embeddings only
    assert {"loss_fn.queue", "loss_fn.queue_rows"} <= set(model.state_dict())
    with pytest.raises(ValueError, match=r"^queue_start_epoch=-1 must be >= 0$"):
        SwAVModule(backbone="bam_cnn4", queue_length=8, queue_start_epoch=-1, **SMALL_HEAD)
