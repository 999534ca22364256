"""DeepCluster-v2 pretraining on the same module structure as BAM, SwAV and DINO: the method is its
objective with its memory bank, the clustering at each epoch's start and the dataset indices the
bank is kept by; encoders, optimiser, schedules and multi-crop come from `SSLMethod`."""
from __future__ import annotations

from typing import Any

import torch

from bam.losses import DeepClusterV2Loss, DeepClusterV2Objective
from bam.methods.base import SSLMethod, dataset_indices_of
from bam.models import ProjectorSettings
from bam.models.projector import SWAV_PROJECTOR
from bam.ops.errors import UserInputError


class DeepClusterV2Module(SSLMethod):
    """DeepCluster-v2 (Caron et al., NeurIPS 2020, the SwAV paper's improved DeepCluster) as a
    LightningModule.

    At the start of every epoch each head's prototypes and each image's target are set by
    spherical k-means over a memory bank of the previous epoch's normalised global-crop
    embeddings; every crop of an image is then trained to predict its targets (see
    `bam.losses.deepcluster_loss`). The bank, prototypes and targets are buffers of the loss
    (`self.loss_fn`): in every checkpoint (a resumed run neither re-clusters mid-epoch nor loses the
    bank) and the same on every process.

    The bank is kept by dataset index: the training batches must carry them, as bam's data modules'
    do (`(views, labels, indices)`), and the data module must say how many images it trains on
    (`training_set_size()`). It holds `num_global_crops x N x projector.out_dim` floats, whole on every
    process (ImageNet, 2 x 1.28M x 128: 1.3 GB).

    Each of the `num_global_crops` global crops (`SSLMethod`'s crop counts, 2 + 6 by default) has
    its bank; head h clusters bank h mod G.

    Args:
        objective: the objective's settings (`DeepClusterV2Objective`: `num_prototypes` per head,
            `temperature`, `kmeans_iterations`); in a config `objective.num_prototypes` etc.
        cluster_seed: seeds the bank's random start and each clustering's starting centroids
            (with the epoch and head), so that a resumed run clusters as the uninterrupted one.
        projector: the projection head's settings (`bam.models.ProjectorSettings`), the
            reference's by default (SwAV's: 2048 -> 128, 2 layers, batch norm, ReLU); in a config
            `projector.out_dim` etc.
        **kwargs: the shared arguments of `SSLMethod` (crop counts, backbone, optimiser, schedules), except
            `momentum_teacher`: the targets come from the clustering.
    """

    def __init__(
        self,
        objective: DeepClusterV2Objective = DeepClusterV2Objective(),
        cluster_seed: int = 0,
        projector: ProjectorSettings = SWAV_PROJECTOR,
        **kwargs: Any,
    ) -> None:
        self.refuse_momentum_teacher(kwargs, "DeepCluster-v2", "its targets are last epoch's clusters")
        super().__init__(projector=projector, **kwargs)
        objective = self.record_objective(DeepClusterV2Objective, objective)
        self.loss_fn = DeepClusterV2Loss(self.projector_settings.out_dim, self.num_crops, self.hparams.num_global_crops,
                                         objective)
        # Every process keeps the loss's state equal by construction (gathered writes, split
        # k-means): DDP need not broadcast the bank from process 0 before every step.
        self._ddp_params_and_buffers_to_ignore = [f"loss_fn.{name}" for name, _ in self.loss_fn.named_buffers()]

    # ----------------------------------------------------------------- method interface
    def step_loss(self, crops: list[torch.Tensor], batch: Any) -> torch.Tensor:
        self.check_crop_count(crops, self.loss_fn.num_crops)
        return self.loss_fn(self.student(crops), dataset_indices_of(batch, "DeepCluster-v2's memory bank"))

    def chance_level(self, batch_size: int) -> float:
        return self.loss_fn.chance_level()

    def on_schedule(self, step: int) -> dict[str, float]:
        return {"clustered_epoch": float(self.loss_fn.clustered_epoch)}

    # ----------------------------------------------------------------- the bank and its clusters
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":  # before a checkpoint is restored, which brings its own bank
            self.loss_fn.allocate(_training_set_size(self.trainer.datamodule), self.hparams.cluster_seed)

    def on_train_epoch_start(self) -> None:
        # A run resumed mid-epoch has this epoch's clusters in its checkpoint: the bank has moved
        # on since, so clustering again would give other targets than the uninterrupted run's.
        epoch = self.trainer.current_epoch
        if int(self.loss_fn.clustered_epoch) != epoch:
            self.loss_fn.cluster(epoch, self.hparams.cluster_seed)


def _training_set_size(datamodule: Any) -> int:
    size = getattr(datamodule, "training_set_size", None)
    if not callable(size):
        raise UserInputError(
            "DeepCluster-v2 keeps a memory bank of every training image: its data module must have a "
            "training_set_size() method (bam's data modules do) and its batches must carry dataset indices"
        )
    return size()
