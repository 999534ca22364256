"""End-of-run pictures of what the trained backbone learnt, drawn on the held-out split."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from bam.features.extract import embed_rows
from bam.features.pictures import PictureSettings, write_pictures


class EmbeddingPictures(pl.Callback):
    """After fitting, embed the data module's held-out split (its k-NN queries) with the evaluated
    encoder (the teacher when there is one) and write into `<run dir>/<dirname>/`:
    `neighbours.png` (query images and their nearest neighbours), `embedding_map.png` (UMAP or
    t-SNE, coloured by class) and, for a ViT, `attention.png` (the class token's attention).

    Args:
        enabled: Draw them (off by default: the demo's config turns it on; on a large held-out
            split the map is drawn from `map_points` of its images).
        dirname: Sub-folder of `trainer.default_root_dir`.
        queries, k, map_points, attention_images, seed: See `bam.features.pictures.PictureSettings`.
    """

    def __init__(self, enabled: bool = False, dirname: str = "plots", queries: int = 6, k: int = 5,
                 map_points: int = 5000, attention_images: int = 4, seed: int = 0) -> None:
        self.settings = PictureSettings(enabled, queries, k, map_points, attention_images, seed)
        self.dirname = dirname
        self.written: list[Path] = []

    @torch.no_grad()
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        if not self.settings.enabled or not hasattr(datamodule, "knn_dataloaders"):
            return
        loader = datamodule.knn_dataloaders()[1]
        encoder = pl_module.teacher if pl_module.teacher is not None else pl_module.student
        was_training = encoder.training
        encoder.eval()
        try:  # every rank embeds its shard (a collective); rank 0 draws
            features, labels, indices = embed_rows(loader.dataset, pl_module.extract_features, pl_module.device,
                                                   loader.batch_size or 256, loader.num_workers)
            if trainer.is_global_zero:
                recipe = datamodule.data_recipe()
                out_dir = Path(trainer.default_root_dir) / self.dirname
                self.written = write_pictures(self.settings, features, loader.dataset, indices, recipe.mean,
                                              recipe.std, out_dir, labels, None, encoder.backbone)
                rank_zero_info(f"EmbeddingPictures: wrote {', '.join(path.name for path in self.written)} to {out_dir}")
        finally:
            encoder.train(was_training)
