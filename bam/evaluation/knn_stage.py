"""`bam knn`: weighted k-NN classification with a frozen backbone (the authors' protocol).

The bank is a class-balanced `bank_fraction` of the training split, the queries are the held-out
split, both with the evaluation transform; features are L2-normalised (ViTs: class token after the
final norm), each of the `k = 20` nearest bank images votes for its class with weight
`exp(similarity / 0.07)`; top-1 and top-5 accuracy are reported. Several `k` (DINO reports 10, 20,
100 and 200) cost one neighbour search: the nearest `max(k)` are found once and each `k` votes
with its first `k` of them.

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
on the device (`bam.transforms.bpa.BPA_MAX_SET` items at most); `bank_fraction` shrinks the bank.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from jsonargparse import CLI
from torch import Tensor

from bam.data.file_report import SKIPPED_LOG, report_files
from bam.data.sources import Subset
from bam.ops.errors import UserInputError
from bam.ops.distributed import all_reduce_
from bam.evaluation.classifier import accuracy_metrics
from bam.evaluation.data import ClassificationDataModule, LabelSetError
from bam.evaluation.frozen import (
    frozen_extractor,
    init_distributed,
    report_on_first_process,
    select_device,
    stage_arguments,
)
from bam.features.extract import (
    NonFiniteFeaturesError,
    embed_dataset,
    progress_bar,
    require_finite,
    shard_batches,
    shard_indices,
)
from bam.training.run_cli import one_line_errors
from bam.transforms import BPASettings

RESULTS_FILE = "knn_results.json"


@torch.no_grad()
def nearest_neighbours_streamed(
    query: Tensor, bank: Tensor, bank_labels: Tensor, k: int, chunk_rows: int = 65536
) -> tuple[Tensor, Tensor]:
    """Cosine similarities and labels `(Q, min(k, len(bank)))` of the `k` nearest rows of an
    L2-normalised `bank`, nearest first. The bank may stay on the CPU: it goes to the query's device
    `chunk_rows` rows at a time and a running top-k is merged across chunks."""
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
    return best_similarity, best_labels


def neighbour_votes(similarity: Tensor, labels: Tensor, num_classes: int, k: int, temperature: float) -> Tensor:
    """`(Q, num_classes)` votes of the first `k` of the nearest-first neighbours, each weighted by
    `exp(similarity / temperature)`: the votes of k-NN at any `k` up to the number found."""
    votes = similarity.new_zeros(len(similarity), num_classes)
    return votes.scatter_add_(1, labels[:, :k], (similarity[:, :k] / temperature).exp())


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
    """`(Q, num_classes)` weighted votes of the `k` nearest rows of an L2-normalised `bank`: the
    same votes as `bam.evaluation.knn_class_scores`, with the bank streamed (`nearest_neighbours_streamed`)."""
    similarity, labels = nearest_neighbours_streamed(query, bank, bank_labels, k, chunk_rows)
    return neighbour_votes(similarity, labels, num_classes, k, temperature)


def _neighbour_counts(k: int | list[int]) -> list[int]:
    """`k` as a list of distinct neighbour counts, in the order given; a bad count is named."""
    counts = [k] if isinstance(k, int) else list(k)
    if not counts or any(count < 1 for count in counts) or len(set(counts)) != len(counts):
        raise UserInputError(f"k must be one or more distinct neighbour counts of at least 1, e.g. 20 or [10, 20, 100, 200]; got {k}")
    return counts


def run_knn(
    backbone: str,
    data: ClassificationDataModule,
    encoder: Optional[str] = None,
    arch: Optional[str] = None,
    feature: str = "auto",
    k: Union[int, list[int]] = 20,
    temperature: float = 0.07,
    bank_fraction: Subset = 1.0,
    bank_chunk_rows: int = 65536,
    accelerator: str = "auto",
    output_dir: str = "runs/knn",
    bpa: BPASettings = BPASettings(enabled=False),
) -> dict[str, Any]:
    """Weighted k-NN accuracy of a frozen backbone; printed and written to `output_dir/knn_results.json`.

    Args:
        backbone: Export directory or file, bam pretraining checkpoint, the authors' released
            file, or a timm model name (random initialisation, a baseline).
        data: The labelled data: bank = training split, queries = held-out split.
        encoder: The encoder of a checkpoint to evaluate ("teacher" or "student"; default: the teacher).
        arch: Architecture of a checkpoint, instead of the one it records.
        feature: Feature readout (`bam.features.extract`); `auto`: ViT class token, else pooled.
        k: Number of neighbours that vote, or several (`--k 10 20 100 200`, as DINO's `--nb_knn`):
            the neighbours are found once, for the largest, and every count is reported; the
            first listed is the headline (`top1`, `top5` of the result).
        temperature: Votes are weighted by `exp(similarity / temperature)`.
        bank_fraction: Class-balanced fraction of the training split used as the bank, or a
            subset list file naming its images (one file name per line, SimCLR's format).
        bank_chunk_rows: Bank rows on the device at a time when scoring.
        accelerator: "auto" (CUDA when available), "cpu" or "cuda".
        output_dir: Where the JSON result is written (by process 0).
        bpa: BPA settings (`bam.transforms.BPASettings`: `enabled`, `reg`, `iterations`); with
            `enabled`, also transform each query batch together with the bank by BPA before the vote (see
            above; off by default).

    Unreadable files are left out of the bank and the queries (not replaced); `files` in the
    result counts what was found, read and skipped (the paths in `output_dir/skipped_files.tsv`).

    Returns:
        `top1` and `top5` (percent) of the first `k`, `by_k` (every `k`: its `top1` and `top5`),
        the bank and query sizes, the file report and the settings used.
    """
    counts = _neighbour_counts(k)
    device = select_device(accelerator)
    init_distributed(device)
    data.require_classes("k-NN accuracy")
    num_classes = data.num_classes  # the label sets are checked before anything is embedded
    extractor = frozen_extractor(backbone, encoder, arch, feature, data).to(device)
    bank, bank_labels = embed_dataset(
        data.eval_dataset("train", bank_fraction), extractor, device, data.batch_size, data.num_workers,
        progress="k-NN: embedding the bank",
    )
    bank = F.normalize(require_finite(bank, "train"), dim=1)
    # torchmetrics sums over processes on compute
    metrics = {count: accuracy_metrics(num_classes).to(device) for count in counts}
    queries = data.eval_dataset("val")
    num_queries = torch.zeros((), dtype=torch.long, device=device)
    batches = shard_batches(queries, extractor, device, data.batch_size, data.num_workers)
    total = math.ceil(len(shard_indices(len(queries))) / data.batch_size)
    for features, labels, _ in progress_bar(batches, "k-NN: classifying the queries", total):
        require_finite(features, "val")
        voters = bank
        if bpa.enabled:
            features, voters = bpa_with_bank(features, bank, bpa)
        similarity, neighbour_labels = nearest_neighbours_streamed(features, voters, bank_labels, max(counts), bank_chunk_rows)
        for count in counts:
            votes = neighbour_votes(similarity, neighbour_labels, num_classes, count, temperature)
            metrics[count].update(votes, labels.to(device))
        num_queries += len(labels)
    by_k = {
        str(count): {name: round(100.0 * value.item(), 4) for name, value in metrics[count].compute().items()}
        for count in counts
    }
    files = report_files(data.file_statuses(), Path(output_dir) / SKIPPED_LOG, device)
    result = {
        **by_k[str(counts[0])], "k": counts[0], "by_k": by_k, "temperature": temperature, "bank_size": len(bank),
        "num_queries": int(all_reduce_(num_queries)), "files": files,
        "backbone": backbone, "feature": extractor.readout,
        "bpa": bpa.recorded(),
    }
    _report(result, Path(output_dir))
    return result


@torch.no_grad()
def bpa_with_bank(query: Tensor, bank: Tensor, bpa: BPASettings = BPASettings()) -> tuple[Tensor, Tensor]:
    """BPA features of a query batch and of the bank, transformed as one set `bank + query`
    (on the query's device); the bank's rows come back L2-normalised, as `knn_scores_streamed`
    expects its bank."""
    features = bpa.transform(torch.cat([bank.to(query.device), query.float()]), "lower bank_fraction or the batch size")
    return features[len(bank) :], F.normalize(features[: len(bank)], dim=1)


def format_table(result: dict[str, Any]) -> str:
    """Top-1 and top-5 accuracy, one row per neighbour count."""
    transform = " + BPA" if result["bpa"] else ""
    lines = [
        f"k-NN (T={result['temperature']}, {result['feature']} features{transform}; "
        f"{result['num_queries']} queries, bank of {result['bank_size']})",
        f"{'k':>6} {'top-1':>8} {'top-5':>8}",
    ]
    lines += [f"{k:>6} {row['top1']:>7.2f}% {row['top5']:>7.2f}%" for k, row in result["by_k"].items()]
    return "\n".join(lines)


def _report(result: dict[str, Any], output_dir: Path) -> None:
    report_on_first_process(format_table(result), result, output_dir / RESULTS_FILE)


def gather_values(argv: list[str], option: str) -> list[str]:
    """`argv` with `OPTION A B C` (several values, as argparse's nargs) written `OPTION [A, B, C]`,
    the list syntax jsonargparse reads; a single value is left as it is."""
    gathered, position = [], 0
    while position < len(argv):
        gathered.append(argv[position])
        position += 1
        if gathered[-1] != option:
            continue
        values = []
        while position < len(argv) and not argv[position].startswith("--"):
            values.append(argv[position])
            position += 1
        gathered.append(f"[{', '.join(values)}]" if len(values) > 1 else " ".join(values))
    return gathered


def main(argv: list[str]) -> None:
    """`bam knn --backbone PATH --data CLASS [--k 10 20 ...] [--config FILE] [--print_config] [overrides]`."""
    with one_line_errors("bam knn", also=(NonFiniteFeaturesError, LabelSetError)):
        CLI(run_knn, args=gather_values(stage_arguments("knn", argv), "--k"), as_positional=False, prog="bam knn")
