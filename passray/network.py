"""The network the loops train: prompt -> backbone, with channel gates on the backbone.

Masks are an argument, never state left on the network: ``net(x, masks)`` gates the
backbone for that one forward pass (``ChannelGroups.gated``), ``net(x)`` runs it ungated
(dense, or physically pruned). ``Masked`` binds fixed masks for the loops that call
``model(x)``; the PASS search binds its pruner the same way (``passray.search``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from passray.groups import ChannelGroups
from passray.prompts import VisualPrompt

__all__ = ["Masked", "PrunableNet"]


class PrunableNet(nn.Module):
    def __init__(self, backbone: nn.Module, prompt: VisualPrompt) -> None:
        super().__init__()
        self.backbone = backbone
        self.prompt = prompt
        self.groups: ChannelGroups | None = None  # not a module: holds Torch-Pruning's graph

    def attach(self, groups: ChannelGroups) -> None:
        """The channel groups that ``masks`` in ``forward`` refer to."""
        self.groups = groups

    def forward(self, x: torch.Tensor, masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        if masks is None:
            return self.backbone(self.prompt(x))
        assert self.groups is not None, "attach(groups) before a masked forward"
        with self.groups.gated(masks):
            return self.backbone(self.prompt(x))


class Masked(nn.Module):
    """``net`` under fixed hard masks: what evaluation, BN recalibration and head training run."""

    def __init__(self, net: PrunableNet, masks: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.net = net
        self.masks = [m.detach() for m in masks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.masks)
