"""`bam retrieval`: image retrieval with a frozen backbone's features, raw and BPA-transformed.

Two protocols (`protocol`):

- `within` (metric learning, as the GSP paper and "A Metric Learning Reality Check" report it):
  every image of `split` queries the rest of that split (itself left out). A query whose class
  has no other image has nothing to find and is left out of every metric (`num_skipped`).
- `query_gallery` (person re-identification, as the BPA paper reports it): the held-out split
  (`data.val_root`) are the queries, the training split (`data.root`) is the gallery. A query
  whose identity is absent from the gallery is left out. The Market-1501 protocol's removal of
  same-camera matches and of "junk" images is not applied (cameras are not read), so numbers on
  Market-1501 come out higher than the published ones.

Similarity is the cosine of the L2-normalised features; each query ranks the whole gallery by it
(ties in gallery order). With `R` the number of relevant (same-class) gallery images of a query:

- Recall@K: the query has a relevant image among its K nearest (re-id's CMC rank-K; rank-1 = R@1);
- R-precision: the fraction of relevant images among the first R;
- MAP@R: the mean, over the first R positions, of the precision at each relevant position
  (an irrelevant position adds 0), i.e. average precision cut at R;
- mAP: average precision over the whole ranking (re-id's mAP).

All are in percent, averaged over the queries. With BPA (`bam.transforms.bpa`) the evaluated
images form one set (queries and gallery together, transductive, as in the BPA paper) whose
transformed rows, L2-normalised, are ranked the same way.

Under `torchrun` every process embeds its shard of the images (`embed_dataset`), then ranks its
own shard of the queries; the per-query values are gathered in query order, so the result equals
a single-process run.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from jsonargparse import CLI
from torch import Tensor

from bam.evaluation.data import ClassificationDataModule
from bam.evaluation.frozen import SPACE_LABELS, embed_split, report_on_first_process, result_plot, spaces_in, stage_arguments
from bam.features.extract import embed_dataset, progress_bar, shard_indices
from bam.ops.distributed import gather_rows
from bam.transforms import BPASettings

RESULTS_FILE = "retrieval_results.json"
PLOT_FILE = "recall_at_k.png"
PROTOCOLS = ("within", "query_gallery")
RANK_METRICS = ("r_precision", "map_at_r", "map")  # after the Recall@K columns


class RetrievalSet(NamedTuple):
    """Queries and gallery, L2-normalised; `self_index[i]` is query `i`'s own gallery row (within
    one set) or None (separate query and gallery images)."""

    queries: Tensor
    query_labels: Tensor
    gallery: Tensor
    gallery_labels: Tensor
    self_index: Optional[Tensor]


@torch.no_grad()
def per_query_metrics(
    queries: Tensor, query_labels: Tensor, gallery: Tensor, gallery_labels: Tensor, ks: Sequence[int],
    self_index: Optional[Tensor] = None,
) -> Tensor:
    """`(Q, len(ks) + 4)` float64 rows: a 0/1 hit per K, R-precision, MAP@R and average precision
    (fractions), then `R` (the query's number of relevant gallery rows; the metrics are 0 when
    it is 0). Rows are ranked by dot product (cosine for L2-normalised rows); `self_index` names
    each query's own row, which is left out of its ranking."""
    similarity = queries.float() @ gallery.float().T
    if self_index is not None:
        # ranked last by the stable sort, then cut off: the query never retrieves itself
        similarity[torch.arange(len(queries)), self_index.to(similarity.device)] = -math.inf
    order = similarity.argsort(dim=1, descending=True, stable=True)
    if self_index is not None:
        order = order[:, :-1]
    relevant = (gallery_labels.to(order.device)[order] == query_labels.to(order.device)[:, None]).double()
    found = relevant.sum(dim=1)
    hits_so_far = relevant.cumsum(dim=1)
    positions = torch.arange(1, relevant.shape[1] + 1, device=relevant.device, dtype=torch.float64)
    precision_at_hits = hits_so_far / positions * relevant
    within_r = positions[None] <= found[:, None]
    safe = found.clamp(min=1)
    columns = [relevant[:, : min(k, relevant.shape[1])].amax(dim=1) for k in ks]
    columns += [
        hits_so_far.gather(1, (safe.long() - 1)[:, None]).squeeze(1) / safe * (found > 0),
        (precision_at_hits * within_r).sum(dim=1) / safe,
        precision_at_hits.sum(dim=1) / safe,
        found,
    ]
    return torch.stack(columns, dim=1).cpu()


