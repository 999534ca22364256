"""The projection head between backbone features and the objective's embedding space."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

PROJECTOR_INITS = ("pytorch", "trunc_normal")
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class Projector(nn.Sequential):
    """MLP of `num_layers` linear layers: in -> hidden -> ... -> out.

    The authors' ViT default is 3 layers, 4096 hidden, 4096 out, GELU, bias, no batch norm. Small
    CNNs need `batch_norm=True` to leave the uniform-attention start (loss at log N).

    `init`: "pytorch" keeps `nn.Linear`'s default (Kaiming-uniform weights and biases);
    "trunc_normal" draws the weights from a normal of std 0.02 truncated at +-2 (absolute bounds,
    so in effect untruncated) and zeroes the biases, as the authors' projector (their
    `models/heads.py`) does.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 4096,
        out_dim: int = 4096,
        num_layers: int = 3,
        activation: str = "gelu",
        batch_norm: bool = False,
        last_batch_norm: bool = False,
        bias: bool = True,
        init: str = "pytorch",
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"the projector needs at least 1 layer, got num_layers={num_layers}")
        if init not in PROJECTOR_INITS:
            raise ValueError(f"unknown projector init {init!r}; choose from {PROJECTOR_INITS}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown projector activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for index, (d_in, d_out) in enumerate(zip(dims, dims[1:])):
            last = index == num_layers - 1
            layers.append(nn.Linear(d_in, d_out, bias=bias))
            if (batch_norm and not last) or (last and last_batch_norm):
                layers.append(nn.BatchNorm1d(d_out, affine=not last))
            if not last:
                layers.append(ACTIVATIONS[activation]())
        super().__init__(*layers)
        self.out_dim = out_dim
        if init == "trunc_normal":
            for linear in (layer for layer in layers if isinstance(layer, nn.Linear)):
                nn.init.trunc_normal_(linear.weight, std=0.02, a=-2.0, b=2.0)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)


class DINOHead(nn.Module):
    """DINO's head (Caron et al., ICCV 2021): an MLP to a bottleneck, L2-normalisation, and a
    weight-normalised, bias-free linear layer to `out_dim` logits.

    The MLP is a `Projector` ending in `bottleneck_dim`, its weights drawn as DINO draws them
    (normal std 0.02, zero biases); `**mlp` are its other settings (`hidden_dim`, 2048 here,
    `num_layers`, `activation`, `batch_norm`), with the Projector's defaults otherwise. The last layer is
    weight-normalised (`torch.nn.utils.parametrizations.weight_norm`: each output row is a
    direction times a gain); with `norm_last_layer` the gains are fixed at 1 (not trained), so the
    logits are cosines of the bottleneck with `out_dim` unit vectors, which the paper found stabler.
    `self.last_layer` is what a method freezes for the first epoch.
    """

    def __init__(
        self, in_dim: int, out_dim: int = 65536, bottleneck_dim: int = 256, norm_last_layer: bool = True, **mlp: Any
    ) -> None:
        super().__init__()
        self.mlp = Projector(in_dim, out_dim=bottleneck_dim, init="trunc_normal", **{"hidden_dim": 2048, **mlp})
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)
        self.out_dim = out_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(features), dim=-1))
