"""What a pruning run has done so far, as data.

A checkpoint is this state (with the network's, hypernet's and optimizer's tensors beside
it); a resumed run reads it back and skips every finished stage and epoch. Nothing here
knows about networks or Ray: the stages (``passray.stages``, ``passray.search``) read and
write it, the driver (``passray.pipeline``) saves it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["STAGES", "RunState", "SearchRecord", "kept_indices", "masks_from_kept"]

STAGES = ("pretrain", "search", "finetune", "done")


@dataclass
class SearchRecord:
    """The PASS search's memory across epochs (and restarts): its start, its reference, its best."""

    best_accuracy: float = -1.0  # masked val of the best masks so far (the start's, before any epoch)
    best_kept: list[list[int]] | None = None  # kept unit indices per group of those masks
    best_trained: dict[str, dict[str, torch.Tensor]] | None = None  # head and prompt of that epoch
    initial_kept: list[list[int]] | None = None  # the prior's masks, where search starts
    taylor_kept: list[int] | None = None  # widths global Taylor keeps at the same budget (a reference)


@dataclass
class RunState:
    """Stage and epoch last finished, step count, per-epoch history, results, and the chosen masks."""

    stage: str | None = None
    epoch: int = -1
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    search: SearchRecord = field(default_factory=SearchRecord)

    def done(self, stage: str, epoch: int | None = None) -> bool:
        """Was this stage (or this epoch of it) finished before the state was saved?"""
        if self.stage is None:
            return False
        here, there = STAGES.index(stage), STAGES.index(self.stage)
        return here < there or (here == there and epoch is not None and epoch <= self.epoch)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunState":
        data = dict(data)
        search = SearchRecord(**data.pop("search", {}))
        return cls(**data, search=search)


def kept_indices(masks: list[torch.Tensor]) -> list[list[int]]:
    """Hard masks -> kept unit indices per group (how masks are stored and compared)."""
    return [torch.nonzero(m > 0.5).flatten().tolist() for m in masks]


def masks_from_kept(kept: list[list[int]], widths: list[int], device: torch.device | str) -> list[torch.Tensor]:
    """Kept unit indices per group -> 0/1 float masks of the groups' widths."""
    return [torch.zeros(w, device=device).index_fill_(0, torch.as_tensor(k, dtype=torch.long, device=device), 1.0)
            for w, k in zip(widths, kept)]
