"""Collective helpers for the objective: pure torch, no-ops without a process group.

Every function here degrades to the identity when `torch.distributed` is not initialised, so
the objective runs unchanged on a laptop, in a notebook or inside any trainer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group exists and has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def leave_process_group() -> None:
    """Wait for every process, then leave the default process group (if one was joined). Called on
    every rank at the end of a stage: a process whose gloo group the interpreter tears down at exit
    while a peer is still finishing (rank 0 printing the k-NN table, writing results) can abort in
    gloo's threads ("terminate called without an active exception", exit -6)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _GatherWithGradient(torch.autograd.Function):
    """All-gather whose backward returns, to each process, the sum over every process of the
    gradient that process's loss sends to this process's rows.

    The sum (not an average, not only the local term) is what makes DDP's gradient averaging
    reproduce single-process training on the global batch.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.batch = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank()]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Stack `tensor` from every process into shape `(W, *tensor.shape)`, differentiably."""
    if not is_distributed():
        return tensor.unsqueeze(0)
    return _GatherWithGradient.apply(tensor)


@torch.no_grad()
def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Stack `tensor` from every process into shape `(W, *tensor.shape)`, without gradient."""
    if not is_distributed():
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (`op` is "sum" or "max"); returns `tensor` for chaining."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


@torch.no_grad()
def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate the rows of `tensor` from every process (row counts may differ); every
    returned row was really written by some process (no padding rows survive)."""
    if not is_distributed():
        return tensor
    counts = gather(torch.tensor([tensor.shape[0]], device=tensor.device)).flatten().tolist()
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = gather(padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])
