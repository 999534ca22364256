"""BAMLoss against a plain reference written straight from docs/objective.md.

The reference below favours being obviously right over being fast: float64, exp-domain Sinkhorn
exactly as step 5 words it, masked entries *removed* (boolean indexing, never -inf), top-k by
explicit per-image selection, and a Python loop over (target view, source view) pairs for step 7.
It shares no code with `bam.losses`, so an error in the implementation's shortcuts (log-domain
Sinkhorn, the pair-sum identity, mask fills) shows up as a disagreement.
"""
from __future__ import annotations

import pytest
import torch

from bam.losses import BAMLoss


def reference_target(sim: torch.Tensor, keep: torch.Tensor, reg: float, n_iter: int) -> torch.Tensor:
    """Step 5 literally: exp of the kept entries (masked ones are absent, i.e. zero), balanced."""
    logits = sim / reg
    logits = logits - logits[keep].max()  # the global maximum over kept entries
    plan = torch.where(keep, logits.exp(), torch.zeros_like(logits))
    plan = plan / plan.sum()
    for _ in range(n_iter):
        plan = plan / plan.sum(dim=0, keepdim=True)  # every column over all rows
        plan = plan / plan.sum(dim=1, keepdim=True)  # every row
    return plan / plan.sum(dim=1, keepdim=True)


