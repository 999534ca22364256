"""OnlineKNN on a stand-in trainer (no fitting): which epoch ends evaluate, what is logged, the
report's table and knn_report.json, the train/eval mode around an evaluation and the random-init
baseline, each against a k-NN computed here from the same features."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bam.callbacks import OnlineKNN
from bam.callbacks import knn as knn_callback
from bam.features.knn import knn_accuracy
from bam.models import build_backbone
from bam.models.batchnorm_stats import recompute_batchnorm_stats


def _split(seed: int, count: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, size, size, generator=generator), torch.randint(0, 10, (count,), generator=generator)


class KNNData:
    def __init__(self, bank_size: int = 64, query_size: int = 48, size: int = 16, batch_size: int = 16) -> None:
        self.bank, self.query = _split(1, bank_size, size), _split(2, query_size, size)
        self.batch_size = batch_size

    def knn_dataloaders(self):
        return (DataLoader(TensorDataset(*self.bank), batch_size=self.batch_size),
                DataLoader(TensorDataset(*self.query), batch_size=self.batch_size))


def stand_in_trainer(data, current_epoch=0, max_epochs=10, log_dir=None, global_zero=True) -> SimpleNamespace:
    return SimpleNamespace(datamodule=data, current_epoch=current_epoch, max_epochs=max_epochs, max_steps=-1,
                           global_step=0, should_stop=False, log_dir=log_dir, is_global_zero=global_zero,
                           strategy=SimpleNamespace(root_device=torch.device("cpu")))


class Features(nn.Module):
    """A fixed random projection with batch norm: its features differ in train and eval mode."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.BatchNorm1d(32))
        self.net[2].running_mean.normal_()
        self.logged: list[dict[str, float]] = []

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def log_dict(self, values, sync_dist=False) -> None:
        self.logged.append({name: float(value) for name, value in values.items()})


def expected_accuracy(features, data: KNNData, k: int, temperature: float) -> dict[int, float]:
    with torch.no_grad():
        return knn_accuracy(features(data.bank[0]), data.bank[1], features(data.query[0]), data.query[1], k, temperature)


def test_evaluates_every_n_epochs_and_after_the_last_one():
    data, module = KNNData(), Features()
    knn = OnlineKNN(every_n_epochs=3, k=20, temperature=0.5)
    evaluated = []
    for epoch in range(8):
        before = len(module.logged)
        knn.on_train_epoch_end(stand_in_trainer(data, current_epoch=epoch, max_epochs=8), module)
        if len(module.logged) > before:
            evaluated.append(epoch)
    assert evaluated == [2, 5, 7]  # 3, 6 epochs completed, then the last (8th) epoch
    module.net.eval()
    expected = expected_accuracy(module.extract_features, data, 20, 0.5)
    assert expected != expected_accuracy(module.extract_features, data, 20, 0.07), "T would not show on this data"
    assert module.logged[-1] == pytest.approx({"knn/top1": expected[1], "knn/top5": expected[5]})
    assert knn.report == {"trained backbone": pytest.approx(expected)}


def test_evaluation_runs_in_eval_mode_and_restores_the_mode():
    data, module = KNNData(), Features()
    module.train()
    accuracy = OnlineKNN(k=5).evaluate(stand_in_trainer(data), module.extract_features, module)
    assert module.training
    module.eval()
    assert accuracy == pytest.approx(expected_accuracy(module.extract_features, data, 5, 0.07))
    OnlineKNN(k=5).evaluate(stand_in_trainer(data), module.extract_features, module)
    assert not module.training


def test_defaults_vote_with_20_neighbours_at_temperature_0_07():
    knn = OnlineKNN()
    assert (knn.every_n_epochs, knn.k, knn.temperature, knn.compare_baselines) == (1, 20, 0.07, False)


