"""The projection head between backbone features and the objective's embedding space."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

PROJECTOR_INITS = ("pytorch", "trunc_normal")
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


@dataclass(frozen=True)
class ProjectorSettings:
    """The settings of the projection MLP (`Projector`), BAM's ViT defaults (the authors'): 3
    layers, 4096 hidden, 4096 out, GELU, bias, no batch norm. Small CNNs need `batch_norm=True` to
    leave the uniform-attention start (loss at log N).

    Args:
        hidden_dim: width of the hidden layers.
        out_dim: the embedding's dimension (the objective's input).
        num_layers: linear layers, in -> hidden -> ... -> out (0, for the methods that allow it:
            no projector, the objective reads the backbone's features).
        activation: between the layers: one of `ACTIVATIONS` (gelu, relu, silu).
        batch_norm: batch norm after every hidden layer.
        last_batch_norm: batch norm (without affine parameters) after the last layer.
        bias: the linear layers have biases.
        init: "pytorch" keeps `nn.Linear`'s default (Kaiming-uniform weights and biases);
            "trunc_normal" draws the weights from a normal of std 0.02 truncated at +-2 (absolute
            bounds, so in effect untruncated) and zeroes the biases, as the authors' projector
            (their `models/heads.py`) does.
    """

    hidden_dim: int = 4096
    out_dim: int = 4096
    num_layers: int = 3
    activation: str = "gelu"
    batch_norm: bool = False
    last_batch_norm: bool = False
    bias: bool = True
    init: str = "pytorch"

    def __post_init__(self) -> None:
        if self.num_layers < 0:
            raise ValueError(f"projector.num_layers={self.num_layers} must be >= 0")
        if self.init not in PROJECTOR_INITS:
            raise ValueError(f"unknown projector init {self.init!r}; choose from {PROJECTOR_INITS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown projector activation {self.activation!r}; choose from {sorted(ACTIVATIONS)}")


# SwAV's head (Caron et al., NeurIPS 2020), which DeepCluster-v2 and SeLa-v2 share: 2048 -> 128, 2 layers,
# batch norm, ReLU
SWAV_PROJECTOR = ProjectorSettings(hidden_dim=2048, out_dim=128, num_layers=2, activation="relu", batch_norm=True)
# DINO's head MLP (Caron et al., ICCV 2021): 2048 wide, 3 layers, GELU, no batch norm, to a 256-d
# bottleneck, weights drawn as DINO draws them
DINO_PROJECTOR = ProjectorSettings(hidden_dim=2048, out_dim=256, num_layers=3, init="trunc_normal")

# The settings' keys before they were gathered into one `ProjectorSettings` (the methods' `projector`):
# configs, command lines and checkpoints written before name them so.
FLAT_PROJECTOR_KEYS = {
    "proj_hidden_dim": "hidden_dim", "proj_out_dim": "out_dim", "proj_layers": "num_layers",
    "proj_activation": "activation", "proj_batch_norm": "batch_norm", "proj_last_batch_norm": "last_batch_norm",
    "proj_bias": "bias", "proj_init": "init",
}


def with_projector_gathered(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A method's settings (a checkpoint's `hyper_parameters`, keyword arguments) with the flat
    `proj_*` keys of before moved into the `projector` group, which keeps the values it has."""
    flat = {FLAT_PROJECTOR_KEYS[key]: value for key, value in hparams.items() if key in FLAT_PROJECTOR_KEYS}
    gathered = {key: value for key, value in hparams.items() if key not in FLAT_PROJECTOR_KEYS}
    if flat:  # over the group's values: each names one setting, the group may be only the defaults
        given = gathered.get("projector")
        gathered["projector"] = {**(vars(given) if isinstance(given, ProjectorSettings) else given or {}), **flat}
    return gathered


class Projector(nn.Sequential):
    """MLP of `settings.num_layers` (at least 1) linear layers: in -> hidden -> ... -> out (see
    `ProjectorSettings`)."""

    def __init__(self, in_dim: int, settings: ProjectorSettings = ProjectorSettings()) -> None:
        if settings.num_layers < 1:
            raise ValueError(f"the projector needs at least 1 layer, got num_layers={settings.num_layers}")
        num_layers = settings.num_layers
        dims = [in_dim] + [settings.hidden_dim] * (num_layers - 1) + [settings.out_dim]
        layers: list[nn.Module] = []
        for index, (d_in, d_out) in enumerate(zip(dims, dims[1:])):
            last = index == num_layers - 1
            layers.append(nn.Linear(d_in, d_out, bias=settings.bias))
            if (settings.batch_norm and not last) or (last and settings.last_batch_norm):
                layers.append(nn.BatchNorm1d(d_out, affine=not last))
            if not last:
                layers.append(ACTIVATIONS[settings.activation]())
        super().__init__(*layers)
        self.out_dim = settings.out_dim
        if settings.init == "trunc_normal":
            for linear in (layer for layer in layers if isinstance(layer, nn.Linear)):
                nn.init.trunc_normal_(linear.weight, std=0.02, a=-2.0, b=2.0)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)


class DINOHead(nn.Module):
    """DINO's head (Caron et al., ICCV 2021): an MLP to a bottleneck, L2-normalisation, and a
    weight-normalised, bias-free linear layer to `out_dim` logits.

    The MLP is a `Projector` of the settings `mlp` (DINO's by default, `DINO_PROJECTOR`); its
    `out_dim` is the bottleneck's dimension. The last layer is weight-normalised
    (`torch.nn.utils.parametrizations.weight_norm`: each output row is a direction times a gain);
    with `norm_last_layer` the gains are fixed at 1 (not trained), so the logits are cosines of
    the bottleneck with `out_dim` unit vectors, which the paper found stabler. `self.last_layer`
    is what a method freezes for the first epoch.
    """

    def __init__(
        self, in_dim: int, out_dim: int = 65536, mlp: ProjectorSettings = DINO_PROJECTOR, norm_last_layer: bool = True
    ) -> None:
        super().__init__()
        self.mlp = Projector(in_dim, mlp)
        self.last_layer = weight_norm(nn.Linear(mlp.out_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)
        self.out_dim = out_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(features), dim=-1))