def reference_top_k(targets: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Per image: keep the k columns largest in the average of the G targets, renormalise."""
    num_columns = targets[0].shape[1]
    if k <= 0 or k >= num_columns:
        return targets
    average = sum(targets) / len(targets)
    out = [t.clone() for t in targets]
    for b in range(average.shape[0]):
        drop = torch.ones(num_columns, dtype=torch.bool)
        drop[average[b].topk(k).indices] = False
        for t in out:
            t[b, drop] = 0.0
            t[b] = t[b] / t[b].sum()
    return out


def reference_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    *,
    num_crops: int,
    num_global_crops: int,
    num_target_crops: int,
    reg: float,
    temperature: float,
    sinkhorn_iterations: int,
    top_k: int,
    positive_masking: bool,
    balance_local_rows: bool = True,
) -> torch.Tensor:
    """The whole objective on one process, in float64, from the spec's steps 1-7 (without
    `balance_local_rows`, step 5 balances the global crops' rows alone)."""
    batch = student.shape[0] // num_crops
    z = torch.nn.functional.normalize(student.double(), dim=1)
    z_t = z if teacher is None else torch.nn.functional.normalize(teacher.double(), dim=1).detach()
    keys = z_t[: num_target_crops * batch]  # W = 1: crop-major target columns
    source_sim = z @ keys.T
    target_sim = (z_t @ keys.T).detach()  # a teacher of the global crops alone gives their rows only
    rows, cols = source_sim.shape
    image_of_row = torch.arange(rows) % batch
    image_of_col = torch.arange(cols) % batch
    keep = torch.ones(rows, cols, dtype=torch.bool)
    if positive_masking:
        keep = image_of_row[:, None] != image_of_col[None, :]
    balanced = rows if balance_local_rows else num_global_crops * batch
    plan = reference_target(target_sim[:balanced], keep[:balanced], reg, sinkhorn_iterations)
    targets = [plan[t * batch : (t + 1) * batch] for t in range(num_global_crops)]
    targets = reference_top_k(targets, top_k)

    def cross_entropy(t: int, v: int, b: int) -> torch.Tensor:
        row = v * batch + b
        kept = keep[row]
        log_q = torch.log_softmax(source_sim[row, kept] / temperature, dim=0)
        return -(targets[t][b, kept] * log_q).sum()

    pair_losses = []
    for t in range(num_global_crops):
        others = [v for v in range(num_crops) if v != t] or [t]  # V = 1 keeps the pair v = t
        for v in others:
            pair_losses.append(torch.stack([cross_entropy(t, v, b) for b in range(batch)]).mean())
    return torch.stack(pair_losses).mean()


# (num_global_crops, num_local_crops, num_target_crops)
CROPS = [(2, 0, 2), (2, 6, 2), (2, 6, 1), (3, 2, 2), (1, 0, 1)]


def _embeddings(rows: int, dim: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=generator, dtype=dtype)


def _compare(
    crops: tuple[int, int, int],
    with_teacher: bool,
    top_k: int,
    masking: bool,
    dtype: torch.dtype,
    batch: int = 5,
    reg: float = 0.05,
    temperature: float = 0.1,
    iterations: int = 3,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and student gradient from BAMLoss and from the reference, on the same inputs."""
    global_crops, local_crops, target_crops = crops
    num_crops = global_crops + local_crops
    student = _embeddings(num_crops * batch, 16, seed, dtype).requires_grad_()
    teacher = None
    if with_teacher:
        # A perturbed student: close enough to be realistic, different enough to matter.
        teacher = student.detach() + 0.5 * _embeddings(num_crops * batch, 16, seed + 1, dtype)
    kwargs = dict(
        num_crops=num_crops,
        num_global_crops=global_crops,
        num_target_crops=target_crops,
        reg=reg,
        temperature=temperature,
        sinkhorn_iterations=iterations,
        top_k=top_k,
        positive_masking=masking,
    )
    loss = BAMLoss(**kwargs)(student, teacher)
    (grad,) = torch.autograd.grad(loss, student)
    ref_student = student.detach().double().requires_grad_()
    ref_loss = reference_loss(ref_student, teacher, **kwargs)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_student)
    return loss, grad, ref_loss, ref_grad


@pytest.mark.parametrize("crops", CROPS, ids=lambda c: f"G{c[0]}L{c[1]}T{c[2]}")
@pytest.mark.parametrize("with_teacher", [False, True], ids=["no_teacher", "teacher"])
@pytest.mark.parametrize("top_k", [0, 3, 1000], ids=["topk_off", "topk3", "topk_ge_N"])
@pytest.mark.parametrize("masking", [True, False], ids=["mask", "no_mask"])
def test_matches_reference_float32(crops, with_teacher, top_k, masking):
    """The float32 implementation agrees with the float64 reference, values and gradients."""
    loss, grad, ref_loss, ref_grad = _compare(crops, with_teacher, top_k, masking, torch.float32)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("crops", CROPS, ids=lambda c: f"G{c[0]}L{c[1]}T{c[2]}")
@pytest.mark.parametrize("with_teacher", [False, True], ids=["no_teacher", "teacher"])
@pytest.mark.parametrize("top_k", [0, 3], ids=["topk_off", "topk3"])
def test_matches_reference_float64(crops, with_teacher, top_k):
    """In float64 the agreement is to rounding error, so even small slips in the math would show."""
    loss, grad, ref_loss, ref_grad = _compare(crops, with_teacher, top_k, True, torch.float64)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    "reg,temperature,iterations", [(0.05, 0.1, 0), (0.05, 0.1, 1), (0.1, 0.2, 10), (0.02, 0.07, 3)]
)
def test_matches_reference_other_hyperparameters(reg, temperature, iterations):
    """Iterations 0 and 1 pin down the order of the steps (columns first, final row normalisation)."""
    loss, grad, ref_loss, ref_grad = _compare(
        (2, 6, 2), True, 3, True, torch.float64, reg=reg, temperature=temperature, iterations=iterations
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)


def test_reference_is_sensitive_to_step_order():
    """Guard for the reference itself: swapping row/column order changes the loss, so the
    comparisons above can tell the two apart."""
    sim = torch.nn.functional.normalize(_embeddings(20, 16, 3, torch.float64), dim=1)
    sim = sim @ sim[:10].T
    keep = torch.ones_like(sim, dtype=torch.bool)
    columns_first = reference_target(sim, keep, 0.05, 3)
    rows_first = reference_target(sim.T.contiguous(), keep.T.contiguous(), 0.05, 3).T
    rows_first = rows_first / rows_first.sum(dim=1, keepdim=True)
    assert (columns_first - rows_first).abs().max() > 1e-4


@pytest.mark.parametrize("crops", [(2, 6, 2), (2, 0, 1)], ids=["G2L6T2", "G2L0T1"])
def test_teacher_receives_no_gradient(crops):
    """Even a teacher tensor that requires grad (someone forgot `torch.no_grad`) gets none."""
    global_crops, local_crops, target_crops = crops
    num_crops = global_crops + local_crops
    student = _embeddings(num_crops * 4, 8, 0, torch.float32).requires_grad_()
    teacher = _embeddings(num_crops * 4, 8, 1, torch.float32).requires_grad_()
    loss = BAMLoss(num_crops, global_crops, num_target_crops=target_crops, top_k=5)(student, teacher)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("crops", [(2, 6, 2), (2, 4, 1), (2, 0, 2)], ids=lambda c: f"G{c[0]}L{c[1]}T{c[2]}")
@pytest.mark.parametrize("with_teacher", [False, True], ids=["no_teacher", "teacher"])
@pytest.mark.parametrize("top_k", [0, 3], ids=["topk_off", "topk3"])
def test_balancing_the_global_rows_alone_matches_the_reference(crops, with_teacher, top_k):
    """`balance_local_rows=False`: the teacher embeds the global crops only and step 5 balances
    their rows alone; the sources of every crop are unchanged."""
    global_crops, local_crops, target_crops = crops
    num_crops, batch = global_crops + local_crops, 5
    student = _embeddings(num_crops * batch, 16, 0, torch.float64).requires_grad_()
    teacher = None
    if with_teacher:  # the global crops' rows of a perturbed student
        teacher = student.detach()[: global_crops * batch] + 0.5 * _embeddings(global_crops * batch, 16, 1, torch.float64)
    kwargs = dict(num_crops=num_crops, num_global_crops=global_crops, num_target_crops=target_crops, reg=0.05,
                  temperature=0.1, sinkhorn_iterations=3, top_k=top_k, positive_masking=True)
    loss = BAMLoss(**kwargs, balance_local_rows=False)(student, teacher)
    (grad,) = torch.autograd.grad(loss, student)
    ref_student = student.detach().requires_grad_()
    ref_loss = reference_loss(ref_student, teacher, **kwargs, balance_local_rows=False)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_student)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)
    if local_crops:  # the local rows' balancing mattered: the paper's form is another loss
        full_teacher = None if teacher is None else torch.cat([teacher, student.detach()[global_crops * batch:]])
        assert abs(BAMLoss(**kwargs)(student, full_teacher).item() - loss.item()) > 1e-6


def test_a_teacher_of_every_crop_is_refused_when_only_global_rows_are_balanced():
    student = _embeddings(8 * 4, 8, 0, torch.float32)
    with pytest.raises(ValueError, match=r"teacher embeddings have shape \(32, 8\) but must be \(8, 8\) .*"
                                         r"the teacher must embed the global crops only \(balance_local_rows=False\)"):
        BAMLoss(8, 2, balance_local_rows=False)(student, student)
    with pytest.raises(ValueError, match="balance_local_rows=False is computed on the whole matrix only"):
        BAMLoss(8, 2, balance_local_rows=False, column_block_size=4)