@pytest.mark.slow  # 6-7 CPU-seconds: longer than a fast-tier test may take (a few seconds)
def test_random_init_baseline_is_the_seeded_architecture_with_bank_statistics():
    """The baseline network: seed 0, the module's backbone and kwargs, batch norm statistics from the
    bank's first 4096 images (batches of 64: 4096 exactly, fewer than the 4200 of the bank)."""
    data = KNNData(bank_size=4200, query_size=64, batch_size=64)
    data.bank[0][4096:] += 20.0  # images past the first 4096 would move the statistics far
    hparams = SimpleNamespace(backbone="bam_cnn4", backbone_kwargs={"width": 8})
    module = SimpleNamespace(hparams=hparams, device=torch.device("cpu"))
    knn = OnlineKNN(k=5)
    knn._evaluate_baselines(stand_in_trainer(data), module)

    def baseline(seed: int, images: int, width: int | None = 8) -> dict[int, float]:
        torch.manual_seed(seed)
        net = build_backbone("bam_cnn4", **({} if width is None else {"width": width}))
        recompute_batchnorm_stats(net, (images for images, _ in data.knn_dataloaders()[0]), max_images=images)
        return expected_accuracy(net.eval(), data, 5, 0.07)

    expected = baseline(0, 4096)
    assert expected != baseline(1, 4096), "another seed scores the same here: the test would not see the seed"
    assert expected != baseline(0, 4200), "the whole bank scores the same here: the test would not see max_images"
    assert expected != baseline(0, 4096, width=None), "the kwargs change nothing here: the test would not see them"
    assert knn.report["random init (same architecture)"] == pytest.approx(expected)
    assert knn.report["raw pixels"] == pytest.approx(expected_accuracy(lambda images: images.flatten(1), data, 5, 0.07))
    assert knn.baseline_top1() == {name: knn.report[name][1] for name in ("random init (same architecture)", "raw pixels")}


def test_report_is_printed_as_a_table_and_written_by_rank_zero(tmp_path, monkeypatch):
    printed = []
    monkeypatch.setattr(knn_callback, "rank_zero_info", printed.append)
    knn = OnlineKNN(k=7)
    knn.report = {"trained backbone": {1: 81.25, 5: 99.5}, "raw pixels": {1: 12.5, 5: 50.0}}
    log_dir = tmp_path / "csv" / "version_0"  # not there yet: made with its parents
    knn._print_and_save(stand_in_trainer(None, log_dir=str(log_dir)))
    assert printed == ["k-NN (k=7) on the held-out split           top-1   top-5\n"
                       "trained backbone                          81.25%  99.50%\n"
                       "raw pixels                                12.50%  50.00%"]
    report = {"trained backbone": {"top1": 81.25, "top5": 99.5}, "raw pixels": {"top1": 12.5, "top5": 50.0}}
    assert (log_dir / "knn_report.json").read_text() == json.dumps(report, indent=2)
    assert knn.baseline_top1() == {"raw pixels": 12.5}

    knn._print_and_save(stand_in_trainer(None, log_dir=str(tmp_path / "rank1"), global_zero=False))
    knn._print_and_save(stand_in_trainer(None, log_dir=None))  # no logger: printed only
    assert not (tmp_path / "rank1").exists() and len(printed) == 3


def test_fit_end_reports_only_after_an_evaluation(tmp_path, monkeypatch):
    printed = []
    monkeypatch.setattr(knn_callback, "rank_zero_info", printed.append)
    knn = OnlineKNN()
    knn.on_fit_end(stand_in_trainer(None, log_dir=str(tmp_path)), None)
    assert printed == [] and list(tmp_path.iterdir()) == []


# -- online k-NN of the student ---------------------------------------------------------------------
class _TwoEncoders(nn.Module):
    """A method with a teacher: the teacher's and the student's features differ."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.teacher, self.student = nn.Linear(3 * 16 * 16, 8), nn.Linear(3 * 16 * 16, 8)
        self.logged: list[dict[str, float]] = []

    def extract_features(self, images):
        return self.teacher(images.flatten(1))

    def student_features(self, images):
        return self.student(images.flatten(1))

    def log_dict(self, values, sync_dist=False):
        self.logged.append(dict(values))


def test_online_knn_evaluates_the_student_beside_the_teacher():
    data, module = KNNData(), _TwoEncoders()
    OnlineKNN(k=5, include_student=True).on_train_epoch_end(stand_in_trainer(data, current_epoch=9), module)
    teacher = expected_accuracy(module.extract_features, data, 5, 0.07)
    student = expected_accuracy(module.student_features, data, 5, 0.07)
    assert teacher != student
    assert module.logged == [pytest.approx({"knn/top1": teacher[1], "knn/top5": teacher[5],
                                            "knn_student/top1": student[1], "knn_student/top5": student[5]})]
    knn = OnlineKNN(k=5)  # the student is opt-in: its k-NN doubles the evaluation's cost
    knn.on_train_epoch_end(stand_in_trainer(data, current_epoch=9), module)
    assert set(module.logged[-1]) == {"knn/top1", "knn/top5"} and list(knn.report) == ["trained backbone"]
