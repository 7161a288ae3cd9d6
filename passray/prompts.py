"""Visual prompts: a learnable perturbation added to every (normalised) input image.

The prompt adapts the frozen backbone's input to the downstream data *and* is read by
the hypernet's prompt encoder, so it conditions every layer's pruning decision.
Which pixels are learnable is a fixed 0/1 mask per kind; V starts at zero so the
prompted network starts as the plain one.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from passray._registry import Registry
from passray.config import PromptConfig

__all__ = ["VisualPrompt", "available_prompts", "create_prompt", "register_prompt"]

_REGISTRY: Registry[Callable[[int, int], torch.Tensor | None]] = Registry("prompt")
register_prompt = _REGISTRY.register


@register_prompt("none")
def _none(image_size: int, size: int) -> None:
    return None


@register_prompt("pad")
def _pad(image_size: int, size: int) -> torch.Tensor:
    if 2 * size >= image_size:
        raise ValueError(f"prompt.size={size}: a pad border must be narrower than half the image ({image_size})")
    mask = torch.ones(image_size, image_size)
    mask[size:-size, size:-size] = 0
    return mask


@register_prompt("patch")
def _patch(image_size: int, size: int) -> torch.Tensor:
    if size > image_size:
        raise ValueError(f"prompt.size={size} is larger than the image ({image_size})")
    mask = torch.zeros(image_size, image_size)
    mask[:size, :size] = 1
    return mask


@register_prompt("full")
def _full(image_size: int, size: int) -> torch.Tensor:
    return torch.ones(image_size, image_size)


def available_prompts() -> list[str]:
    return _REGISTRY.names()


class VisualPrompt(nn.Module):
    """x -> x + V * M, with V learnable and M the kind's pixel mask."""

    def __init__(self, kind: str, size: int, image_size: int, channels: int = 3) -> None:
        super().__init__()
        self.kind, self.size, self.image_size = kind, size, image_size
        mask = _REGISTRY.get(kind)(image_size, size)
        self.register_buffer("mask", mask, persistent=False)
        self.values = nn.Parameter(torch.zeros(channels, image_size, image_size)) if mask is not None else None

    @property
    def enabled(self) -> bool:
        return self.values is not None

    def tensor(self) -> torch.Tensor | None:
        """The effective prompt (V*M), what the hypernet's encoder reads."""
        return None if self.values is None else self.values * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.values is None:
            return x
        if x.shape[-2:] != self.mask.shape:
            raise ValueError(f"prompt built for {tuple(self.mask.shape)} images, got input {tuple(x.shape)}")
        return x + self.tensor().to(x.dtype)


def create_prompt(cfg: PromptConfig, image_size: int) -> VisualPrompt:
    return VisualPrompt(cfg.kind, cfg.size, image_size)
