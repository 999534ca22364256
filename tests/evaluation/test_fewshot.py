"""`bam fewshot`: episode sampling, the prototype classifier, transductive BPA, the 95% interval,
and the stage end to end (through the `bam` command: test_eval_configs_run.py's fewshot demo)."""
from __future__ import annotations

import json
import math
import struct

import matplotlib.figure
import pytest
import torch
import torch.nn.functional as F

from matplotlib.container import BarContainer

from bam.cli import STAGES
from bam.evaluation import fewshot
from bam.evaluation.backbone import build_from_spec, resolve_backbone
from bam.evaluation.data import BuiltinClassificationData
from bam.evaluation.fewshot import episode_accuracies, evaluate_fewshot, prototype_accuracy, run_fewshot, sample_episode
from bam.transforms import BPASettings, bpa
from eval_fixtures import CNN, record_figures, synthetic_args, synthetic_data, write_checkpoint



def _blobs(per_class: int = 20, classes: int = 6, dim: int = 8, noise: float = 0.05, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    points = centres[labels] + noise * torch.randn(len(labels), dim, generator=generator)
    order = torch.randperm(len(labels), generator=generator)
    return points[order], labels[order]


def test_episode_is_class_major_disjoint_and_seeded():
    _, labels = _blobs(per_class=10, classes=7)
    labels[labels == 6] = 5  # class 5 now has 20 images, class 6 none
    labels[:3] = 9  # three images of a class too small for 2 + 3 images: never drawn
    support, query = sample_episode(labels, ways=4, shots=2, queries=3, generator=torch.Generator().manual_seed(1))
    assert support.shape == (8,) and query.shape == (12,)
    assert not set(support.tolist()) & set(query.tolist())
    support_classes, query_classes = labels[support].view(4, 2), labels[query].view(4, 3)
    assert torch.all(support_classes == support_classes[:, :1]) and torch.all(query_classes == query_classes[:, :1])
    assert torch.equal(support_classes[:, 0], query_classes[:, 0]) and len(support_classes[:, 0].unique()) == 4
    assert 9 not in support_classes
    again = sample_episode(labels, 4, 2, 3, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], support) and torch.equal(again[1], query)


def test_too_few_classes_is_explained():
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 2)
    with pytest.raises(ValueError, match=r"3-way 1-shot.*3 classes with at least 4 images.*has 2"):
        sample_episode(labels, 3, 1, 3, torch.Generator())


def test_prototype_classifier_on_a_hand_computed_case():
    support = torch.tensor([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 2.0]])  # prototypes (0, 1), (4, 1)
    query = torch.tensor([[1.9, 1.0], [2.1, 5.0], [3.0, 0.0], [-1.0, 0.0]])  # classes 0, 0, 1, 1
    # nearest prototypes: 0, 1, 1, 0 -> half right
    assert prototype_accuracy(support, query, ways=2, shots=2) == 0.5


def test_separable_classes_are_always_right_and_noise_is_at_chance():
    features, labels = _blobs()
    perfect = episode_accuracies(features, labels, ways=5, shots=1, queries=5, episodes=50)
    assert torch.all(perfect["raw"] == 1.0) and torch.all(perfect["bpa"] == 1.0)
    noise = torch.randn(600, 32, generator=torch.Generator().manual_seed(3))
    chance = evaluate_fewshot(noise, torch.arange(6).repeat(100), ways=5, shots=[1], queries=15, episodes=600)
    raw = chance["1-shot"]["raw"]
    assert abs(raw["mean"] - 20.0) < 2.0 * raw["ci95"] + 0.5


def test_confidence_interval_is_the_normal_one_over_episodes():
    features, labels = _blobs(noise=1.5, seed=4)
    accuracies = episode_accuracies(features, labels, ways=3, shots=1, queries=4, episodes=40, bpa=BPASettings(enabled=False), seed=2)["raw"]
    summary = fewshot.summarise(accuracies)
    values = accuracies.tolist()
    mean = sum(values) / len(values)
    std = math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))
    assert summary["mean"] == pytest.approx(100 * mean)
    assert summary["ci95"] == pytest.approx(100 * 1.96 * std / math.sqrt(len(values)))
    assert 0 < summary["ci95"] < 20
    assert fewshot.summarise(torch.tensor([0.6], dtype=torch.float64)) == {"mean": 60.0, "ci95": 0.0}  # one episode: no spread


