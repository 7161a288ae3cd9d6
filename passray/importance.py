"""Baseline channel scores through Torch-Pruning's importance criteria.

Each baseline only produces scores; the masks come from the same allocator PASS uses
(``budget.Allocator``), so a comparison changes exactly one thing: the scores.
TP's default ``normalizer="mean"`` divides each group by its mean so that a global
threshold compares groups on one scale (TP's own global pruning does the same).
Where grouped convolutions tie channels into units, a unit scores the mean of its
channels' scores (as TP's own pruner does for ``groups > 1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from passray._registry import Registry
from passray.config import METHODS
from passray.groups import ChannelGroups

__all__ = ["Criterion", "available_importances", "compute_scores", "register_importance"]


@dataclass(frozen=True)
class Criterion:
    make: Callable[[], Callable]  # builds a TP importance: group -> [width] scores
    needs_gradients: bool = False


_REGISTRY: Registry[Criterion] = Registry("method")


def register_importance(name: str, criterion: Criterion) -> Criterion:
    """Make ``name`` a baseline ``method`` (configs accept it from now on)."""
    _REGISTRY.register(name)(criterion)
    if name not in METHODS:
        METHODS.append(name)
    return criterion


register_importance("l1", Criterion(lambda: tp.importance.GroupMagnitudeImportance(p=1)))
register_importance("l2", Criterion(lambda: tp.importance.GroupMagnitudeImportance(p=2)))
register_importance("taylor", Criterion(tp.importance.GroupTaylorImportance, needs_gradients=True))
register_importance("random", Criterion(tp.importance.RandomImportance))
register_importance("bn_scale", Criterion(tp.importance.BNScaleImportance))


def available_importances() -> list[str]:
    return _REGISTRY.names()


def _accumulate_gradients(model: nn.Module, batches: Iterable, max_batches: int) -> None:
    """Sum loss gradients over a few batches (Taylor needs weight * grad)."""
    model.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(batches):
        if i >= max_batches:
            break
        F.cross_entropy(model(x), y).backward()


def compute_scores(method: str, groups: ChannelGroups, model: nn.Module | None = None,
                   batches: Iterable | None = None, max_batches: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """Scores for every unit of every group (``[width]`` per group, on CPU).

    ``model``/``batches`` are needed for gradient-based criteria; ``model`` is whatever
    maps the batches to logits (e.g. prompt + backbone) and must contain the groups' modules.
    """
    criterion = _REGISTRY.get(method)
    if criterion.needs_gradients:
        if model is None or batches is None:
            raise ValueError(f"method {method!r} needs a model and training batches for gradients")
        _accumulate_gradients(model, batches, max_batches)
    importance = criterion.make()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # RandomImportance draws from the global generator
    try:
        scores = []
        for group in groups.groups:
            score = importance(group.tp_group)
            if score is None:  # TP returns None for groups it has nothing to measure on
                score = torch.ones(group.width)
            scores.append(group.to_units(torch.nan_to_num(score.detach().float().cpu(), nan=0.0)))
    finally:
        torch.random.set_rng_state(generator_state)
        if criterion.needs_gradients:
            model.zero_grad(set_to_none=True)
    return scores