def evaluate_retrieval(
    retrieval: RetrievalSet, ks: Sequence[int], chunk_rows: int = 256, progress: Optional[str] = None
) -> dict[str, float | int]:
    """Recall@K (`recall@K`), `r_precision`, `map_at_r` and `map` in percent over the queries with
    at least one relevant gallery image, and `num_queries` / `num_skipped` (those without).

    Each process ranks its own shard of the queries, `chunk_rows` at a time; the per-query rows
    are gathered in query order on every process, so every process returns the same numbers."""
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must list positive ranks, e.g. [1, 2, 4, 8]; got {list(ks)}")
    mine = torch.tensor(shard_indices(len(retrieval.queries)), dtype=torch.long)
    rows = [torch.zeros(0, len(ks) + len(RANK_METRICS) + 1, dtype=torch.float64)]
    chunks = range(0, len(mine), chunk_rows)
    for start in progress_bar(chunks, progress, len(chunks)):
        picked = mine[start : start + chunk_rows]
        device_picked = picked.to(retrieval.queries.device)
        own = None if retrieval.self_index is None else retrieval.self_index[picked]
        rows.append(per_query_metrics(
            retrieval.queries[device_picked], retrieval.query_labels[picked], retrieval.gallery,
            retrieval.gallery_labels, ks, own,
        ))
    local = torch.cat([torch.cat(rows), mine[:, None].double()], dim=1)
    device = retrieval.queries.device
    gathered = gather_rows(local.to(device)).cpu()
    ordered = gathered[gathered[:, -1].argsort()][:, :-1]
    valid = ordered[:, -1] > 0
    means = 100.0 * ordered[valid, :-1].mean(dim=0) if valid.any() else torch.zeros(ordered.shape[1] - 1)
    names = [f"recall@{k}" for k in ks] + list(RANK_METRICS)
    return {
        **{name: round(float(value), 4) for name, value in zip(names, means)},
        "num_queries": int(valid.sum()), "num_skipped": int((~valid).sum()),
    }


def bpa_retrieval_set(retrieval: RetrievalSet, bpa: BPASettings = BPASettings()) -> RetrievalSet:
    """The same queries and gallery, re-described by BPA as one set (gallery rows, then the queries
    that are not gallery rows), rows L2-normalised."""
    separate = retrieval.self_index is None
    members = torch.cat([retrieval.gallery, retrieval.queries]) if separate else retrieval.gallery
    remedy = "evaluate a class-balanced `fraction` of the queries, or set bpa.enabled: false"
    moved = F.normalize(bpa.transform(members, remedy), dim=1)
    gallery = moved[: len(retrieval.gallery)]
    queries = moved[len(retrieval.gallery) :] if separate else gallery[retrieval.self_index.to(moved.device)]
    return retrieval._replace(queries=queries, gallery=gallery)


def within_set(features: Tensor, labels: Tensor) -> RetrievalSet:
    """Every row queries the others (metric-learning protocol)."""
    unit = F.normalize(features.float(), dim=1)
    return RetrievalSet(unit, labels, unit, labels, torch.arange(len(labels)))


def query_gallery_set(queries: Tensor, query_labels: Tensor, gallery: Tensor, gallery_labels: Tensor) -> RetrievalSet:
    """Separate queries and gallery (re-identification protocol)."""
    return RetrievalSet(
        F.normalize(queries.float(), dim=1), query_labels, F.normalize(gallery.float(), dim=1), gallery_labels, None
    )