def test_bpa_transforms_support_and_queries_together():
    features, labels = _blobs(noise=0.8, seed=5)
    result = episode_accuracies(features, labels, ways=4, shots=2, queries=3, episodes=5, seed=7)
    # the first episode, recomputed independently: one BPA set of 4 * (2 + 3) rows
    support, query = sample_episode(labels, 4, 2, 3, torch.Generator().manual_seed(7))
    episode = bpa(F.normalize(features[torch.cat([support, query])], dim=1), 0.1, 10)
    assert episode.shape == (20, 20)
    prototypes = episode[:8].view(4, 2, -1).mean(1)
    truth = torch.arange(4).repeat_interleave(3)
    expected = (torch.cdist(episode[8:], prototypes).argmin(1) == truth).float().mean().item()
    assert result["bpa"][0].item() == pytest.approx(expected)
    raw = F.normalize(features[torch.cat([support, query])], dim=1)
    expected_raw = (torch.cdist(raw[8:], raw[:8].view(4, 2, -1).mean(1)).argmin(1) == truth).float().mean().item()
    assert result["raw"][0].item() == pytest.approx(expected_raw)


def test_bad_settings_are_explained():
    features, labels = _blobs()
    with pytest.raises(ValueError, match="ways >= 2"):
        episode_accuracies(features, labels, ways=1)
    for ways, shots, queries, episodes in ((5, 0, 15, 600), (5, 1, 0, 600), (5, 1, 15, 0)):
        with pytest.raises(ValueError) as error:
            episode_accuracies(features, labels, ways=ways, shots=shots, queries=queries, episodes=episodes)
        assert str(error.value) == (
            f"need ways >= 2 and shots, queries, episodes >= 1; got {ways}, {shots}, {queries}, {episodes}"
        )
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        run_fewshot("bam_cnn4", synthetic_data(), split="test", accelerator="cpu")


def test_the_stage_is_a_bam_command():
    """Its run through the `bam` command (results, table, plot, on 1 and 2 processes) is
    test_eval_configs_run.py's test_fewshot_demo_on_novel_classes_on_one_and_two_processes."""
    assert STAGES["fewshot"][0] == "bam.evaluation.fewshot"


