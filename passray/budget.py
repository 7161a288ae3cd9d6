"""The one allocator: channel scores + a budget -> masks that meet it.

PASS and every baseline differ only in the scores they feed in. ``global`` allocation
ranks all channels of all groups together and keeps those above one threshold;
``uniform`` keeps the same fraction of every group. Either way, every candidate
threshold is evaluated at once against the exact cost model and the largest network
within the budget wins, so there is no iterative bisection and no host sync: the
allocator can run inside a training step on the GPU.

Scores and masks have one entry per *unit*: a channel, or the G channels that grouped
convolutions tie together (``groups.ChannelGroup``); ``min_channels`` and ``round_to``
still count channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from passray.cost import CostModel
from passray.config import BudgetConfig

__all__ = ["Allocation", "Allocator"]

_UNIFORM_STEPS = 2048


@dataclass
class Allocation:
    masks: list[torch.Tensor]  # hard 0/1 per group
    kept: torch.Tensor  # [G] units kept per group
    thresholds: torch.Tensor  # [G] score between the last kept and first dropped channel
    ratio: torch.Tensor  # achieved cost / dense cost (0-dim tensor, no sync)


class Allocator:
    """Turns per-group scores into masks meeting ``budget`` under ``cost``."""

    def __init__(self, cost: CostModel, budget: BudgetConfig, device: torch.device | str = "cpu") -> None:
        self.budget = budget
        self.cost = cost.to(device)
        self.device = torch.device(device)
        widths = self.cost.widths.long()
        self.widths = widths
        self._width_list = [int(w) for w in widths.tolist()]
        self.step = self.cost.unit_steps(budget.round_to)  # [G] units (a unit of a grouped conv is G channels)
        self.floor = self.cost.floor(budget.min_channels, budget.round_to)
        self.dense = self.cost.dense(budget.kind)
        self.target = budget.keep_ratio * self.dense
        smallest = float(self.cost.cost(self.floor[None], budget.kind)[0])
        if smallest > self.target:
            raise ValueError(
                f"budget.keep_ratio={budget.keep_ratio} is below what min_channels={budget.min_channels} "
                f"(round_to={budget.round_to}) allows "
                f"({smallest / self.dense:.3f} of dense {budget.kind})")
        cmax = int(widths.max())
        self.valid = torch.arange(cmax, device=self.device)[None, :] < widths[:, None]  # [G, Cmax]
        # Flat positions of real channels in the padded [G, Cmax] layout: gathers/scatters with a
        # fixed index instead of boolean masking, whose data-dependent size forces a host sync.
        self.flat = torch.nonzero(self.valid.flatten()).flatten()

    def __call__(self, scores: list[torch.Tensor]) -> Allocation:
        padded = self._pad(scores)
        if self.budget.allocation == "global":
            candidates = self._global_candidates(padded)
        else:
            candidates = self._uniform_candidates()
        kept = self._pick(candidates)
        return self._masks(padded, kept)

    def _pad(self, scores: list[torch.Tensor]) -> torch.Tensor:
        if len(scores) != len(self.widths):
            raise ValueError(f"expected scores for {len(self.widths)} groups, got {len(scores)}")
        flat = torch.full((self.valid.numel(),), float("-inf"), device=self.device)
        flat = flat.index_copy(0, self.flat, torch.cat([s.detach().float().to(self.device) for s in scores]))
        return flat.view(self.valid.shape)

    def _round(self, counts: torch.Tensor) -> torch.Tensor:
        """Round up to ``round_to`` channels, then clamp to [min_channels, width]; counts are [N, G] units."""
        counts = torch.ceil(counts / self.step) * self.step
        return torch.minimum(torch.maximum(counts, self.floor), self.widths.to(counts.dtype))

    def _global_candidates(self, padded: torch.Tensor) -> torch.Tensor:
        """Kept counts for every threshold equal to one of the scores: [N, G]."""
        ascending = padded.sort(dim=1).values  # -inf padding first
        thresholds = padded.flatten()[self.flat]  # [N], every score is a candidate threshold
        below = torch.searchsorted(ascending, thresholds[None, :].expand(len(ascending), -1).contiguous())
        counts = (padded.shape[1] - below).T.to(torch.float64)  # channels with score >= threshold
        return self._round(counts)

    def _uniform_candidates(self) -> torch.Tensor:
        fractions = torch.linspace(0, 1, _UNIFORM_STEPS + 1, device=self.device, dtype=torch.float64)
        return self._round(torch.round(fractions[:, None] * self.widths.to(torch.float64)))

    def _pick(self, candidates: torch.Tensor) -> torch.Tensor:
        """The largest candidate within budget; the all-floor network is always a candidate and fits
        (checked in __init__), so the budget is never exceeded."""
        candidates = torch.cat([candidates, self.floor[None]])
        costs = self.cost.cost(candidates, self.budget.kind)
        costs = torch.where(costs <= self.target * (1 + 1e-9), costs, torch.full_like(costs, -1.0))
        return candidates.index_select(0, torch.argmax(costs)[None])[0]  # plain [argmax] would read it on the host

    def _masks(self, padded: torch.Tensor, kept: torch.Tensor) -> Allocation:
        order = padded.argsort(dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(padded.shape[1], device=self.device).expand_as(order))
        hard = (ranks < kept[:, None]).float()
        descending = padded.gather(1, order)
        k = kept.long().clamp(min=1)
        last_kept = descending.gather(1, (k - 1)[:, None]).squeeze(1)
        first_dropped = descending.gather(1, k.clamp(max=padded.shape[1] - 1)[:, None]).squeeze(1)
        first_dropped = torch.where((k >= self.widths) | torch.isinf(first_dropped), last_kept - 1.0, first_dropped)
        thresholds = (last_kept + first_dropped) / 2
        masks = [row[:w] for row, w in zip(hard, self._width_list)]
        ratio = self.cost.cost(kept[None], self.budget.kind)[0] / self.dense
        return Allocation(masks=masks, kept=kept, thresholds=thresholds, ratio=ratio)
