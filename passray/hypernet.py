"""PASS: a recurrent hypernetwork that maps layer weight statistics and a visual prompt to
channel scores, and straight-through masks from the shared allocator.

Why each piece exists:
- fixed-length statistics per group let one LSTM step over groups of any width, and let a
  trained hypernet run on another backbone (``save_hypernet``/``load_hypernet``);
- the prompt encoder g_w(V) gives the LSTM's initial state, so the prompt conditions every
  layer's decision (``prompt.kind: none`` replaces it by a learned constant state);
- the LSTM carries state from group to group, so a layer's decision can depend on what was
  cut before it (``recurrent: false`` uses a per-group MLP instead, for the ablation);
- scores start at the group's standardised L1 magnitudes (``magnitude_prior``) so the first
  masks are close to uniform L1 and search improves from the strongest simple baseline;
- the hard mask comes from ``budget.Allocator`` each step (budget met exactly), and the
  backward pass uses the gradient of sigmoid((z - tau_g) / T).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from passray.budget import Allocation, Allocator
from passray.config import HypernetConfig
from passray.groups import ChannelGroups

__all__ = ["PassHypernet", "PassPruner", "create_pass_pruner", "group_statistics", "load_hypernet", "magnitude_priors", "save_hypernet"]

SCHEMA_VERSION = 1
STATISTICS = ("l1", "l2", "mean", "std", "norm_weight", "norm_bias")
_EXTRA = ("log_width", "position")


def _per_channel(groups: ChannelGroups, group) -> torch.Tensor:
    """[len(STATISTICS), width]: kernel statistics of the group's out-channels, averaged over its layers."""
    sums = torch.zeros(len(STATISTICS), group.width)
    counts = torch.zeros(2, group.width)
    for module, idxs, root in groups.root_weights(group):
        weight = getattr(module, "weight", None)
        if weight is None or idxs.max() >= weight.shape[0]:
            continue
        w = weight.detach().float().cpu()
        if w.dim() >= 2:  # conv / linear: statistics of each out-channel's kernel
            rows = w[idxs].flatten(1)
            stats = torch.stack([rows.abs().mean(1), rows.pow(2).mean(1).sqrt(), rows.mean(1), rows.std(1, unbiased=False)])
            sums[:4].index_add_(1, root, stats)
            counts[0].index_add_(0, root, torch.ones(len(root)))
        else:  # norm layer: scale and shift
            bias = getattr(module, "bias", None)
            sums[4].index_add_(0, root, w[idxs])
            if bias is not None:
                sums[5].index_add_(0, root, bias.detach().float().cpu()[idxs])
            counts[1].index_add_(0, root, torch.ones(len(root)))
    sums[:4] /= counts[0].clamp(min=1)
    sums[4:] /= counts[1].clamp(min=1)
    return sums


def group_statistics(groups: ChannelGroups, length: int) -> torch.Tensor:
    """[G, len(STATISTICS) * length + 2]: sorted per-channel statistics resampled to a fixed length.

    Standardised across the network's groups so the hypernet sees comparable inputs on any backbone.
    """
    rows = []
    n = len(groups)
    for gi, group in enumerate(groups.groups):
        per_channel = _per_channel(groups, group).sort(dim=1).values
        resampled = F.interpolate(per_channel[None], size=length, mode="linear", align_corners=True)[0]
        extra = torch.tensor([torch.log2(torch.tensor(float(group.width))).item(), gi / max(n - 1, 1)])
        rows.append(torch.cat([resampled.flatten(), extra]))
    stats = torch.stack(rows)
    return (stats - stats.mean(0)) / stats.std(0, unbiased=False).clamp(min=1e-6)


def magnitude_priors(groups: ChannelGroups) -> list[torch.Tensor]:
    """Per-group z-scored L1 magnitudes: equal distributions per group, so global ~ uniform L1."""
    priors = []
    for group in groups.groups:
        l1 = _per_channel(groups, group)[0]
        priors.append((l1 - l1.mean()) / l1.std(unbiased=False).clamp(min=1e-8))
    return priors