def test_stage_in_process_result_table_and_plot(tmp_path, capsys, monkeypatch):
    figures = record_figures(monkeypatch, matplotlib.figure)  # the stages draw through frozen.result_plot
    checkpoint = write_checkpoint(tmp_path, *CNN)
    data = synthetic_data(batch_size=16, train_size=32, val_size=32)
    out = tmp_path / "runs" / "fewshot"  # made with its parents
    result = run_fewshot(str(checkpoint), data, ways=3, shots=[1, 2], queries=4, episodes=20, accelerator="cpu",
                         output_dir=str(out))
    # the same episodes on features computed here
    model = build_from_spec(resolve_backbone(str(checkpoint)))
    dataset = data.eval_dataset("val")
    with torch.no_grad():
        features = model(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    scores = {}
    for shots in (1, 2):
        accuracies = episode_accuracies(features, labels, ways=3, shots=shots, queries=4, episodes=20)
        scores[f"{shots}-shot"] = {
            name: {"mean": 100 * values.mean().item(), "ci95": 100 * 1.96 * values.std().item() / math.sqrt(20)}
            for name, values in accuracies.items()
        }
    assert {shot: set(row) for shot, row in result["results"].items()} == {shot: {"raw", "bpa"} for shot in scores}
    for shot, row in scores.items():
        for name, values in row.items():
            assert result["results"][shot][name] == pytest.approx(values), (shot, name)
    assert {key: value for key, value in result.items() if key != "results"} == {
        "ways": 3, "queries": 4, "episodes": 20, "split": "val", "num_images": 32,
        "backbone": str(checkpoint), "feature": "pooled", "seed": 0, "bpa_settings": {"reg": 0.1, "iterations": 10},
        "novel_classes": None,
    }
    text = (out / "fewshot_results.json").read_text()
    assert json.loads(text) == result and text == json.dumps(result, indent=2)  # indented for people to read
    rows = [
        f"{shot:<8}" + "".join(f"{result['results'][shot][name]['mean']:>9.2f} +-{result['results'][shot][name]['ci95']:>5.2f}"
                               for name in ("raw", "bpa"))
        for shot in ("1-shot", "2-shot")
    ]
    assert capsys.readouterr().out.splitlines() == [
        "3-way few-shot, 4 queries per class, 20 episodes (32 val images, pooled features; mean accuracy % +- 95% CI)",
        " " * 8 + " " * 13 + "raw" + " " * 13 + "BPA",
        *rows,
    ]
    # the plot: one bar per shot count and space, CI as error bars, labelled
    png = (out / "fewshot.png").read_bytes()
    assert png.startswith(b"\x89PNG") and png[16:24] == struct.pack(">II", 600, 420)  # 5 x 3.5 inches at 120 dpi
    (axes,) = figures[0].axes
    bars = [container for container in axes.containers if isinstance(container, BarContainer)]
    assert [[bar.get_height() for bar in container] for container in bars] == [
        [result["results"][shot][name]["mean"] for shot in ("1-shot", "2-shot")] for name in ("raw", "bpa")
    ]
    # side by side around each tick: raw at -0.2, BPA at +0.2, each 0.4 wide
    assert [[(bar.get_x() + bar.get_width() / 2, bar.get_width()) for bar in container] for container in bars] == [
        [(pytest.approx(-0.2), pytest.approx(0.4)), (pytest.approx(0.8), pytest.approx(0.4))],
        [(pytest.approx(0.2), pytest.approx(0.4)), (pytest.approx(1.2), pytest.approx(0.4))],
    ]
    # each bar's error bar spans the mean +- the 95% half-width
    for container, name in zip(bars, ("raw", "bpa")):
        (segments,) = [lines.get_segments() for lines in container.errorbar.lines[2]]
        assert [(pytest.approx(low[1]), pytest.approx(high[1])) for low, high in segments] == [
            (result["results"][shot][name]["mean"] - result["results"][shot][name]["ci95"],
             result["results"][shot][name]["mean"] + result["results"][shot][name]["ci95"]) for shot in ("1-shot", "2-shot")
        ]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["raw", "BPA"]
    assert [label.get_text() for label in axes.get_xticklabels()] == ["1-shot", "2-shot"]
    assert (axes.get_ylabel(), axes.get_title()) == ("accuracy (%)", "3-way few-shot, 20 episodes (95% CI)")


def test_table_and_plot_without_bpa(tmp_path):
    result = {
        "results": {"5-shot": {"raw": {"mean": 61.234, "ci95": 0.876}}}, "ways": 5, "queries": 15, "episodes": 600,
        "split": "train", "num_images": 100, "feature": "cls",
    }
    assert fewshot.format_table(result).splitlines() == [
        "5-way few-shot, 15 queries per class, 600 episodes (100 train images, cls features; mean accuracy % +- 95% CI)",
        " " * 8 + " " * 13 + "raw",
        "5-shot      61.23 +- 0.88",
    ]
    fewshot.plot_results(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")


def test_stage_defaults_are_the_usual_protocol(tmp_path):
    """5-way, 15 queries per class, BPA (reg 0.1, 10 iterations) next to raw, seed 0: only the shots
    and the number of episodes are given."""
    checkpoint = write_checkpoint(tmp_path, *CNN)
    data = BuiltinClassificationData(
        "synthetic", {"train_size": 10, "val_size": 80, "image_size": 32, "num_classes": 5},
        image_size=32, resize_size=32, num_workers=0, batch_size=40,
    )
    result = run_fewshot(str(checkpoint), data, shots=[1], episodes=2, accelerator="cpu", output_dir=str(tmp_path))
    model = build_from_spec(resolve_backbone(str(checkpoint)))
    dataset = data.eval_dataset("val")
    with torch.no_grad():
        features = model(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    expected = evaluate_fewshot(features, labels, [1], ways=5, queries=15, episodes=2, bpa=BPASettings(reg=0.1,
                                iterations=10), seed=0)
    assert result == {
        "results": expected, "ways": 5, "queries": 15, "episodes": 2, "split": "val", "num_images": 80,
        "backbone": str(checkpoint), "feature": "pooled", "seed": 0, "bpa_settings": {"reg": 0.1, "iterations": 10},
        "novel_classes": None,
    }


def test_results_go_to_runs_fewshot_by_default(tmp_path, monkeypatch):
    checkpoint = write_checkpoint(tmp_path, *CNN)
    monkeypatch.chdir(tmp_path)
    run_fewshot(str(checkpoint), synthetic_data(batch_size=16, train_size=8, val_size=16), ways=2, shots=[1], queries=1,
                episodes=1, bpa=BPASettings(enabled=False), accelerator="cpu")
    assert sorted(path.name for path in (tmp_path / "runs" / "fewshot").iterdir()) == ["fewshot.png", "fewshot_results.json"]


def test_episode_defaults_are_the_usual_protocol():
    """5-way 1-shot, 15 queries per class, 600 seeded episodes (seed 0), BPA (reg 0.1, 10 iterations)
    next to raw; per-episode accuracies in float64."""
    features, labels = _blobs(per_class=16, classes=6, noise=1.0, seed=8)  # 16 = 1 shot + 15 queries
    defaults = episode_accuracies(features, labels)
    explicit = episode_accuracies(features, labels, ways=5, shots=1, queries=15, episodes=600, bpa=BPASettings(reg=0.1,
                                  iterations=10), seed=0)
    assert set(defaults) == {"raw", "bpa"}
    for name, values in explicit.items():
        assert values.dtype == defaults[name].dtype == torch.float64 and values.shape == (600,)
        assert torch.equal(defaults[name], values), name
    # the test tells the documented values from others: another seed, other BPA settings give other accuracies
    assert not torch.equal(episode_accuracies(features, labels, episodes=20, seed=1)["raw"], explicit["raw"][:20])
    assert not torch.equal(episode_accuracies(features, labels, episodes=20, bpa=BPASettings(reg=1.1))["bpa"], explicit["bpa"][:20])
    assert not torch.equal(episode_accuracies(features, labels, episodes=20, bpa=BPASettings(iterations=1))["bpa"], explicit["bpa"][:20])
    with pytest.raises(ValueError, match="needs 5 classes with at least 17 images"):
        episode_accuracies(features, labels, shots=2)  # 2 shots + 15 queries: 17 images a class


def test_two_way_episodes_are_allowed():
    features, labels = _blobs(per_class=4, classes=2)
    result = episode_accuracies(features, labels, ways=2, shots=1, queries=3, episodes=3, bpa=BPASettings(enabled=False))
    assert torch.equal(result["raw"], torch.ones(3, dtype=torch.float64))  # well separated: always right


def test_shot_counts_default_to_one_and_five():
    features, labels = _blobs(per_class=20, classes=5, noise=1.0, seed=9)
    result = evaluate_fewshot(features, labels, episodes=3, bpa=BPASettings(enabled=False))
    for shots in (1, 5):
        expected = episode_accuracies(features, labels, shots=shots, episodes=3, bpa=BPASettings(enabled=False))["raw"]
        assert result[f"{shots}-shot"] == {"raw": fewshot.summarise(expected)}
    assert list(result) == ["1-shot", "5-shot"]


def test_interval_of_two_episodes():
    # mean 75%, sample standard deviation 0.5 / sqrt(2): half-width 1.96 * 0.5 / sqrt(2) / sqrt(2) = 49%
    assert fewshot.summarise(torch.tensor([0.5, 1.0], dtype=torch.float64)) == {"mean": 75.0, "ci95": pytest.approx(49.0)}


def test_stage_passes_the_documented_defaults_on(tmp_path, monkeypatch):
    asked = []

    def recording(features, labels, shots, **settings):
        asked.append((shots, settings))
        return {f"{k}-shot": {"raw": {"mean": 50.0, "ci95": 1.0}} for k in shots}

    monkeypatch.setattr(fewshot, "evaluate_fewshot", recording)
    checkpoint = write_checkpoint(tmp_path, *CNN)
    result = run_fewshot(str(checkpoint), synthetic_data(batch_size=16, train_size=8, val_size=8), accelerator="cpu",
                         output_dir=str(tmp_path / "out"))
    assert asked == [([1, 5], {"ways": 5, "queries": 15, "episodes": 600, "bpa": BPASettings(reg=0.1, iterations=10),
                               "seed": 0})]
    assert {key: value for key, value in result.items() if key not in ("results", "backbone")} == {
        "ways": 5, "queries": 15, "episodes": 600, "split": "val", "num_images": 8, "feature": "pooled", "seed": 0,
        "bpa_settings": {"reg": 0.1, "iterations": 10}, "novel_classes": None,
    }


def test_empty_shot_list_is_explained(tmp_path):
    with pytest.raises(ValueError) as error:
        run_fewshot("bam_cnn4", synthetic_data(), shots=[], accelerator="cpu", output_dir=str(tmp_path))
    assert str(error.value) == "shots must list at least one shot count, e.g. [1, 5]"
