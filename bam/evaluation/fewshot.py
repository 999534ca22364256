"""`bam fewshot`: N-way K-shot classification episodes on a frozen backbone's features, with and
without the BPA transform (the BPA paper's headline use, arXiv 2407.01467).

A labelled split is embedded once by the frozen backbone (evaluation transform). Each episode
draws `ways` classes among those with at least `shots + queries` images, then `shots` support and
`queries` query images of each, without replacement; the seeded generator makes the episodes the
same for every backbone and for both feature spaces. Features are L2-normalised; a query is
assigned the class of its nearest prototype (Euclidean distance to the mean of each class's
support features). With `novel_classes`, episodes draw only from the classes a file lists (the
few-shot protocol of judging an encoder on classes it was not pretrained on). With BPA the transform is transductive, as in the paper: support and queries
of an episode form one set, transformed together (`bam.transforms.bpa`, official defaults), and the
prototypes and distances are computed on the transformed rows. Reported per shot count: mean
accuracy over the episodes and its 95% confidence interval (1.96 standard errors), raw and BPA,
as a table, `output_dir/fewshot_results.json` and `output_dir/fewshot.png`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from jsonargparse import CLI
from torch import Tensor

from bam.ops.errors import UserInputError
from bam.evaluation.data import ClassificationDataModule
from bam.evaluation.frozen import SPACE_LABELS, embed_split, report_on_first_process, result_plot, spaces_in, stage_arguments
from bam.training.run_cli import one_line_errors
from bam.transforms import BPASettings

RESULTS_FILE = "fewshot_results.json"
PLOT_FILE = "fewshot.png"
CONFIDENCE_Z = 1.96  # two-sided 95% under the normal approximation of the mean over episodes


def sample_episode(
    labels: Tensor, ways: int, shots: int, queries: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Indices into `labels` of one episode: `(ways * shots,)` support then `(ways * queries,)`
    query indices, each class-major (class `c` of the episode owns rows `c * shots ...`)."""
    classes = _eligible_classes(labels, shots + queries)
    if len(classes) < ways:
        raise ValueError(
            f"a {ways}-way {shots}-shot episode with {queries} queries needs {ways} classes with at least "
            f"{shots + queries} images each; this split has {len(classes)}"
        )
    chosen = classes[torch.randperm(len(classes), generator=generator)[:ways]]
    picks = []
    for label in chosen:
        members = torch.nonzero(labels == label).squeeze(1)
        picks.append(members[torch.randperm(len(members), generator=generator)[: shots + queries]])
    picks = torch.stack(picks)  # (ways, shots + queries)
    return picks[:, :shots].reshape(-1), picks[:, shots:].reshape(-1)


def _eligible_classes(labels: Tensor, needed: int) -> Tensor:
    values, counts = torch.unique(labels, return_counts=True)
    return values[counts >= needed]