class _PromptEncoder(nn.Module):
    """g_w: prompt image -> (h0, c0)."""

    def __init__(self, hidden: int, channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.out = nn.Linear(32 * 16, 2 * hidden)

    def forward(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h0, c0 = self.out(self.features(prompt[None])).chunk(2, dim=-1)
        return torch.tanh(h0), c0


class PassHypernet(nn.Module):
    """theta + w: statistics [G, D] (+ prompt) -> one score vector per group.

    Mappers exist per group width (``"64"``, ``"128"``, ...); groups of one width share one.
    """

    def __init__(self, stats_dim: int, widths: list[int], hidden_size: int = 64, recurrent: bool = True,
                 use_prompt: bool = True, stats_length: int = 16, embed_dim: int = 64) -> None:
        super().__init__()
        self.spec: dict[str, Any] = dict(
            stats_dim=stats_dim, widths=sorted(set(int(w) for w in widths)), hidden_size=hidden_size,
            recurrent=recurrent, use_prompt=use_prompt, stats_length=stats_length, embed_dim=embed_dim,
            statistics=list(STATISTICS) + list(_EXTRA), schema_version=SCHEMA_VERSION)
        self.embed = nn.Sequential(nn.Linear(stats_dim, embed_dim), nn.ReLU())
        if use_prompt:
            self.encoder = _PromptEncoder(hidden_size)
        else:
            self.initial = nn.Parameter(torch.zeros(2, hidden_size))
        if recurrent:
            self.cell = nn.LSTM(embed_dim, hidden_size)
        else:
            self.cell = nn.Sequential(nn.Linear(embed_dim + hidden_size, hidden_size), nn.Tanh())
        self.group_head = nn.Linear(hidden_size, 2)  # per-group shift and log-gain of the prior
        self.mappers = nn.ModuleDict({str(w): nn.Linear(hidden_size, w) for w in self.spec["widths"]})
        for layer in [self.group_head, *self.mappers.values()]:
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        self._index_cache: dict[tuple, dict[int, tuple[list[int], torch.Tensor]]] = {}

    def check_widths(self, widths: list[int]) -> None:
        missing = sorted(set(widths) - set(self.spec["widths"]))
        if missing:
            raise ValueError(f"hypernet has no mapper for group widths {missing} (it covers {self.spec['widths']}); "
                             "it was trained for a different backbone")

    def _initial_state(self, prompt: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec["use_prompt"]:
            if prompt is None:
                raise ValueError("this hypernet reads a prompt, but the prompt kind is 'none'")
            return self.encoder(prompt)
        return self.initial[0:1], self.initial[1:2]

    def hidden_states(self, stats: torch.Tensor, prompt: torch.Tensor | None) -> torch.Tensor:
        """[G, H]: one hidden state per group, in network order."""
        h0, c0 = self._initial_state(prompt)
        e = self.embed(stats)
        if self.spec["recurrent"]:
            out, _ = self.cell(e[:, None, :], (h0[None], c0[None]))
            return out[:, 0, :]
        return self.cell(torch.cat([e, h0.expand(len(e), -1)], dim=1))

    def _members_by_width(self, widths: list[int], device: torch.device) -> dict[int, tuple[list[int], torch.Tensor]]:
        """Groups of each width, with their index tensor made once per device: indexing with a Python
        list copies it to the GPU on every step, and that copy waits for the GPU (a host sync)."""
        key = (tuple(widths), str(device))
        if key not in self._index_cache:
            by_width: dict[int, list[int]] = {}
            for gi, w in enumerate(widths):
                by_width.setdefault(w, []).append(gi)
            self._index_cache[key] = {w: (m, torch.tensor(m, device=device)) for w, m in by_width.items()}
        return self._index_cache[key]

    def forward(self, stats: torch.Tensor, widths: list[int], priors: list[torch.Tensor],
                prompt: torch.Tensor | None = None) -> list[torch.Tensor]:
        h = self.hidden_states(stats, prompt)
        shift, log_gain = self.group_head(h).unbind(dim=1)
        scores: list[torch.Tensor | None] = [None] * len(widths)
        for w, (members, index) in self._members_by_width(widths, h.device).items():
            per_channel = self.mappers[str(w)](h.index_select(0, index))  # [n, w], one matmul per width
            for row, gi in enumerate(members):
                scores[gi] = per_channel[row] + shift[gi] + torch.exp(log_gain[gi]) * priors[gi]
        return scores


class PassPruner(nn.Module):
    """A hypernet bound to one backbone's groups: prompt -> straight-through masks meeting the budget."""

    def __init__(self, hypernet: PassHypernet, groups: ChannelGroups, allocator: Allocator,
                 magnitude_prior: bool = True, temperature: float = 0.5) -> None:
        super().__init__()
        hypernet.check_widths(groups.widths)
        self.hypernet = hypernet
        self.allocator = allocator
        self.widths = groups.widths
        self.temperature = temperature
        self.register_buffer("stats", group_statistics(groups, hypernet.spec["stats_length"]), persistent=False)
        if self.stats.shape[1] != hypernet.spec["stats_dim"]:
            raise ValueError(f"hypernet expects {hypernet.spec['stats_dim']} statistics per group, got {self.stats.shape[1]}")
        priors = magnitude_priors(groups) if magnitude_prior else [torch.zeros(w) for w in self.widths]
        for gi, prior in enumerate(priors):
            self.register_buffer(f"prior_{gi}", prior, persistent=False)
        self.last: Allocation | None = None

    def priors(self) -> list[torch.Tensor]:
        return [getattr(self, f"prior_{gi}") for gi in range(len(self.widths))]

    def scores(self, prompt: torch.Tensor | None) -> list[torch.Tensor]:
        return self.hypernet(self.stats, self.widths, self.priors(), prompt)

    def forward(self, prompt: torch.Tensor | None) -> list[torch.Tensor]:
        scores = self.scores(prompt)
        allocation = self.allocator(scores)
        self.last = allocation
        masks = []
        for gi, (z, hard) in enumerate(zip(scores, allocation.masks)):
            soft = torch.sigmoid((z - allocation.thresholds[gi]) / self.temperature)
            masks.append(hard + soft - soft.detach())
        return masks

    @torch.no_grad()
    def hard_masks(self, prompt: torch.Tensor | None) -> Allocation:
        return self.allocator(self.scores(prompt))


def create_pass_pruner(groups: ChannelGroups, cfg: HypernetConfig, allocator: Allocator, use_prompt: bool,
                       hypernet: PassHypernet | None = None) -> PassPruner:
    """A pruner for ``groups``: a fresh hypernet sized by ``cfg``, or a given (e.g. transferred) one."""
    if hypernet is None:
        stats_dim = group_statistics(groups, cfg.stats_length).shape[1]
        hypernet = PassHypernet(stats_dim, groups.widths, cfg.hidden_size, cfg.recurrent, use_prompt, cfg.stats_length)
    return PassPruner(hypernet, groups, allocator, cfg.magnitude_prior, cfg.temperature)


def save_hypernet(hypernet: PassHypernet, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """``config.json`` (sizes, statistics and prompt spec) + ``model.safetensors``; no pickle."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in hypernet.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({**hypernet.spec, **(extra or {})}, indent=2))
    return directory


def load_hypernet(directory: str | Path) -> tuple[PassHypernet, dict[str, Any]]:
    """Rebuild from ``config.json`` and load ``model.safetensors``; refuses tampered or foreign files."""
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing hypernet file")
    try:
        spec = json.loads(config_path.read_text())
        hypernet = PassHypernet(spec["stats_dim"], spec["widths"], spec["hidden_size"], spec["recurrent"],
                                spec["use_prompt"], spec["stats_length"], spec["embed_dim"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{config_path}: not a passray hypernet config ({type(err).__name__}: {err})") from None
    if spec.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{config_path}: schema_version {spec.get('schema_version')} != {SCHEMA_VERSION}")
    try:
        state = load_file(str(weights_path))
        hypernet.load_state_dict(state, strict=True)
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{weights_path}: does not match {config_path.name} ({str(err).splitlines()[0]})") from None
    return hypernet, spec
