"""BPA feature transform: the official computation by default (checked against a reference written
from the official equations), bam's earlier symmetric variant as an option; balanced,
permutation-equivariant, differentiable, validated."""
from __future__ import annotations

import pytest
import torch

from bam.transforms import BPA, bpa


def _features(n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _official_reference(x: torch.Tensor, reg: float, iterations: int, max_scale: bool = True) -> torch.Tensor:
    """The official BPA, from its equations (float64, log domain): cost 1 - cos with the diagonal
    at 1000; from v = 0, each iteration sets log u = -logsumexp_j(-C/reg + log v), then
    log v = -logsumexp_i(log u - C/reg); plan = exp(log u + -C/reg + log v); divided by its
    maximum when max_scale; diagonal set to 1."""
    unit = x.double() / x.double().norm(dim=1, keepdim=True)
    cost = 1.0 - unit @ unit.T
    cost.fill_diagonal_(1000.0)
    log_kernel = -cost / reg
    log_v = torch.zeros(len(x), dtype=torch.float64)
    for _ in range(iterations):
        log_u = -torch.logsumexp(log_kernel + log_v[None, :], dim=1)
        log_v = -torch.logsumexp(log_u[:, None] + log_kernel, dim=0)
    plan = torch.exp(log_u[:, None] + log_kernel + log_v[None, :])
    if max_scale:
        plan = plan / plan.max()
    return plan.fill_diagonal_(1.0)


@pytest.mark.parametrize("n, reg, iterations", [(40, 0.1, 10), (25, 0.05, 3), (12, 0.5, 1)])
def test_default_is_the_official_transform(n, reg, iterations):
    x = _features(n, 16, seed=n, dtype=torch.float64)
    expected = _official_reference(x, reg, iterations)
    torch.testing.assert_close(bpa(x, reg, iterations), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(BPA(reg, iterations)(x.float()), expected.float(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(expected, expected.T)  # not symmetrised: the plan ends on columns
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    assert expected[off_diagonal].max() == 1.0  # max-scaled: the strongest pair reaches the self-affinity


def test_earlier_variant_is_symmetric_and_unscaled():
    x = _features(30, 16, seed=8, dtype=torch.float64)
    earlier = bpa(x, 0.1, 10, max_scale=False, symmetrize=True)
    plan = _official_reference(x, 0.1, 10, max_scale=False).fill_diagonal_(0.0)
    expected = ((plan + plan.T) / 2).fill_diagonal_(1.0)
    torch.testing.assert_close(earlier, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(earlier, earlier.T, rtol=0, atol=0)


def test_self_entry_share_of_a_normalised_row():
    # why the official scaling matters: unscaled, every off-diagonal entry is ~1/n and the self
    # affinity of 1 is nearly the whole L2-normalised row; scaled, the neighbours keep a share
    x = _features(100, 16, seed=9)
    def self_share(out):
        rows = torch.nn.functional.normalize(out, dim=1)
        return rows.diagonal().square().mean().item()
    unscaled, scaled = self_share(bpa(x, max_scale=False, symmetrize=True)), self_share(bpa(x))
    assert unscaled > 0.85 and scaled < unscaled - 0.1


@pytest.mark.parametrize("n, iterations, atol", [(40, 10, 2e-3), (8, 200, 1e-5)])
def test_balanced_plan_is_doubly_stochastic(n, iterations, atol):
    plan = bpa(_features(n, 16, seed=1), iterations=iterations, self_affinity=None, max_scale=False)
    torch.testing.assert_close(plan.sum(dim=0), torch.ones(n), rtol=0, atol=1e-5)  # ends on columns: exact
    torch.testing.assert_close(plan.sum(dim=1), torch.ones(n), rtol=0, atol=atol)
    assert torch.all(plan.diagonal() == 0) and torch.all(plan >= 0)
    # the default output is the same plan, max-scaled, with the paper's self-affinity of 1 on the diagonal
    with_diagonal = bpa(_features(n, 16, seed=1), iterations=iterations)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    torch.testing.assert_close(with_diagonal[off_diagonal], plan[off_diagonal] / plan.max(), rtol=1e-6, atol=0)
    torch.testing.assert_close(with_diagonal.diagonal(), torch.ones(n), rtol=0, atol=0)


def test_permuting_the_set_permutes_rows_and_columns():
    x = _features(30, 8, seed=2, dtype=torch.float64)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(bpa(x[perm]), bpa(x)[perm][:, perm], rtol=1e-10, atol=1e-12)


def test_scale_invariant_and_affinities_follow_similarity():
    x = _features(20, 8, seed=4)
    torch.testing.assert_close(bpa(3.0 * x), bpa(x), rtol=1e-5, atol=1e-6)
    # two near-duplicates are each other's strongest affinity
    x[1] = x[0] + 1e-3 * x[1]
    plan = bpa(x, self_affinity=None)
    assert plan[0].argmax() == 1 and plan[1].argmax() == 0


def test_gradcheck_float64():
    x = _features(6, 4, seed=5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda f: bpa(f, reg=0.5, iterations=5), (x,), eps=1e-6, atol=1e-7)


def test_gradient_reaches_features_through_the_layer():
    x = _features(12, 6, seed=6).requires_grad_()
    layer = BPA(reg=0.1, iterations=10)
    assert not list(layer.parameters())
    (layer(x) @ torch.randn(12, 3)).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_half_precision_input():
    x = _features(16, 8, seed=7)
    out = bpa(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), bpa(x), rtol=0, atol=2e-2)


@pytest.mark.parametrize(
    "features, match",
    [
        (torch.randn(8), r"2-D \(items, dims\).*shape \(8,\)"),
        (torch.randn(2, 8, 4), r"2-D.*shape \(2, 8, 4\).*once per set"),
        (torch.randn(1, 4), r"at least 2 items.*got 1"),
        (torch.ones(3, 4, dtype=torch.long), r"floating-point"),
    ],
    ids=["1d", "3d", "one_item", "integer"],
)
def test_bad_input_is_explained(features, match):
    with pytest.raises(ValueError, match=match):
        bpa(features)


def test_bad_settings_are_explained():
    with pytest.raises(ValueError, match="reg must be positive"):
        bpa(torch.randn(4, 2), reg=0)
    with pytest.raises(ValueError, match="iterations must be non-negative"):
        BPA(iterations=-1)(torch.randn(4, 2))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'rag'.*'reg'"):
        BPA(rag=0.1)  # the layer takes bpa's own settings, checked when it is built


def test_layer_takes_the_functions_settings_positionally_or_by_name():
    x = _features(8, 4, seed=9)
    torch.testing.assert_close(BPA(0.2, 5)(x), bpa(x, reg=0.2, iterations=5))
    torch.testing.assert_close(BPA(symmetrize=True, max_scale=False)(x), bpa(x, symmetrize=True, max_scale=False))
