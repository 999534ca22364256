"""ContrastiveCrop's schedule as a Lightning callback: locate every image's object, save the boxes.

See ``bam.data.contrastive_crop`` for the method. This callback switches the data module's crops
to box-centred ones, recomputes every box on schedule with the current backbone (the teacher's
when the method has one), and keeps the boxes in the checkpoint so a resumed run crops like the
uninterrupted one.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Iterable, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn

from bam.data.contrastive_crop import CropBoxes, compute_boxes
from bam.ops.distributed import gather_rows


class ContrastiveCrop(pl.Callback):
    """Semantic-aware crops (Peng et al., CVPR 2022): boxes from heat maps, crops around them.

    Epochs are counted from 0: boxes are computed at the start of epoch ``warmup_epochs`` and
    then every ``loc_interval`` epochs (with 20 and 20, after 20, 40, 60, ... completed epochs;
    ContrastiveCrop's ImageNet setting); before the first update the crops are plain
    RandomResizedCrop. Under DDP every process computes the boxes of its share of the training
    set and the shares are gathered, so every process (and every DataLoader worker) holds all of
    them.

    Args:
        enabled: Off by default: the crops stay RandomResizedCrop and nothing is computed.
        warmup_epochs: Epochs of plain crops before the first box update.
        loc_interval: Epochs between box updates.
        box_thresh: Threshold on the min-max normalised heat map; the box bounds what is above.
        alpha: Crop centres are ``box_edge0 + (box_edge1 - box_edge0) * Beta(alpha, alpha)``.
        batch_size: Images per forward pass of the box update (default: the data module's).
    """

    def __init__(
        self,
        enabled: bool = False,
        warmup_epochs: int = 20,
        loc_interval: int = 20,
        box_thresh: float = 0.1,
        alpha: float = 0.6,
        batch_size: Optional[int] = None,
    ) -> None:
        if warmup_epochs < 0 or loc_interval < 1:
            raise ValueError(f"need warmup_epochs >= 0 and loc_interval >= 1, got {warmup_epochs}, {loc_interval}")
        if not 0 <= box_thresh < 1 or alpha <= 0:
            raise ValueError(f"need box_thresh in [0, 1) and alpha > 0, got {box_thresh}, {alpha}")
        self.enabled = enabled
        self.warmup_epochs, self.loc_interval = warmup_epochs, loc_interval
        self.box_thresh, self.alpha = box_thresh, alpha
        self.batch_size = batch_size
        self.boxes: CropBoxes | None = None
        self.updated_epochs: list[int] = []  # epochs whose start recomputed the boxes
        self._pending: dict[str, Any] | None = None  # restored before the store exists

    # -- schedule -----------------------------------------------------------------------------
    def is_update_epoch(self, epoch: int) -> bool:
        """Whether the boxes are recomputed at the start of ``epoch`` (0-based)."""
        return epoch >= self.warmup_epochs and (epoch - self.warmup_epochs) % self.loc_interval == 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "enable_contrastive_crop"):
            raise TypeError(f"ContrastiveCrop needs a bam SSLDataModule (it yields image indices and crops around "
                            f"boxes); this trainer's datamodule is {type(datamodule).__name__}")
        self.boxes = datamodule.enable_contrastive_crop(self.alpha)
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        # a run resumed at the start of an update epoch must not recompute what it restored
        if not self.enabled or not self.is_update_epoch(epoch) or epoch in self.updated_epochs:
            return
        self.update(trainer, pl_module)
        self.updated_epochs.append(epoch)
        area = ((self.boxes.boxes[:, 2] - self.boxes.boxes[:, 0]) * (self.boxes.boxes[:, 3] - self.boxes.boxes[:, 1]))
        pl_module.log("contrastive_crop/box_area", area.mean().item(), sync_dist=True)  # equal on every rank
        rank_zero_info(f"ContrastiveCrop: boxes of {len(self.boxes)} images updated at epoch {epoch} "
                       f"(mean box area {area.mean().item():.3f} of the image)")

    # -- the update ---------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Recompute every box: this process's share locally, then gathered from all processes."""
        datamodule = trainer.datamodule
        backbone = locating_backbone(pl_module)
        batch_size = self.batch_size or datamodule.batch_size
        batches = datamodule.heatmap_batches(batch_size, trainer.global_rank, trainer.world_size)
        device = pl_module.device
        rows = local_box_rows(backbone, batches, datamodule.crops.mean, datamodule.crops.std, self.box_thresh,
                              device, trainer.precision_plugin.forward_context)
        everything = gather_rows(rows.to(device)).cpu()
        self.boxes.update(everything[:, 1:].float(), everything[:, 0].long())

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.boxes is None:
            return {"updated_epochs": list(self.updated_epochs)}
        return {**self.boxes.state_dict(), "updated_epochs": list(self.updated_epochs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.boxes is None:
            self._pending = dict(state_dict)  # setup() has not created the store yet
        else:
            self._restore(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        self.updated_epochs = list(state.get("updated_epochs", []))
        if "boxes" in state and self.boxes is not None:
            self.boxes.load_state_dict(state)


def locating_backbone(pl_module: pl.LightningModule) -> nn.Module:
    """The backbone whose heat maps locate the objects: the teacher's if any, else the student's."""
    for name in ("teacher", "student"):
        encoder = getattr(pl_module, name, None)
        if encoder is not None:
            return getattr(encoder, "backbone", encoder)
    backbone = getattr(pl_module, "backbone", None)
    if backbone is None:
        raise TypeError(f"ContrastiveCrop cannot find a backbone on {type(pl_module).__name__}: expected a "
                        f"`teacher` or `student` encoder with a `.backbone` (bam's SSLMethod) or a `.backbone`")
    return backbone


def local_box_rows(
    backbone: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    thresh: float,
    device: torch.device,
    precision_context: Callable[[], ContextManager] = nullcontext,
) -> Tensor:
    """``(n, 5)`` float64 rows ``index, x0, y0, x1, y1`` for the images of ``batches``.

    The backbone runs in eval mode (batch norm with its running statistics, no dropout) and
    is put back in its previous mode afterwards. float64 keeps indices exact through the gather.
    """
    was_training = backbone.training
    backbone.eval()
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    rows = [torch.zeros(0, 5, dtype=torch.float64)]
    try:
        for images, indices in batches:
            images = (images.to(device).float() / 255 - mean_t) / std_t
            with precision_context():  # the trainer's autocast (bf16/fp16 runs)
                boxes = compute_boxes(backbone, images, thresh)
            rows.append(torch.cat([indices.double().unsqueeze(1), boxes.double().cpu()], dim=1))
    finally:
        backbone.train(was_training)
    return torch.cat(rows)
