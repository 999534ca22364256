"""Issue 26, item 5: a new run starts from released weights (`--model.init_args.init_weights`): a
bam export, a timm state dict or a checkpoint, weights-only and strictly, with a new optimiser at
step 0, unlike `--ckpt_path` which resumes."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from bam.io import export_backbone
from bam.io.initial_weights import initial_backbone_state
from bam.methods import BAMModule
from bam.models import build_backbone
from eval_fixtures import write_checkpoint
from safety_runs import pretrain

FROZEN_STEP = ["--model.lr=0", "--model.min_lr=0", "--model.weight_decay=0", "--model.weight_decay_final=0"]
TINY_CNN = {"backbone": "bam_cnn4", "backbone_kwargs": {"width": 8}, "projector": {"hidden_dim": 16, "out_dim": 8}}


def backbone_parameters(checkpoint: dict, encoder: str) -> dict[str, torch.Tensor]:
    """The trained parameters (not the batch norm running statistics) of an encoder's backbone."""
    prefix = f"{encoder}.backbone."
    return {key[len(prefix):]: value for key, value in checkpoint["state_dict"].items()
            if key.startswith(prefix) and "running_" not in key and "num_batches" not in key}


@pytest.mark.process
def test_bam_pretrain_starts_a_new_run_from_an_export(tmp_path):
    """The export is made in process from a checkpoint of seeded random weights (none a fresh run
    starts from); `bam export` of a checkpoint that `bam pretrain` wrote is tested by
    tests/methods/test_method_demo_runs.py."""
    checkpoint = write_checkpoint(tmp_path, "bam_cnn4", {}, seed=7)
    export = export_backbone(checkpoint, tmp_path / "export")

    # one optimiser step at lr 0: the new run's weights are still exactly the ones it started from
    status, out, err = pretrain(tmp_path / "second", f"--model.init_args.init_weights={export}",
                                "--trainer.max_steps=1", *FROZEN_STEP)
    assert status == 0, err[-3000:]
    assert f"bam: backbone bam_cnn4 initialised from {export} (" in out + err
    started = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=True)
    assert started["global_step"] == 1  # a new run from step 0 with its own optimiser
    expected = {key: value for key, value in load_file(str(export / "model.safetensors")).items()
                if "running_" not in key and "num_batches" not in key}
    loaded = backbone_parameters(started, "student")  # the tiny run has no teacher (the in-process tests do)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


@pytest.mark.process
def test_weights_of_another_architecture_are_refused_naming_the_keys(tmp_path):
    other = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(8, 3, 7, 7)}, str(other))
    status, _, err = pretrain(tmp_path / "run", f"--model.init_args.init_weights={other}", "--trainer.max_steps=1")
    assert status == 1
    lines = err.strip().splitlines()
    message = lines[next(i for i, line in enumerate(lines) if line.startswith("bam pretrain: ")):]
    assert message[0] == (f"bam pretrain: init_weights {str(other)!r}: the checkpoint's backbone weights do not fit "
                          "architecture 'bam_cnn4':")
    assert message[1].startswith("  ") and "missing (in the model, not in the file)" in message[1]
    assert message[2] == "  1 unexpected (in the file, not in the model): conv1.weight"
    assert "Traceback" not in err and not (tmp_path / "run" / "checkpoints").exists()


# -- the formats, in process -------------------------------------------------------------------
def _trained_cnn() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_backbone("bam_cnn4", width=8)


@pytest.mark.parametrize("layout", ["safetensors", "pth", "pth-ddp", "pth-state_dict", "bam-checkpoint", "released"])
def test_every_format_initialises_the_student_and_teacher(tmp_path, layout):
    source = _trained_cnn().state_dict()
    path = tmp_path / ("weights.safetensors" if layout == "safetensors" else "weights.pth")
    wrapped = {
        "pth": source,
        "pth-ddp": {f"module.{key}": value for key, value in source.items()},
        "pth-state_dict": {"state_dict": source, "epoch": 3, "arch": "bam_cnn4"},
        "bam-checkpoint": {"state_dict": {f"teacher.backbone.{key}": value for key, value in source.items()},
                           "hyper_parameters": {"backbone": "bam_cnn4"}},
        "released": {"model": {f"student.module.backbone.{key}": value for key, value in source.items()},
                     "args": {"arch": "something"}},
    }
    if layout == "safetensors":
        save_file(source, str(path))
    else:
        torch.save(wrapped[layout], path)
    model = BAMModule(**TINY_CNN, momentum_teacher=True, init_weights=str(path))
    for encoder in (model.student, model.teacher):
        state = encoder.backbone.state_dict()
        assert all(torch.equal(state[key], source[key]) for key in source)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="init_weights file not found: '.*nothing.pth'"):
        initial_backbone_state(tmp_path / "nothing.pth")
