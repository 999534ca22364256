"""`bam knn`: weighted k-NN classification with a frozen backbone (the authors' protocol).

The bank is a class-balanced `bank_fraction` of the training split, the queries are the held-out
split, both with the evaluation transform; features are L2-normalised (ViTs: class token after the
final norm), each of the `k = 20` nearest bank images votes for its class with weight
`exp(similarity / 0.07)`; top-1 and top-5 accuracy are reported.

Under `torchrun` every process embeds its own shard of the bank (no padding, no duplicates) and
the shards are gathered batch by batch onto the CPU, so the device holds at most one batch per
process and the bank lives in host memory; each process then classifies its own shard of the
queries, streaming the bank through the device `bank_chunk_rows` rows at a time, and the
accuracies are summed over processes. The result equals a single-process run.

`bpa=True` re-describes the features with the BPA transform (`bam.transforms.bpa`) before the
vote. BPA is a set transform: an item's new feature is its balanced affinity to every member of
its set, so queries and bank must be transformed in one set to be comparable. As in the paper's
transductive few-shot episodes (support and queries transformed together), each query batch is
transformed together with the whole bank: the set is `bank + batch`, so a query sees the bank
and the other queries of its batch, never those of other batches, and the result depends on the
batch size (and, under `torchrun`, on the sharding). The set's `(N + B)^2` affinities must fit
on the device (`BPA_MAX_SET` items at most); `bank_fraction` shrinks the bank.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from jsonargparse import CLI
from torch import Tensor

from bam.data.file_account import SKIPPED_LOG, settle_accounts
from bam.ops.distributed import all_reduce_, rank
from bam.evaluation.classifier import accuracy_metrics
from bam.evaluation.data import ClassificationDataModule, LabelSetError
from bam.evaluation.frozen import frozen_extractor, init_distributed, select_device
from bam.features.extract import (
    NonFiniteFeaturesError,
    embed_dataset,
    progress_bar,
    require_finite,
    shard_batches,
    shard_indices,
)
from bam.shipped_configs import with_config_names
from bam.training.run_cli import one_line_errors
from bam.transforms import bpa as bpa_transform

RESULTS_FILE = "knn_results.json"
BPA_MAX_SET = 32768  # bank + query batch: a (N + B)^2 float32 matrix of 4 GiB, a few copies at once


@torch.no_grad()
def knn_scores_streamed(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_rows: int = 65536,
) -> Tensor:
    """`(Q, num_classes)` weighted votes of the `k` nearest rows of an L2-normalised `bank`.

    Same votes as `bam.evaluation.knn_class_scores`, but the bank may stay on the CPU: it goes to
    the query's device `chunk_rows` rows at a time and a running top-k is merged across chunks.
    """
    query = F.normalize(query.float(), dim=1)
    best_similarity = query.new_empty(len(query), 0)
    best_labels = bank_labels.new_empty(len(query), 0, device=query.device)
    for start in range(0, len(bank), chunk_rows):
        chunk = bank[start : start + chunk_rows].to(query.device, non_blocking=True)
        similarity, index = (query @ chunk.T).topk(min(k, len(chunk)), dim=1)
        labels = bank_labels[start : start + chunk_rows].to(query.device)[index]
        merged_similarity = torch.cat([best_similarity, similarity], dim=1)
        merged_labels = torch.cat([best_labels, labels], dim=1)
        best_similarity, keep = merged_similarity.topk(min(k, merged_similarity.shape[1]), dim=1)
        best_labels = merged_labels.gather(1, keep)
    votes = query.new_zeros(len(query), num_classes)
    return votes.scatter_add_(1, best_labels, (best_similarity / temperature).exp())


def run_knn(
    backbone: str,
    data: ClassificationDataModule,
    which: Optional[str] = None,
    arch: Optional[str] = None,
    feature: str = "auto",
    k: int = 20,
    temperature: float = 0.07,
    bank_fraction: float = 1.0,
    bank_chunk_rows: int = 65536,
    accelerator: str = "auto",
    output_dir: str = "runs/knn",
    bpa: bool = False,
    bpa_reg: float = 0.1,
    bpa_iterations: int = 10,
) -> dict[str, Any]:
    """Weighted k-NN accuracy of a frozen backbone; printed and written to `output_dir/knn_results.json`.

    Args:
        backbone: Export directory or file, bam pretraining checkpoint, the authors' released
            file, or a timm model name (random initialisation, a baseline).
        data: The labelled data: bank = training split, queries = held-out split.
        which: Encoder of a checkpoint ("teacher" or "student"; default: the teacher).
        arch: Architecture of a checkpoint, instead of the one it records.
        feature: Feature recipe (`bam.features.extract`); `auto`: ViT class token, else pooled.
        k: Number of neighbours that vote.
        temperature: Votes are weighted by `exp(similarity / temperature)`.
        bank_fraction: Class-balanced fraction of the training split used as the bank.
        bank_chunk_rows: Bank rows on the device at a time when scoring.
        accelerator: "auto" (CUDA when available), "cpu" or "cuda".
        output_dir: Where the JSON result is written (by process 0).
        bpa: Transform each query batch together with the bank by BPA before the vote (see above).
        bpa_reg: BPA's entropic regularisation.
        bpa_iterations: BPA's Sinkhorn iterations.

    Unreadable files are left out of the bank and the queries (not replaced); `files` in the
    result counts what was found, read and skipped (the paths in `output_dir/skipped_files.tsv`).

    Returns:
        `top1` and `top5` (percent), the bank and query sizes, the file account and the settings used.
    """
    device = select_device(accelerator)
    init_distributed(device)
    data.require_classes("k-NN accuracy")
    num_classes = data.num_classes  # the label sets are checked before anything is embedded
    extractor = frozen_extractor(backbone, which, arch, feature, data).to(device)
    bank, bank_labels = embed_dataset(
        data.eval_dataset("train", bank_fraction), extractor, device, data.batch_size, data.num_workers,
        progress="k-NN: embedding the bank",
    )
    bank = F.normalize(require_finite(bank, "train"), dim=1)
    metrics = accuracy_metrics(num_classes).to(device)  # torchmetrics sums over processes on compute
    queries = data.eval_dataset("val")
    num_queries = torch.zeros((), dtype=torch.long, device=device)
    batches = shard_batches(queries, extractor, device, data.batch_size, data.num_workers)
    total = math.ceil(len(shard_indices(len(queries))) / data.batch_size)
    for features, labels, _ in progress_bar(batches, "k-NN: classifying the queries", total):
        require_finite(features, "val")
        voters = bank
        if bpa:
            features, voters = bpa_with_bank(features, bank, bpa_reg, bpa_iterations)
        scores = knn_scores_streamed(features, voters, bank_labels, num_classes, k, temperature, bank_chunk_rows)
        metrics.update(scores, labels.to(device))
        num_queries += len(labels)
    accuracy = {name: round(100.0 * value.item(), 4) for name, value in metrics.compute().items()}
    files = settle_accounts(data.file_accounts(), Path(output_dir) / SKIPPED_LOG, device)
    result = {
        **accuracy, "k": k, "temperature": temperature, "bank_size": len(bank),
        "num_queries": int(all_reduce_(num_queries)), "files": files,
        "backbone": backbone, "feature": extractor.recipe,
        "bpa": {"reg": bpa_reg, "iterations": bpa_iterations} if bpa else None,
    }
    _report(result, Path(output_dir))
    return result


@torch.no_grad()
def bpa_with_bank(query: Tensor, bank: Tensor, reg: float = 0.1, iterations: int = 10) -> tuple[Tensor, Tensor]:
    """BPA features of a query batch and of the bank, transformed as one set `bank + query`
    (on the query's device); the bank's rows come back L2-normalised, as `knn_scores_streamed`
    expects its bank."""
    size = len(bank) + len(query)
    if size > BPA_MAX_SET:
        raise ValueError(
            f"BPA transforms the bank and a query batch as one set of {size} items, more than "
            f"BPA_MAX_SET={BPA_MAX_SET} (its affinities would not fit); lower bank_fraction or the batch size"
        )
    features = bpa_transform(torch.cat([bank.to(query.device), query.float()]), reg, iterations)
    return features[len(bank) :], F.normalize(features[: len(bank)], dim=1)


def _report(result: dict[str, Any], output_dir: Path) -> None:
    if rank() != 0:
        return
    transform = " + BPA" if result["bpa"] else ""
    print(
        f"k-NN (k={result['k']}, T={result['temperature']}, {result['feature']} features{transform}): "
        f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
        f"({result['num_queries']} queries, bank of {result['bank_size']})"
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RESULTS_FILE).write_text(json.dumps(result, indent=2))


def main(argv: list[str]) -> None:
    """`bam knn --backbone PATH --data CLASS [--config FILE] [--print_config] [overrides]`."""
    with one_line_errors("bam knn", also=(NonFiniteFeaturesError, LabelSetError)):
        CLI(run_knn, args=with_config_names("knn", argv), as_positional=False, prog="bam knn")
