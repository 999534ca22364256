"""Checkpoint dictionaries in the authors' released layout and in bam's Lightning layout, built from
randomly initialised models, for the checkpoint I/O tests."""
from __future__ import annotations

import argparse
import pathlib

import numpy as np
import torch
from torch import nn

# where the backbone sits in the authors' files: (student prefix, teacher prefix)
RELEASED_PREFIXES = {
    "plain": ("student.module.backbone.", "teacher.backbone."),
    "compiled_encoder": ("student.module._orig_mod.backbone.", "teacher._orig_mod.backbone."),
    "compiled_backbone": ("student.module.backbone._orig_mod.", "teacher.backbone._orig_mod."),
    "compiled_outside_ddp": ("student._orig_mod.module.backbone.", "teacher._orig_mod.backbone."),
}


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}


def randomise_buffers(model: nn.Module) -> nn.Module:
    """Give batch-norm statistics non-default values, so that a test notices if they are lost."""
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(0.1 * torch.randn(buffer.shape))
        elif name.endswith("running_var"):
            buffer.copy_(0.5 + torch.rand(buffer.shape))
    return model


def _projector_state(in_dim: int) -> dict[str, torch.Tensor]:
    return nn.Sequential(nn.Linear(in_dim, 16), nn.GELU(), nn.Linear(16, 8)).state_dict()


def _optimizer_state(params: list[nn.Parameter]) -> dict:
    optimizer = torch.optim.AdamW(params)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    return optimizer.state_dict()


def released_args(arch: str, patch_size: int = 16) -> argparse.Namespace:
    # the kinds of values the authors' argparse options hold, numpy and Path included
    return argparse.Namespace(
        arch=arch, patch_size=patch_size, out_dim=8, momentum_teacher=0.995, use_fp16=True,
        global_crops_scale=(0.25, 1.0), local_crops_number=6, lr=np.float64(3e-4), epochs=np.int64(400),
        output_dir=pathlib.Path("/checkpoints/bam"), data_path="/datasets/imagenet/train", dist_url="env://",
    )


def released_checkpoint(
    student: nn.Module, teacher: nn.Module | None, args: argparse.Namespace | None, layout: str = "plain"
) -> dict:
    """A pretraining file as the authors write it."""
    student_prefix, teacher_prefix = RELEASED_PREFIXES[layout]
    dim = student.num_features
    model = prefixed(student.state_dict(), student_prefix)
    model.update(prefixed(_projector_state(dim), "student.module.proj_head.projector."))
    if teacher is not None:
        model.update(prefixed(teacher.state_dict(), teacher_prefix))
        model.update(prefixed(_projector_state(dim), "teacher.proj_head.projector."))
    checkpoint = {
        "model": model,
        "optimizer": _optimizer_state([nn.Parameter(torch.randn(4, 3))]),
        "epoch": 400,
        "fp16_scaler": {
            "scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
            "growth_interval": 2000, "_growth_tracker": 17,
        },
        "boxes": torch.rand(10, 4),
    }
    if args is not None:
        checkpoint["args"] = args
    return checkpoint


def bam_checkpoint(student: nn.Module, teacher: nn.Module | None, hyper_parameters: dict) -> dict:
    """A Lightning checkpoint as bam's BAMModule writes it."""
    dim = student.num_features
    state = prefixed(student.state_dict(), "student.backbone.")
    state.update(prefixed(_projector_state(dim), "student.projector."))
    if teacher is not None:
        state.update(prefixed(teacher.state_dict(), "teacher.backbone."))
        state.update(prefixed(_projector_state(dim), "teacher.projector."))
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_path": "", "best_model_score": None}},
        "optimizer_states": [_optimizer_state([nn.Parameter(torch.randn(4, 3))])],
        "lr_schedulers": [{"base_lrs": [0.001], "last_epoch": 120, "lr_lambdas": [None]}],
        "hparams_name": "kwargs",
        "hyper_parameters": hyper_parameters,
    }
