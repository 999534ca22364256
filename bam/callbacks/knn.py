"""Online k-NN evaluation of the backbone during pretraining (authors' protocol), or label-free
embedding checks when the data has fewer than two classes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader

from bam.callbacks.training_end import is_final_epoch_end
from bam.features.extract import embed_dataset
from bam.features.knn import knn_accuracy
from bam.features.spread import embedding_spread
from bam.models import build_backbone
from bam.models.batchnorm_stats import recompute_batchnorm_stats
from bam.training.fault_tolerance import epoch_end_evaluation

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
SPREAD_REPORT = "embedding_report.json"
TRAINED = "trained backbone"  # the evaluated encoder: the teacher when there is one
STUDENT = "trained student"


class OnlineKNN(pl.Callback):
    """Logs `knn/top1` and `knn/top5` every `every_n_epochs` epochs and after the last one: of the
    encoder the method is evaluated with (`extract_features`: the teacher when there is one). With
    `include_student` and a method with a teacher, the student is evaluated too, on the same bank
    and queries, and logged as `knn_student/top1` and `knn_student/top5`.

    The datamodule provides `knn_dataloaders() -> (bank, query)` loaders of labelled, normalised
    images (the bank is already bounded by the datamodule's `knn_bank_fraction`) and, as bam's
    data modules do, `class_count()` (without it, k-NN is always on). Under DDP each process
    embeds its own shard and the shards are gathered onto the CPU, so every row of the bank is
    real and the device never holds the whole bank.

    At the end of training the last accuracies are printed and written to `knn_report.json` in
    the run's log directory (by rank 0, after every rank has finished its collectives). With
    `compare_baselines`, the report also holds the same architecture randomly initialised (its
    batch norm statistics estimated on the bank's images) and k-NN on raw pixels, on the same split.

    Data with fewer than two classes (images without labels, or a single class) would score 100%
    whatever the backbone: k-NN is then off, said once at the start, and the bank's images give
    label-free signals instead (`bam.features.spread`): `embedding/effective_rank` and
    `embedding/std` of the L2-normalised embeddings are logged, and printed at the end with the
    last training loss (written to `embedding_report.json`).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        compare_baselines: bool = False,
        include_student: bool = False,
    ) -> None:
        self.every_n_epochs = every_n_epochs
        self.include_student = include_student
        self.k = k
        self.temperature = temperature
        self.compare_baselines = compare_baselines
        self.report: dict[str, dict] = {}  # row -> accuracies by k, or the embedding's spread
        self.labelled = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        count_classes = getattr(trainer.datamodule, "class_count", None)  # a data module of your own may lack it
        classes = None if count_classes is None else count_classes()
        self.labelled = classes is None or classes >= 2
        if not self.labelled:
            found = "no class labels" if classes == 0 else "a single class"
            rank_zero_info(f"online k-NN is off: the training images have {found}, so any accuracy would read 100%; "
                           "logging label-free checks instead (embedding/effective_rank, embedding/std, train/loss)")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs and not is_final_epoch_end(trainer):
            return
        with epoch_end_evaluation(trainer, "k-NN"):
            for name, (_, features) in self._encoders(pl_module).items():
                self.report[name] = self.evaluate(trainer, features, pl_module)
        logged = {}
        for name, (suffix, _) in self._encoders(pl_module).items():
            result = self.report[name]
            logged.update({f"knn{suffix}/top1": result[1], f"knn{suffix}/top5": result[5]} if self.labelled else
                          {f"embedding{suffix}/effective_rank": result["effective_rank"],
                           f"embedding{suffix}/std": result["std"]})
        # equal on every rank (the bank is gathered); the mean over ranks keeps it and stops
        # Lightning's warning about unsynchronised epoch-level values
        pl_module.log_dict(logged, sync_dist=True)

    def _encoders(self, pl_module: pl.LightningModule) -> dict[str, tuple[str, FeatureFn]]:
        """Report row -> (suffix of its logged names, features) of every encoder evaluated."""
        encoders = {TRAINED: ("", pl_module.extract_features)}
        if self.include_student and getattr(pl_module, "teacher", None) is not None:
            encoders[STUDENT] = ("_student", pl_module.student_features)
        return encoders

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.compare_baselines:
            self._evaluate_baselines(trainer, pl_module)
        if self.report and self.labelled:
            self._print_and_save(trainer)
        elif self.report:
            self._print_and_save_spread(trainer)

    def _evaluate_baselines(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        hp = pl_module.hparams
        with torch.random.fork_rng():
            torch.manual_seed(0)
            random_net = build_backbone(hp.backbone, **(hp.backbone_kwargs or {})).to(pl_module.device)
        # A fresh network's batch norm statistics are placeholders (mean 0, variance 1): give the
        # baseline its data's statistics, as PreciseBatchNorm gives the trained backbone.
        bank_images = (images.to(pl_module.device) for images, _ in trainer.datamodule.knn_dataloaders()[0])
        recompute_batchnorm_stats(random_net, bank_images, max_images=4096)
        self.report["random init (same architecture)"] = self.evaluate(trainer, random_net, random_net)
        self.report["raw pixels"] = self.evaluate(trainer, lambda images: images.flatten(1), None)

    def evaluate(self, trainer: pl.Trainer, features: FeatureFn, module: torch.nn.Module | None) -> dict:
        """k-NN accuracies by k, or without classes the spread of the bank's embeddings."""
        bank_loader, query_loader = trainer.datamodule.knn_dataloaders()
        was_training = module.training if module is not None else False
        if module is not None:
            module.eval()
        try:
            bank, bank_labels = _embed(bank_loader, features, trainer.strategy.root_device)
            if not self.labelled:
                return embedding_spread(bank)
            query, query_labels = _embed(query_loader, features, trainer.strategy.root_device)
        finally:
            if module is not None:
                module.train(was_training)
        return knn_accuracy(bank, bank_labels, query, query_labels, self.k, self.temperature)

    def baseline_top1(self) -> dict[str, float]:
        """Top-1 accuracies of the baselines (random init, raw pixels), for the curve plots."""
        if not self.labelled:
            return {}
        return {name: accuracy[1] for name, accuracy in self.report.items() if name not in (TRAINED, STUDENT)}

    def _print_and_save(self, trainer: pl.Trainer) -> None:
        lines = [f"{'k-NN (k=%d) on the held-out split' % self.k:<40} {'top-1':>7} {'top-5':>7}"]
        for name, accuracy in self.report.items():
            lines.append(f"{name:<40} {accuracy[1]:>6.2f}% {accuracy[5]:>6.2f}%")
        rank_zero_info("\n".join(lines))
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, never rank 0 alone
        if trainer.is_global_zero and log_dir:
            path = Path(log_dir) / "knn_report.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({name: {"top1": a[1], "top5": a[5]} for name, a in self.report.items()}, indent=2))


    def _print_and_save_spread(self, trainer: pl.Trainer) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        lines = [f"{'Embeddings of the bank (no classes: no k-NN)':<44} {'effective rank':>16} {'std':>7}"]
        for name, spread in self.report.items():
            rank = f"{spread['effective_rank']:.1f} of {spread['max_rank']}"
            lines.append(f"{name:<44} {rank:>16} {spread['std']:>7.4f}")
        some = next(iter(self.report.values()))
        lines.append(f"collapse: rank near 1 and std near 0; evenly spread: std {some['spread_std']:.4f}. "
                     f"Last train/loss: {'n/a' if loss is None else f'{float(loss):.4f}'}")
        rank_zero_info("\n".join(lines))
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
        if trainer.is_global_zero and log_dir:
            path = Path(log_dir) / SPREAD_REPORT
            path.parent.mkdir(parents=True, exist_ok=True)
            report = {**self.report, "last_train_loss": None if loss is None else float(loss)}
            path.write_text(json.dumps(report, indent=2))


def _embed(loader: DataLoader, features: FeatureFn, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of `loader`'s dataset embedded once over all processes, gathered on the CPU."""
    with torch.no_grad():
        return embed_dataset(loader.dataset, features, device, loader.batch_size or 256, loader.num_workers)
