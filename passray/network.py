"""The network the loops train: prompt -> backbone, with channel gates on the backbone.

During PASS search the masks are recomputed by the pruner on every forward pass, so a
DDP wrapper around this module sees one ordinary module whose forward produces the
loss's dependence on hypernet, prompt encoder and prompt alike.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from passray.groups import ChannelGroups
from passray.hypernet import PassPruner
from passray.prompts import VisualPrompt

__all__ = ["PrunableNet"]


class PrunableNet(nn.Module):
    def __init__(self, backbone: nn.Module, prompt: VisualPrompt) -> None:
        super().__init__()
        self.backbone = backbone
        self.prompt = prompt
        self.pruner: PassPruner | None = None
        self.groups: ChannelGroups | None = None  # not a module: holds Torch-Pruning's graph

    def attach(self, groups: ChannelGroups, pruner: PassPruner | None = None) -> None:
        """Gate the backbone through ``groups``; with a pruner, masks follow the hypernet every step."""
        self.groups = groups
        self.pruner = pruner

    def fix_masks(self, masks: Sequence[torch.Tensor] | None) -> None:
        """Freeze the masks (the pruner stops driving them)."""
        assert self.groups is not None, "attach(groups) before fixing masks"
        self.pruner = None
        self.groups.set_masks(None if masks is None else [m.detach() for m in masks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pruner is not None:
            self.groups.set_masks(self.pruner(self.prompt.tensor()))
        return self.backbone(self.prompt(x))
