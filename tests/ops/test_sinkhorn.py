"""Properties of the balanced target and of the loss that do not need a reference implementation:
balance, permutation equivariance, gradient flow, precision, robustness and input validation."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from bam.losses import BAMLoss, balanced_target, bam_loss, keep_top_k, positive_mask
from bam.losses.bam_objective import Layout
from bam.ops import sinkhorn_distributed

# `bam.losses.bam_loss` is shadowed by the function of the same name; fetch the module itself.
bam_loss_module = importlib.import_module("bam.losses.bam_loss")
fill_positives_ = bam_loss_module.fill_positives_


def _embeddings(rows: int, dim: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _similarity(num_crops: int, batch: int, num_target: int, seed: int) -> torch.Tensor:
    z = F.normalize(_embeddings(num_crops * batch, 16, seed), dim=1)
    return z @ z[: num_target * batch].T


# --- balance -----------------------------------------------------------------------------------


@pytest.mark.parametrize("masking", [True, False], ids=["mask", "no_mask"])
def test_many_iterations_balance_the_masked_matrix(masking):
    """Sinkhorn's fixed point: every row sums to 1 and every column to the same total
    (rows / columns); masked entries stay exactly zero. Three iterations are not enough for this,
    which the second half checks, so the assertion has teeth."""
    num_crops, batch, num_target = 4, 6, 2
    sim = _similarity(num_crops, batch, num_target, seed=0)
    mask = positive_mask(num_crops, batch, num_target) if masking else None
    plan = balanced_target(sim, mask, reg=0.1, sinkhorn_iterations=500)
    rows, cols = plan.shape
    torch.testing.assert_close(plan.sum(dim=1), torch.ones(rows), rtol=0, atol=1e-5)
    torch.testing.assert_close(plan.sum(dim=0), torch.full((cols,), rows / cols), rtol=0, atol=1e-4)
    if mask is not None:
        assert torch.all(plan[mask] == 0)
        assert torch.all(plan[~mask] > 0)
    few = balanced_target(sim, mask, reg=0.1, sinkhorn_iterations=1)
    assert (few.sum(dim=0) - rows / cols).abs().max() > 1e-3


# --- permutation equivariance --------------------------------------------------------------------


def _permute_images(x: torch.Tensor, num_crops: int, perm: torch.Tensor) -> torch.Tensor:
    """Apply the same image permutation inside every crop block of crop-major rows."""
    return x.view(num_crops, len(perm), *x.shape[1:])[:, perm].reshape(x.shape)


@pytest.mark.parametrize("masking", [True, False], ids=["mask", "no_mask"])
def test_permuting_images_permutes_the_target(masking):
    num_crops, batch, num_target = 5, 7, 2
    z = F.normalize(_embeddings(num_crops * batch, 16, seed=1), dim=1)
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(2))

    def target_of(emb: torch.Tensor) -> torch.Tensor:
        mask = positive_mask(num_crops, batch, num_target) if masking else None
        return balanced_target(emb @ emb[: num_target * batch].T, mask, reg=0.05, sinkhorn_iterations=3)

    plan = target_of(z)
    permuted_plan = target_of(_permute_images(z, num_crops, perm))
    # Rows and (crop-major) columns both follow the image permutation.
    expected = _permute_images(plan, num_crops, perm)
    expected = _permute_images(expected.T.contiguous(), num_target, perm).T
    torch.testing.assert_close(permuted_plan, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("with_teacher", [False, True], ids=["no_teacher", "teacher"])
@pytest.mark.parametrize("top_k", [0, 6], ids=["topk_off", "topk6"])
def test_permuting_images_leaves_the_loss_unchanged(with_teacher, top_k):
    num_crops, batch = 6, 8
    student = _embeddings(num_crops * batch, 16, seed=3)
    teacher = _embeddings(num_crops * batch, 16, seed=4) if with_teacher else None
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(5))
    loss_fn = BAMLoss(num_crops, num_global_crops=2, top_k=top_k)
    loss = loss_fn(student, teacher)
    permuted_teacher = None if teacher is None else _permute_images(teacher, num_crops, perm)
    permuted_loss = loss_fn(_permute_images(student, num_crops, perm), permuted_teacher)
    torch.testing.assert_close(permuted_loss, loss, rtol=1e-6, atol=1e-6)


# --- gradients -----------------------------------------------------------------------------------


def test_target_carries_no_graph():
    sim = _similarity(3, 4, 2, seed=6).requires_grad_()
    plan = balanced_target(sim, positive_mask(3, 4, 2), reg=0.05, sinkhorn_iterations=3)
    assert not plan.requires_grad and plan.grad_fn is None


def _freeze_target(monkeypatch: pytest.MonkeyPatch, student: torch.Tensor, **kwargs) -> torch.Tensor:
    """Make bam_loss use, as its target, the one computed at `student` (a constant from then on).

    The loss with a frozen target is the source path alone: its autograd gradient must equal the
    gradient of the real loss if (and only if) no gradient flows through the target."""
    frozen = []
    real = bam_loss_module.sinkhorn_distributed_

    def recording(*args, **kw):
        frozen.append(real(*args, **kw))
        return frozen[0].clone()

    monkeypatch.setattr(bam_loss_module, "sinkhorn_distributed_", recording)
    bam_loss(student.detach(), **kwargs)
    return frozen[0]


LOSS_KWARGS = dict(num_crops=4, num_global_crops=2, num_target_crops=2, top_k=5)


@pytest.mark.parametrize("top_k", [0, 5])
def test_no_gradient_reaches_the_target(monkeypatch, top_k):
    kwargs = {**LOSS_KWARGS, "top_k": top_k}
    student = _embeddings(4 * 5, 8, seed=7, dtype=torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(bam_loss(student, **kwargs), student)
    _freeze_target(monkeypatch, student, **kwargs)
    (frozen_grad,) = torch.autograd.grad(bam_loss(student, **kwargs), student)
    torch.testing.assert_close(grad, frozen_grad, rtol=1e-12, atol=1e-14)
    # The target does depend on the student, so a differentiable target would have changed this:
    # the total derivative (finite differences, target recomputed) differs from the gradient.
    direction = _embeddings(4 * 5, 8, seed=8, dtype=torch.float64)
    monkeypatch.undo()
    h = 1e-6
    total = (bam_loss(student + h * direction, **kwargs) - bam_loss(student - h * direction, **kwargs)) / (2 * h)
    assert abs(total.item() - (grad * direction).sum().item()) > 1e-4


def test_gradcheck_source_path_without_teacher(monkeypatch):
    """float64 gradcheck of everything but the target: normalise, similarities (through both the
    rows and the gathered columns), masked log-softmax, top-k-sparse cross-entropy."""
    student = _embeddings(4 * 3, 6, seed=9, dtype=torch.float64).requires_grad_()
    _freeze_target(monkeypatch, student, **LOSS_KWARGS)
    assert torch.autograd.gradcheck(lambda s: bam_loss(s, **LOSS_KWARGS), (student,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("masking", [True, False], ids=["mask", "no_mask"])
def test_gradcheck_with_teacher(masking):
    """With a teacher the target does not depend on the student: gradcheck the real loss."""
    kwargs = {**LOSS_KWARGS, "positive_masking": masking}
    student = _embeddings(4 * 3, 6, seed=10, dtype=torch.float64).requires_grad_()
    teacher = _embeddings(4 * 3, 6, seed=11, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: bam_loss(s, teacher, **kwargs), (student,), eps=1e-6, atol=1e-7)


# --- precision -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("with_teacher", [False, True], ids=["no_teacher", "teacher"])
def test_half_precision_under_autocast_matches_float32(dtype, with_teacher):
    """Embeddings produced by a layer under CPU autocast arrive in half precision.

    Stated tolerances: the loss runs in float32 internally, so on the *same* (rounded) input values
    it agrees with float32 to 1e-5 relative. Against the unrounded float32 embeddings the only
    difference is the input rounding (fp16: 11-bit, bf16: 8-bit mantissa): loss within 5e-4 (fp16)
    and 5e-3 (bf16) relative, gradients within 5e-3 (fp16) and 3e-2 (bf16) of their largest entry
    (about 5x the largest errors measured over several seeds).
    """
    num_crops, batch = 4, 8
    with torch.random.fork_rng():  # a fixed layer whatever the test order
        torch.manual_seed(12)
        layer = torch.nn.Linear(16, 32)
        torch.nn.init.normal_(layer.weight, std=0.3)
    x = _embeddings(num_crops * batch, 16, seed=13)
    x_teacher = _embeddings(num_crops * batch, 16, seed=14) if with_teacher else None
    loss_fn = BAMLoss(num_crops, top_k=10)

    with torch.autocast("cpu", dtype=dtype):
        emb = layer(x)
        teacher = layer(x_teacher).detach() if with_teacher else None
        assert emb.dtype == dtype
        emb.retain_grad()
        loss = loss_fn(emb, teacher)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert emb.grad.dtype == dtype and torch.isfinite(emb.grad).all()

    rounded = emb.detach().float().requires_grad_()
    rounded_teacher = None if teacher is None else teacher.float()
    same_values = loss_fn(rounded, rounded_teacher)
    torch.testing.assert_close(loss, same_values, rtol=1e-5, atol=1e-6)

    full = layer(x).detach().requires_grad_()
    full_teacher = layer(x_teacher).detach() if with_teacher else None
    full_loss = loss_fn(full, full_teacher)
    full_loss.backward()
    loss_rtol, grad_rtol = (5e-4, 5e-3) if dtype == torch.float16 else (5e-3, 3e-2)
    torch.testing.assert_close(loss, full_loss, rtol=loss_rtol, atol=0)
    grad_error = (emb.grad.float() - full.grad).abs().max() / full.grad.abs().max()
    assert grad_error < grad_rtol, grad_error


# --- robustness ----------------------------------------------------------------------------------


def _adversarial(num_crops: int, batch: int, dim: int, kind: str) -> torch.Tensor:
    z = _embeddings(num_crops * batch, dim, seed=15)
    if kind == "anti_correlated":
        # Image 0, in every crop, points away from everything else: at reg=0.01 its row and its
        # columns sit ~200 nats below the rest, beyond float32's exp range.
        z = z.abs() + 0.1
        z.view(num_crops, batch, dim)[:, 0] = -z.mean(dim=0)
    elif kind == "collapsed":
        z = z[:1].expand_as(z).clone()
    elif kind == "near_duplicates":
        z = z[:1] + 1e-3 * z
    return z


@pytest.mark.parametrize("kind", ["random", "anti_correlated", "collapsed", "near_duplicates"])
@pytest.mark.parametrize("with_teacher", [False, True], ids=["no_teacher", "teacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_small_reg_stays_finite(kind, with_teacher, dtype):
    num_crops, batch = 4, 6
    student = _adversarial(num_crops, batch, 16, kind).to(dtype).requires_grad_()
    teacher = _adversarial(num_crops, batch, 16, kind).flip(0).to(dtype) if with_teacher else None
    loss_fn = BAMLoss(num_crops, reg=0.01, top_k=8)
    loss = loss_fn(student, teacher)
    loss.backward()
    assert torch.isfinite(loss), loss
    assert torch.isfinite(student.grad).all()


def test_small_reg_target_is_a_distribution_with_anti_correlated_image():
    num_crops, batch, num_target = 4, 6, 2
    z = F.normalize(_adversarial(num_crops, batch, 16, "anti_correlated"), dim=1)
    mask = positive_mask(num_crops, batch, num_target)
    plan = balanced_target(z @ z[: num_target * batch].T, mask, reg=0.01, sinkhorn_iterations=3)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(dim=1), torch.ones(len(plan)), rtol=0, atol=1e-5)
    # Balancing gives the outcast columns their share of mass although every raw entry underflows.
    raw = torch.exp((z @ z[: num_target * batch].T) / 0.01 - 100.0).masked_fill(mask, 0.0)
    assert raw[:, 0].max() == 0
    assert plan[:, 0].sum() > 0.1


# --- validation ----------------------------------------------------------------------------------


def test_rows_not_divisible_by_num_crops():
    with pytest.raises(ValueError, match=r"10 embedding rows.*num_crops=3"):
        BAMLoss(3, num_global_crops=2)(torch.randn(10, 8))


def test_more_target_crops_than_global_crops():
    with pytest.raises(ValueError, match=r"num_target_crops=3.*num_global_crops=2"):
        BAMLoss(4, num_global_crops=2, num_target_crops=3)
    with pytest.raises(ValueError, match=r"num_target_crops=3.*num_global_crops=2"):
        bam_loss(torch.randn(8, 4), num_crops=4, num_global_crops=2, num_target_crops=3)


def test_one_image_with_positive_masking():
    with pytest.raises(ValueError, match=r"at least 2 images.*got 1 per process x 1 process"):
        BAMLoss(2)(torch.randn(2, 8))
    # Without masking a single image is a valid (if useless) batch.
    assert torch.isfinite(BAMLoss(2, positive_masking=False)(torch.randn(2, 8)))


def test_teacher_of_a_different_shape():
    with pytest.raises(ValueError, match=re_shapes((12, 8), (8, 8))):
        BAMLoss(4)(torch.randn(8, 8), torch.randn(12, 8))


def re_shapes(teacher: tuple[int, int], student: tuple[int, int]) -> str:
    return rf"\({teacher[0]}, {teacher[1]}\).*\({student[0]}, {student[1]}\)"


def test_chance_level_is_log_of_candidates():
    """A collapsed encoder (all embeddings equal) sits exactly at the advertised chance level."""
    loss_fn = BAMLoss(4, top_k=0)
    collapsed = torch.ones(4 * 6, 8)
    torch.testing.assert_close(loss_fn(collapsed).item(), loss_fn.chance_level(6), rtol=1e-5, atol=0)
    assert math.isclose(loss_fn.chance_level(6), math.log(2 * 6 - 2))


# --- the structured mask and the public helpers ---------------------------------------------------


@pytest.mark.parametrize(
    "num_crops,batch,num_target,world,rank", [(4, 3, 2, 1, 0), (3, 2, 1, 3, 2), (5, 4, 2, 2, 1)]
)
def test_fill_positives_writes_exactly_the_positive_mask(num_crops, batch, num_target, world, rank):
    """The loss masks through a strided view; it must hit the same entries as the boolean mask."""
    matrix = torch.zeros(num_crops * batch, num_target * batch * world)
    fill_positives_(matrix, Layout(num_crops, num_target, num_target, batch, world, rank, masking=True), 1.0)
    assert torch.equal(matrix.bool(), positive_mask(num_crops, batch, num_target, world, rank))


def test_public_helpers_leave_their_inputs_alone():
    log_kernel = _similarity(3, 4, 2, seed=16) / 0.05
    before = log_kernel.clone()
    sinkhorn_distributed(log_kernel, 3)
    targets = torch.rand(2, 4, 8, generator=torch.Generator().manual_seed(17))
    targets_before = targets.clone()
    sparse = keep_top_k(targets, 3)
    assert torch.equal(log_kernel, before) and torch.equal(targets, targets_before)
    assert torch.equal((sparse > 0).sum(dim=-1), torch.full((2, 4), 3))
    torch.testing.assert_close(sparse.sum(dim=-1), torch.ones(2, 4))


def test_many_iterations_stay_finite_at_small_reg():
    """Sinkhorn's scalings would drift by rows/columns per iteration without pinning: 1000
    iterations at reg=0.01 with an outcast image must stay finite and balanced."""
    num_crops, batch, num_target = 4, 6, 2
    z = F.normalize(_adversarial(num_crops, batch, 16, "anti_correlated"), dim=1)
    mask = positive_mask(num_crops, batch, num_target)
    plan = balanced_target(z @ z[: num_target * batch].T, mask, reg=0.01, sinkhorn_iterations=1000)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(dim=1), torch.ones(len(plan)), rtol=0, atol=1e-5)