def run_retrieval(
    backbone: str,
    data: ClassificationDataModule,
    protocol: str = "within",
    ks: list[int] = [1, 2, 4, 8],  # noqa: B006 (jsonargparse reads the default from the signature)
    bpa: BPASettings = BPASettings(),
    query_chunk_rows: int = 256,
    output_dir: str = "runs/retrieval",
    **frozen: Any,
) -> dict[str, Any]:
    """Retrieval metrics (Recall@K, R-precision, MAP@R, mAP) of a frozen backbone's features, raw and after BPA.

    Printed, written to `output_dir/retrieval_results.json` and plotted (Recall@K curves) to
    `output_dir/recall_at_k.png`.

    Args:
        backbone: The evaluated backbone: an export, a checkpoint, a released file or a timm name.
        data: The labelled data. `within`: the images of `split`; `query_gallery`: queries = the
            held-out split (`val_root`), gallery = the training split (`root`).
        protocol: "within" (each image against the rest of its split) or "query_gallery".
        ks: The K of Recall@K (re-id: the CMC ranks, e.g. [1, 5, 10]).
        bpa: BPA settings (`bam.transforms.BPASettings`: `enabled`, `reg`, `iterations`); with
            `enabled`, also rank on the BPA transform of the evaluated images (one set).
        query_chunk_rows: Queries ranked at a time (each ranks the whole gallery: memory grows
            with `query_chunk_rows * gallery size`).
        output_dir: Where the JSON result and the plot are written (by process 0).
        **frozen: encoder, arch, feature, split, fraction, accelerator: see `embed_split`
            (`query_gallery` takes the queries from the held-out split: leave `split` at "val").

    Returns:
        `raw` (and `bpa`): `recall@K` per K, `r_precision`, `map_at_r`, `map` (percent),
        `num_queries`, `num_skipped`; the gallery size and the settings used.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    if protocol == "query_gallery" and frozen.get("split", "val") != "val":
        raise ValueError("protocol query_gallery takes the queries from the held-out split: leave split at 'val'")
    features, labels, extractor, device, split = embed_split(backbone, data, "retrieval", **frozen)
    if protocol == "within":
        retrieval = within_set(features.to(device), labels)
    else:
        gallery, gallery_labels = embed_dataset(
            data.eval_dataset("train"), extractor, device, data.batch_size, data.num_workers,
            progress="retrieval: embedding the gallery (train split)",
        )
        retrieval = query_gallery_set(features.to(device), labels, gallery.to(device), gallery_labels)
    spaces = {"raw": retrieval}
    if bpa.enabled:
        spaces["bpa"] = bpa_retrieval_set(retrieval, bpa)
    scores = {
        name: evaluate_retrieval(space, ks, query_chunk_rows, progress=f"retrieval: ranking ({name})")
        for name, space in spaces.items()
    }
    result = {
        **scores, "protocol": protocol, "split": split, "gallery_size": len(retrieval.gallery_labels),
        "ks": list(ks), "backbone": backbone, "feature": extractor.readout,
        "bpa_settings": bpa.recorded(),
    }
    _report(result, Path(output_dir))
    return result


def format_table(result: dict[str, Any]) -> str:
    """One row per feature space: Recall@K per K, R-precision, MAP@R and mAP (percent)."""
    spaces = spaces_in(result)
    first = result[spaces[0]]
    against = "the rest of the split" if result["protocol"] == "within" else f"a gallery of {result['gallery_size']}"
    headers = [f"R@{k}" for k in result["ks"]] + ["R-prec", "MAP@R", "mAP"]
    keys = [f"recall@{k}" for k in result["ks"]] + list(RANK_METRICS)
    lines = [
        f"retrieval ({result['protocol']}): {first['num_queries']} {result['split']} queries against {against} "
        f"({result['feature']} features; {first['num_skipped']} queries without a match left out; %)",
        f"{'features':<10}" + "".join(f"{header:>8}" for header in headers),
    ]
    for name in spaces:
        lines.append(f"{SPACE_LABELS[name]:<10}" + "".join(f"{result[name][key]:>8.2f}" for key in keys))
    return "\n".join(lines)


def plot_recall(result: dict[str, Any], path: Path) -> None:
    """Recall@K against K (log scale), one curve per feature space, MAP@R and mAP in the legend."""
    with result_plot(path) as axes:
        for name in spaces_in(result):
            row = result[name]
            axes.plot(result["ks"], [row[f"recall@{k}"] for k in result["ks"]], marker="o",
                      label=f"{SPACE_LABELS[name]} (MAP@R {row['map_at_r']:.1f}, mAP {row['map']:.1f})")
        axes.set_xscale("log", base=2)
        axes.set_xticks(result["ks"], [str(k) for k in result["ks"]])
        axes.set(xlabel="K (neighbours retrieved)", ylabel="Recall@K (%)",
                 title=f"retrieval ({result['protocol']}), {result['feature']} features")


def _report(result: dict[str, Any], output_dir: Path) -> None:
    if report_on_first_process(format_table(result), result, output_dir / RESULTS_FILE):
        plot_recall(result, output_dir / PLOT_FILE)


def main(argv: list[str]) -> None:
    """`bam retrieval --backbone PATH --data CLASS [--config FILE] [--print_config] [overrides]`."""
    try:
        CLI(run_retrieval, args=stage_arguments("retrieval", argv), as_positional=False, prog="bam retrieval")
    except (ValueError, FileNotFoundError) as error:  # a setting or the data: one line, no traceback
        sys.exit(f"bam retrieval: {error}")