def prototype_accuracy(support: Tensor, query: Tensor, ways: int, shots: int) -> float:
    """Fraction of class-major `query` rows whose nearest prototype (mean of each class's `shots`
    class-major `support` rows, Euclidean distance) is their own class."""
    prototypes = support.view(ways, shots, -1).mean(dim=1)
    predicted = torch.cdist(query, prototypes).argmin(dim=1)
    truth = torch.arange(ways, device=query.device).repeat_interleave(len(query) // ways)
    return float((predicted == truth).float().mean())


def episode_accuracies(
    features: Tensor,
    labels: Tensor,
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    episodes: int = 600,
    bpa: BPASettings = BPASettings(),
    seed: int = 0,
) -> dict[str, Tensor]:
    """Per-episode accuracies `(episodes,)` of the prototype classifier on the L2-normalised
    `features` (`raw`) and, with `bpa`, on each episode's BPA-transformed support + query set
    (`bpa`); both on the same seeded episodes."""
    if min(ways, shots, queries, episodes) < 1 or ways < 2:
        raise ValueError(f"need ways >= 2 and shots, queries, episodes >= 1; got {ways}, {shots}, {queries}, {episodes}")
    unit = F.normalize(features.float(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    results: dict[str, list[float]] = {"raw": [], **({"bpa": []} if bpa.enabled else {})}
    for _ in range(episodes):
        support, query = sample_episode(labels, ways, shots, queries, generator)
        episode = unit[torch.cat([support, query]).to(unit.device)]
        results["raw"].append(prototype_accuracy(episode[: len(support)], episode[len(support) :], ways, shots))
        if bpa.enabled:
            moved = bpa.transform(episode, "use fewer ways, shots or queries")
            results["bpa"].append(prototype_accuracy(moved[: len(support)], moved[len(support) :], ways, shots))
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in results.items()}


def read_class_list(list_file: Path, num_classes: int, class_names: list[str] | None = None) -> list[int]:
    """The labels of the classes `list_file` names, one per line: a class folder name (image
    folders, `class_names`) or an integer label; blank lines and `#` comments are ignored.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it lists no class, or classes the data does not have (how many, the first few).
    """
    if not list_file.is_file():
        raise FileNotFoundError(f"novel class list not found: {list_file}")
    entries = [line.strip() for line in list_file.read_text().splitlines()]
    entries = [entry for entry in entries if entry and not entry.startswith("#")]
    if not entries:
        raise UserInputError(f"novel class list {list_file} names no classes")
    known = {str(label): label for label in range(num_classes)}
    known.update({name: label for label, name in enumerate(class_names or [])})  # a folder name wins
    unknown = [entry for entry in entries if entry not in known]
    if unknown:
        raise UserInputError(
            f"{len(unknown)} of the {len(entries)} classes in {list_file} are neither class folders of the data nor "
            f"labels 0-{num_classes - 1}, e.g. {', '.join(unknown[:3])}"
        )
    return sorted({known[entry] for entry in entries})


def summarise(accuracies: Tensor) -> dict[str, float]:
    """Mean accuracy and the half-width of its 95% confidence interval, in percent."""
    spread = float(accuracies.std(unbiased=True)) if len(accuracies) > 1 else 0.0
    return {"mean": 100 * float(accuracies.mean()), "ci95": 100 * CONFIDENCE_Z * spread / math.sqrt(len(accuracies))}


def evaluate_fewshot(
    features: Tensor, labels: Tensor, shots: Sequence[int] = (1, 5), **episode_settings: Any
) -> dict[str, dict[str, dict[str, float]]]:
    """`{"<K>-shot": {"raw": {"mean", "ci95"}, "bpa": {...}}}` for every K in `shots` (percent);
    `episode_settings` (ways, queries, episodes, bpa, seed) are those of
    `episode_accuracies`, with its defaults."""
    return {
        f"{k}-shot": {
            name: summarise(values)
            for name, values in episode_accuracies(features, labels, shots=k, **episode_settings).items()
        }
        for k in shots
    }


def run_fewshot(
    backbone: str,
    data: ClassificationDataModule,
    ways: int = 5,
    shots: list[int] = [1, 5],  # noqa: B006 (jsonargparse reads the default from the signature)
    queries: int = 15,
    episodes: int = 600,
    bpa: BPASettings = BPASettings(),
    seed: int = 0,
    novel_classes: Optional[str] = None,
    output_dir: str = "runs/fewshot",
    **frozen: Any,
) -> dict[str, Any]:
    """Few-shot episodes on a labelled split's frozen features, raw and with transductive BPA;
    printed, written to `output_dir/fewshot_results.json` and plotted to `output_dir/fewshot.png`.

    Args:
        backbone: The evaluated backbone: an export, a checkpoint, a released file or a timm name.
        data: The labelled data, whose `split` the episodes are drawn from.
        ways: Classes per episode (N).
        shots: Support images per class (K); one result per value.
        queries: Query images per class and episode.
        episodes: Episodes per shot count (the usual protocol: 600 or more).
        bpa: BPA settings (`bam.transforms.BPASettings`: `enabled`, `reg`, `iterations`); with
            `enabled`, also classify on each episode's BPA transform (support + queries as one set).
        seed: Seed of the episodes (the same episodes for raw and BPA).
        novel_classes: File listing the only classes episodes draw from, one per line: class folder
            names (e.g. `n01440764`) or integer labels; the novel classes of a few-shot split, not
            seen in pretraining. None: every class of the split.
        output_dir: Where the JSON result and the plot are written (by process 0).
        **frozen: encoder, arch, feature, split, fraction, accelerator: see `embed_split`.

    Returns:
        Per shot count (`"1-shot"`, ...): `raw` and `bpa` mean accuracy and 95% CI half-width (%);
        and the settings used.
    """
    if not shots:
        raise ValueError("shots must list at least one shot count, e.g. [1, 5]")
    novel = None if novel_classes is None else read_class_list(Path(novel_classes), data.num_classes, data.class_names())
    features, labels, extractor, device, split = embed_split(backbone, data, "few-shot", **frozen)
    if novel is not None:
        kept = torch.isin(labels, torch.tensor(novel))
        features, labels = features[kept], labels[kept]
    scores = evaluate_fewshot(
        features.to(device), labels, shots, ways=ways, queries=queries, episodes=episodes, bpa=bpa, seed=seed,
    )
    result = {
        "results": scores, "ways": ways, "queries": queries, "episodes": episodes, "split": split,
        "num_images": len(labels), "backbone": backbone, "feature": extractor.readout, "seed": seed,
        "novel_classes": None if novel is None else {"file": novel_classes, "labels": novel},
        "bpa_settings": bpa.recorded(),
    }
    _report(result, Path(output_dir))
    return result


def format_table(result: dict[str, Any]) -> str:
    """Mean accuracy +- 95% CI per shot count, one column per feature space."""
    spaces = spaces_in(next(iter(result["results"].values())))
    lines = [
        f"{result['ways']}-way few-shot, {result['queries']} queries per class, {result['episodes']} episodes "
        f"({result['num_images']} {result['split']} images, {result['feature']} features; mean accuracy % +- 95% CI)",
        f"{'':<8}" + "".join(f"{SPACE_LABELS[name]:>16}" for name in spaces),
    ]
    for shot, row in result["results"].items():
        lines.append(f"{shot:<8}" + "".join(f"{row[name]['mean']:>9.2f} +-{row[name]['ci95']:>5.2f}" for name in spaces))
    return "\n".join(lines)


def plot_results(result: dict[str, Any], path: Path) -> None:
    """Bar chart: mean accuracy per shot count, raw and BPA side by side, 95% CI as error bars."""
    shots = list(result["results"])
    spaces = spaces_in(result["results"][shots[0]])
    width = 0.8 / len(spaces)
    with result_plot(path) as axes:
        for offset, name in enumerate(spaces):
            positions = [index + (offset - (len(spaces) - 1) / 2) * width for index in range(len(shots))]
            axes.bar(positions, [result["results"][shot][name]["mean"] for shot in shots], width,
                     yerr=[result["results"][shot][name]["ci95"] for shot in shots], capsize=4, label=SPACE_LABELS[name])
        axes.set_xticks(range(len(shots)), shots)
        axes.set(ylabel="accuracy (%)", title=f"{result['ways']}-way few-shot, {result['episodes']} episodes (95% CI)")


def _report(result: dict[str, Any], output_dir: Path) -> None:
    if report_on_first_process(format_table(result), result, output_dir / RESULTS_FILE):
        plot_results(result, output_dir / PLOT_FILE)


def main(argv: list[str]) -> None:
    """`bam fewshot --backbone PATH --data CLASS [--config FILE] [--print_config] [overrides]`."""
    with one_line_errors("bam fewshot"):
        CLI(run_fewshot, args=stage_arguments("fewshot", argv), as_positional=False, prog="bam fewshot")
