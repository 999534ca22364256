"""k-NN accuracies (the online callback during pretraining and `bam knn` run as a user runs it)
against a weighted k-NN written here in float64 on the same features, with queries that are not the
bank, on data where voting with k=1 gives another accuracy than the k=20 these stages report."""
from __future__ import annotations

import json
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bam import BAMModule, load_backbone
from bam.callbacks import OnlineKNN
from cli_runs import run_bam
from tiny_runs import TinyCropsDataModule
from eval_fixtures import CNN, synthetic_args, synthetic_data, write_checkpoint

K, TEMPERATURE = 20, 0.07


def reference_knn(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
                  k: int = K) -> dict[int, float]:
    """Top-1/top-5 accuracy (percent): each of the k most cosine-similar bank rows votes for its
    class with weight exp(similarity / T)."""
    bank, query = F.normalize(bank.double(), dim=1), F.normalize(query.double(), dim=1)
    similarity, index = (query @ bank.T).topk(min(k, len(bank)), dim=1)
    classes = int(max(bank_labels.max(), query_labels.max())) + 1
    votes = torch.zeros(len(query), classes, dtype=torch.float64)
    votes.scatter_add_(1, bank_labels[index], (similarity / TEMPERATURE).exp())
    ranked = votes.argsort(dim=1, descending=True)
    hits = ranked == query_labels.unsqueeze(1)
    return {top: 100.0 * hits[:, :top].any(dim=1).double().mean().item() for top in (1, 5)}


class HeldOutKNNData(TinyCropsDataModule):
    """Trains like TinyCropsDataModule; its k-NN bank and queries are other images, labelled at
    random so that the number of voters changes the result."""

    def __init__(self) -> None:
        super().__init__(num_images=8, batch_size=8)
        generator = torch.Generator().manual_seed(1)
        self.bank = torch.rand(96, 3, 32, 32, generator=generator), torch.randint(0, 4, (96,), generator=generator)
        self.query = torch.rand(64, 3, 32, 32, generator=generator), torch.randint(0, 4, (64,), generator=generator)

    def knn_dataloaders(self) -> tuple[DataLoader, DataLoader]:
        return (DataLoader(TensorDataset(*self.bank), batch_size=32),
                DataLoader(TensorDataset(*self.query), batch_size=32))


def test_online_knn_votes_with_k_neighbours_on_held_out_queries(tmp_path):
    torch.manual_seed(0)
    model = BAMModule(backbone="bam_cnn4", num_local_crops=2, warmup_epochs=0, projector=dict(hidden_dim=64, out_dim=32))
    data = HeldOutKNNData()
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[OnlineKNN()])
    trainer.fit(model, data)
    model.eval()
    bank, query = model.extract_features(data.bank[0]), model.extract_features(data.query[0])
    expected = reference_knn(bank, data.bank[1], query, data.query[1])
    one_voter = reference_knn(bank, data.bank[1], query, data.query[1], k=1)
    assert expected[1] != one_voter[1], "k=1 and k=20 agree on this data: the test would not see the k used"
    logged = trainer.callback_metrics
    assert math.isclose(logged["knn/top1"].item(), expected[1], abs_tol=1e-3), (logged["knn/top1"], expected, one_voter)
    assert math.isclose(logged["knn/top5"].item(), expected[5], abs_tol=1e-3)


@pytest.mark.process
def test_bam_knn_console_script_votes_with_the_k_it_reports(tmp_path):
    """`bam knn` in a subprocess; the expected accuracy comes from the same backbone, loaded from
    the stage's own export of it, embedding the same images here."""
    checkpoint = write_checkpoint(tmp_path, *CNN)
    train_size, val_size = 96, 48
    output = tmp_path / "knn"
    result = run_bam(["knn", "--backbone", str(checkpoint), "--accelerator", "cpu", "--output_dir", str(output),
                      *synthetic_args(batch_size=16, train_size=train_size, val_size=val_size)])
    assert result.returncode == 0, result.stdout[-3000:]
    reported = json.loads((output / "knn_results.json").read_text())
    assert reported["k"] == K and reported["temperature"] == TEMPERATURE

    data = synthetic_data(batch_size=16, train_size=train_size, val_size=val_size)
    data.setup()
    bank, bank_labels = embed(checkpoint, data.eval_dataset("train"))
    query, query_labels = embed(checkpoint, data.eval_dataset("val"))
    expected = reference_knn(bank, bank_labels, query, query_labels)
    one_voter = reference_knn(bank, bank_labels, query, query_labels, k=1)
    assert expected[1] != one_voter[1], "k=1 and k=20 agree on this data: the test would not see the k used"
    assert math.isclose(reported["top1"], expected[1], abs_tol=1e-3), (reported, expected, one_voter)
    assert math.isclose(reported["top5"], expected[5], abs_tol=1e-3)


@torch.no_grad()
def embed(checkpoint, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """What the backbone returns (its pooled features) for every image of `dataset`, in order."""
    backbone = load_backbone(checkpoint)
    images, labels = zip(*(dataset[i][:2] for i in range(len(dataset))))
    return backbone(torch.stack(images)), torch.tensor(labels)
