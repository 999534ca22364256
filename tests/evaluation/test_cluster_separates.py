"""`bam cluster` finds classes that the features separate: a backbone trained here (supervised, a
few steps) on the synthetic shapes is clustered far above what random-init features reach.

Measured once with the random-init checkpoint of test_cluster.py (the same 24 validation images):
accuracy 0.375 on the raw features, 0.54 after BPA; any balanced 4-class split scores >= 0.25."""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from bam.evaluation import cluster
from bam.models.backbones import build_backbone
from eval_fixtures import CNN, synthetic_args, synthetic_data
from io_layouts import bam_checkpoint

RANDOM_INIT_BEST = 0.55  # the better of the two random-init accuracies above


def supervised_checkpoint(directory) -> str:
    """bam_cnn4 trained with a linear head to tell the 4 synthetic classes apart, saved as a bam
    pretraining checkpoint (teacher = student)."""
    torch.manual_seed(0)
    backbone = build_backbone(*CNN[:1], **CNN[1])
    data = synthetic_data(batch_size=32, train_size=128, val_size=24)
    data.setup()
    train = data.eval_dataset("train")
    images = torch.stack([train[i][0] for i in range(len(train))])
    labels = torch.tensor([train[i][1] for i in range(len(train))])
    head = torch.nn.LazyLinear(4)
    head(backbone(images[:2]))
    optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        F.cross_entropy(head(backbone(images)), labels).backward()
        optimizer.step()
    backbone.eval()
    path = directory / "supervised.ckpt"
    torch.save(bam_checkpoint(backbone, backbone, {"backbone": CNN[0], "backbone_kwargs": CNN[1]}), path)
    return str(path)


def test_clusters_of_separating_features_match_the_classes(tmp_path):
    cluster.main(["--backbone", supervised_checkpoint(tmp_path), "--accelerator", "cpu", "--output_dir",
                  str(tmp_path), "--restarts", "2", *synthetic_args(batch_size=16, train_size=32, val_size=24)])
    result = json.loads((tmp_path / "cluster_results.json").read_text())
    assert result["num_images"] == 24
    assert result["raw"]["accuracy"] >= 0.9 > RANDOM_INIT_BEST, result
    assert result["raw"]["nmi"] >= 0.7, result
