"""Batch norm synchronised over processes on GPUs (torch's SyncBatchNorm) and on CPU (gloo).

torch's `SyncBatchNorm` only runs on accelerators: its forward rejects CPU tensors once a process
group exists, and DistributedDataParallel rejects a CPU module that contains one. A batch-norm
backbone trained with DDP on CPU processes would therefore fail at its first step. On CPU the
layers become `CPUSyncBatchNorm` instead, which normalises with the statistics of all processes
through two differentiable all-reduces; on GPUs torch's own layer (and kernel) is used.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class CPUSyncBatchNorm(_BatchNorm):
    """Batch norm over the samples of every process, for CPU processes (any input rank >= 2).

    Same parameters, buffers and state-dict keys as `nn.BatchNorm*d`. The all-reduces are
    differentiable (their backward sums the gradient over processes), so each process receives
    the gradient that every process's loss sends through the shared mean and variance: after
    DDP's gradient averaging this is batch norm on the whole global batch. Without a process
    group, in eval mode, or on one process it is plain batch norm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _synchronised(self) -> bool:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.process_group or dist.group.WORLD) > 1

    def forward(self, input: Tensor) -> Tensor:
        if not self._synchronised():
            return super().forward(input)
        self._check_input_dim(input)
        group = self.process_group or dist.group.WORLD
        dims = [0, *range(2, input.dim())]
        count = input.new_tensor([input.numel() / input.shape[1]])
        total = dist_fn.all_reduce(torch.cat([input.sum(dims), count]), group=group)
        samples = total[-1]
        mean = total[:-1] / samples
        shape = [1, -1] + [1] * (input.dim() - 2)
        centred = input - mean.view(shape)
        # Two passes (mean first, then the centred squares) are as accurate as a local variance.
        variance = dist_fn.all_reduce((centred * centred).sum(dims), group=group) / samples
        self._update_running_stats(mean.detach(), variance.detach(), samples.detach())
        output = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, variance: Tensor, samples: Tensor) -> None:
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = variance * samples / (samples - 1).clamp_min(1)  # what torch's batch norm stores
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def convert_sync_batchnorm(
    module: nn.Module, device_type: str, process_group: dist.ProcessGroup | None = None
) -> nn.Module:
    """Synchronise every batch-norm layer of `module` over processes, for modules that will run
    on `device_type` ("cpu": `CPUSyncBatchNorm`, else torch's `SyncBatchNorm`)."""
    if device_type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _convert_cpu(module, process_group)


def _convert_cpu(module: nn.Module, process_group: dist.ProcessGroup | None) -> nn.Module:
    """Swap batch-norm layers for `CPUSyncBatchNorm`, keeping their parameter and buffer tensors
    (so optimisers and EMA copies built later refer to the same tensors)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        converted = CPUSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, process_group
        )
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child, process_group))
    return module
