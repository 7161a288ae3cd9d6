"""PASS: a recurrent hypernetwork that maps layer weight statistics and a visual prompt to
channel scores, and straight-through masks from the shared allocator.

What was chosen and why (H200 probes and the 3-seed table in benchmarks/results/quality_v2.md):
- **The LSTM reads the network.** Each group's sorted, resampled weight statistics (plus its
  width, depth and per-channel MACs) form one LSTM step, in execution order; the initial state
  (h0, c0) = g_w(V) comes from the prompt encoder, so the prompt conditions every decision.
  Fixed-length inputs let one hypernet run on any backbone.
- **Channel identity.** A sorted summary cannot say *which* channel to keep, so one small scorer
  shared by all layers reads each channel's own features (its kernel/BN statistics standardised
  in its group, its rank, its prior) with its layer's hidden state h_g. The old per-*width*
  mappers tied channel i of unrelated layers together. Nothing depends on widths: a hypernet
  scores backbones of any width.
- **Prior + residual.** z = exp(a_g) * prior + b_g + r(features, h_g), with (a_g, b_g) from h_g
  (the layer's allocation) and r (single channels); all start at zero, so the first masks are
  exactly the prior's through the same allocator and the search is judged by what it adds.
  ``prior: taylor`` starts from the strongest baseline's masks, ``l1`` from near-uniform L1.
- **The gradient a score gets** (what made the old search fall below its start):
  1. *Leak.* Gates sit before the activation and ReLU'(0) = 0, so with exact zeros no gradient
     ever reached a dropped channel: the search could only drop channels. During search a dropped
     channel passes 1e-4 of its output; its gradient is then what bringing it back is worth.
  2. *Dropped channels only* (``estimator: dropped``). At m = 1 the gradient of a trained,
     miscalibrated network says "shrink" for every channel near the logits; straight-through on
     kept channels collapsed whole stages to the floor within an epoch.
  3. *Budget projection.* The allocator re-balances any score change to meet the budget, so a
     push on every dropped channel only says where to spend, loudest in wide groups. The part
     along the budget direction is removed: what remains is "keep c instead of channels of equal
     cost". Without it the masks never moved (overlap with the start stayed 1.0).
  4. *Sampling.* Logistic noise of scale T on the scores before the allocator (budget still
     exact) drops channels near the threshold at times, so kept ones get measured too; T anneals
     0.2 -> 0.05 and the sampling fades into the deterministic masks that are evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from passray.budget import Allocation, Allocator
from passray.config import HypernetConfig
from passray.groups import ChannelGroups
from passray.step_graph import in_step_graph

__all__ = ["PassHypernet", "PassPruner", "channel_features", "create_pass_pruner", "global_priors", "group_statistics",
           "load_hypernet", "magnitude_priors", "save_hypernet", "standardised"]

SCHEMA_VERSION = 2
STATISTICS = ("l1", "l2", "mean", "std", "norm_weight", "norm_bias")
_EXTRA = ("log_width", "position", "log_channel_macs")
CHANNEL_FEATURES = tuple(f"{s}_in_group" for s in STATISTICS) + ("l1_rank", "prior")


def _per_channel(groups: ChannelGroups, group) -> torch.Tensor:
    """[len(STATISTICS), width]: kernel statistics of the group's out-channels, averaged over its layers
    (and over the channels of a unit, where grouped convs tie them: masks and scores are per unit)."""
    sums = torch.zeros(len(STATISTICS), group.channels)
    counts = torch.zeros(2, group.channels)
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
    return group.to_units(sums)


def standardised(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Zero mean, unit standard deviation along ``dim`` (a constant row becomes zeros)."""
    return (x - x.mean(dim, keepdim=True)) / x.std(dim, unbiased=False, keepdim=True).clamp(min=1e-8)


def group_statistics(groups: ChannelGroups, length: int) -> torch.Tensor:
    """[G, len(STATISTICS) * length + 3]: the LSTM's input, one row per group.

    Sorted per-channel statistics resampled to a fixed length, log width, relative depth and
    log MACs per channel, standardised across the network's groups so the hypernet sees
    comparable inputs on any backbone.
    """
    rows = []
    n = len(groups)
    per_channel_macs = groups.cost.marginal(groups.cost.widths, "macs").float().cpu()
    for gi, group in enumerate(groups.groups):
        per_channel = _per_channel(groups, group).sort(dim=1).values
        resampled = F.interpolate(per_channel[None], size=length, mode="linear", align_corners=True)[0]
        extra = torch.tensor([float(group.width), 1.0 + gi / max(n - 1, 1), float(per_channel_macs[gi]) + 1.0]).log()
        rows.append(torch.cat([resampled.flatten(), extra]))
    return standardised(torch.stack(rows), dim=0)


def magnitude_priors(groups: ChannelGroups) -> list[torch.Tensor]:
    """Per-group z-scored L1 magnitudes: equal distributions per group, so global ~ uniform L1."""
    return [standardised(_per_channel(groups, group)[0]) for group in groups.groups]


def global_priors(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Scores made comparable as log values z-scored over *all* channels: the global ranking (and so
    the allocator's masks) is the scores' own, the scale is what the hypernet's residual adds to."""
    flat = torch.cat([s.float().clamp(min=0) for s in scores])
    logs = (flat + 1e-3 * flat.mean().clamp(min=1e-12)).log()
    return list(standardised(logs).split([len(s) for s in scores]))


def channel_features(groups: ChannelGroups, priors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[sum of widths, len(CHANNEL_FEATURES)]: what the scorer reads about each channel."""
    rows = []
    for group, prior in zip(groups.groups, priors):
        stats = _per_channel(groups, group)
        rank = stats[0].argsort().argsort().float() / max(group.width - 1, 1)
        rows.append(torch.cat([standardised(stats, dim=1), rank[None], prior.float()[None]]).T)
    return torch.cat(rows)


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
    """theta + w: group statistics [G, D], channel features [N, F] (+ prompt) -> scores [N].

    Nothing in it depends on the backbone's widths: one hypernet scores any backbone whose
    statistics have its ``stats_dim``.
    """

    def __init__(self, stats_dim: int, hidden_size: int = 64, recurrent: bool = True, use_prompt: bool = True,
                 stats_length: int = 16, embed_dim: int = 64, scorer_size: int = 32, prior: str = "l1") -> None:
        super().__init__()
        self.spec: dict[str, Any] = dict(
            stats_dim=stats_dim, hidden_size=hidden_size, recurrent=recurrent, use_prompt=use_prompt,
            stats_length=stats_length, embed_dim=embed_dim, scorer_size=scorer_size, prior=prior,
            statistics=list(STATISTICS) + list(_EXTRA), channel_features=list(CHANNEL_FEATURES),
            schema_version=SCHEMA_VERSION)
        self.embed = nn.Sequential(nn.Linear(stats_dim, embed_dim), nn.ReLU())
        if use_prompt:
            self.encoder = _PromptEncoder(hidden_size)
        else:
            self.initial = nn.Parameter(torch.zeros(2, hidden_size))
        if recurrent:
            self.cell = nn.LSTM(embed_dim, hidden_size)
        else:
            self.cell = nn.Sequential(nn.Linear(embed_dim + hidden_size, hidden_size), nn.Tanh())
        self.group_head = nn.Linear(hidden_size, 2)  # per-group log-gain of the prior and shift
        self.scorer_channel = nn.Linear(len(CHANNEL_FEATURES), scorer_size)
        self.scorer_layer = nn.Linear(hidden_size, scorer_size, bias=False)
        self.scorer_out = nn.Linear(scorer_size, 1)
        for layer in (self.group_head, self.scorer_out):  # zero residual at the start: masks = the prior's
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

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

    def forward(self, stats: torch.Tensor, features: torch.Tensor, group_index: torch.Tensor,
                prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of all channels of all groups, flat ([N], groups one after another)."""
        h = self.hidden_states(stats, prompt)
        log_gain, shift = self.group_head(h).index_select(0, group_index).unbind(dim=1)
        hidden = torch.relu(self.scorer_channel(features) + self.scorer_layer(h).index_select(0, group_index))
        residual = self.scorer_out(hidden).squeeze(1)
        return torch.exp(log_gain) * features[:, -1] + shift + residual


# A dropped channel passes this fraction of its output during search. Gates sit before the
# activation, and ReLU'(0) = 0: with an exact zero no gradient ever reaches a dropped channel's
# mask, so search could only ever drop channels, never learn to bring one back. With a tiny leak
# the gradient is the loss's sensitivity to adding the channel's activation back, and the forward
# pass differs from the hard-masked network by 1e-4 of the dropped channels' outputs.
_LEAK = 1e-4


class _MaskGradient(torch.autograd.Function):
    """Hard masks forward; backward, the sigmoid straight-through gradient projected onto score moves
    that keep the (soft) budget constant.

    The allocator re-balances any score change to meet the budget exactly, so a gradient that
    raises every group's scores (every dropped channel would help a little) only says *where* to
    spend, and summed over a wide group it says so loudest. Removing its component along the
    budget direction leaves the exchange: keep channel c instead of others worth its cost.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, tau: torch.Tensor, hard: torch.Tensor, cost: torch.Tensor | None,
                temperature: torch.Tensor, dropped_only: bool) -> torch.Tensor:
        soft = torch.sigmoid((z - tau) / temperature)
        ctx.save_for_backward(soft * (1 - soft) / temperature, cost, hard)
        ctx.dropped_only = dropped_only
        return (hard + _LEAK * (1 - hard)).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        slope, cost, hard = ctx.saved_tensors
        if ctx.dropped_only:
            grad = grad * (hard < 0.5)
        w2 = slope * slope
        if cost is not None:
            lam = (w2 * cost * grad).sum() / (w2 * cost * cost).sum().clamp(min=1e-30)
            grad = grad - lam * cost
        return slope * grad, None, None, None, None, None


class PassPruner(nn.Module):
    """A hypernet bound to one backbone's groups: prompt -> straight-through masks meeting the budget.

    ``priors`` default to per-group z-scored L1 magnitudes; ``sample`` draws training masks from the
    noisy scores (see the module docstring). Noise is seeded by step, so DDP ranks agree.

    ``cuda_graph``: on one GPU, the whole differentiable mask computation (hypernet, allocator,
    straight-through masks; forward and backward) is captured once as a CUDA graph and replayed
    every step. It is the same computation, launched as two graphs instead of hundreds of tiny
    kernels that left the GPU waiting on the host. Temperature and noise are inputs of the graph.
    Not under DDP: there the capture fails (cudaErrorStreamCaptureInvalidated on H200 x2, NCCL's
    watchdog thread queries events while ``make_graphed_callables`` captures in global mode).
    """

    def __init__(self, hypernet: PassHypernet, groups: ChannelGroups, allocator: Allocator,
                 priors: Sequence[torch.Tensor] | None = None, temperature: float = 0.2, sample: bool = False,
                 seed: int = 0, project: bool = True, estimator: str = "dropped", cuda_graph: bool = False) -> None:
        super().__init__()
        self.hypernet = hypernet
        self.allocator = allocator
        self.widths = groups.widths
        self.register_buffer("temperature_t", torch.tensor(float(temperature)), persistent=False)
        self.sample = sample
        self.project = project
        self.estimator = estimator
        self.cuda_graph = cuda_graph
        self.seed, self.step = seed, 0
        self._generator: torch.Generator | None = None
        self._graphed: Any = None  # the captured mask computation and its static noise input
        stats = group_statistics(groups, hypernet.spec["stats_length"])
        if stats.shape[1] != hypernet.spec["stats_dim"]:
            raise ValueError(f"hypernet expects {hypernet.spec['stats_dim']} statistics per group, got {stats.shape[1]} "
                             f"(it was made with another statistics spec)")
        priors = magnitude_priors(groups) if priors is None else list(priors)
        self.register_buffer("stats", stats, persistent=False)
        self.register_buffer("features", channel_features(groups, priors), persistent=False)
        index = torch.repeat_interleave(torch.arange(len(self.widths)), torch.tensor(self.widths))
        self.register_buffer("group_index", index, persistent=False)
        self.register_buffer("_noise_t", torch.zeros(len(index)), persistent=False)
        self.last: Allocation | None = None  # the latest forward's; a replayed step graph refills its capture's

    @property
    def temperature(self) -> float:
        return float(self.temperature_t)

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.temperature_t.fill_(value)  # in place: a captured graph reads this tensor

    def scores(self, prompt: torch.Tensor | None) -> torch.Tensor:
        """[N] scores in fp32 even under autocast: bf16 scores would tie and reorder channels."""
        with torch.autocast(self.stats.device.type, enabled=False):
            return self.hypernet(self.stats, self.features, self.group_index, None if prompt is None else prompt.float())

    def _noise(self) -> torch.Tensor:
        """Logistic(0, T) noise for this step's scores, seeded by (seed, step)."""
        device = self.stats.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        self._generator.manual_seed(self.seed * 1_000_003 + self.step)
        self.step += 1
        u = torch.rand(self.group_index.shape, generator=self._generator, device=device).clamp_(1e-6, 1 - 1e-6)
        return (u.log() - (-u).log1p()) * self.temperature_t

    def forward(self, prompt: torch.Tensor | None) -> list[torch.Tensor]:
        noise = None
        if self.sample and self.training:  # captured in a whole-step graph: the noise buffer, refilled each replay
            noise = self._noise_t if _capturing(self.stats) else self._noise()
        if self._graphable(prompt):
            out = self._replay(prompt, noise)
        else:
            out = self._flat_masks(self.scores(prompt), noise)
        return self._record(*out)

    def before_replay(self) -> None:
        """A captured step (``passray.step_graph``) replays: this step's noise goes where the graph reads it."""
        if self.sample and self.training:
            self._noise_t.copy_(self._noise())

    def _masks(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Deterministic straight-through masks from given scores (no sampling)."""
        return self._record(*self._flat_masks(z, None))

    def _flat_masks(self, z: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(straight-through masks, hard masks, kept, thresholds, ratio), masks flat over all groups."""
        if noise is not None:
            z = z + noise
        allocation = self.allocator(list(z.split(self.widths)))
        tau = allocation.thresholds.to(z.dtype).index_select(0, self.group_index)
        cost = None
        if self.project:
            cost = self.allocator.cost.marginal(allocation.kept, self.allocator.budget.kind)
            cost = (cost / cost.mean().clamp(min=1e-30)).to(z.dtype).index_select(0, self.group_index)
        hard = torch.cat(allocation.masks)
        masks = _MaskGradient.apply(z, tau, hard, cost, self.temperature_t, self.estimator == "dropped")
        return masks, hard, allocation.kept, allocation.thresholds, allocation.ratio

    def _record(self, masks: torch.Tensor, hard: torch.Tensor, kept: torch.Tensor, thresholds: torch.Tensor,
                ratio: torch.Tensor) -> list[torch.Tensor]:
        self.last = Allocation(list(hard.split(self.widths)), kept, thresholds, ratio)
        return list(masks.split(self.widths))

    @torch.no_grad()
    def hard_masks(self, prompt: torch.Tensor | None) -> Allocation:
        return self.allocator(list(self.scores(prompt).split(self.widths)))

    # ------------------------------------------------------------------ CUDA graph
    def _graphable(self, prompt: torch.Tensor | None) -> bool:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return (self.cuda_graph and self.training and prompt is not None and prompt.is_cuda
                and torch.is_grad_enabled() and not distributed and not in_step_graph())

    def _replay(self, prompt: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        if self._graphed is None:
            static_noise = torch.zeros(self.group_index.shape, device=prompt.device)
            sample = (prompt.detach().requires_grad_(prompt.requires_grad), static_noise)
            # Scores are fp32 under autocast anyway; capture refuses autocast's weight cache. Warm-up and
            # capture advance nothing (no noise step, no parameter update, no gradient accumulated).
            with torch.autocast("cuda", enabled=False):
                graphed = torch.cuda.make_graphed_callables(_GraphedMasks(self), sample, allow_unused_input=True)
            self._graphed = (graphed, static_noise)
        graphed, static_noise = self._graphed
        if noise is None:
            static_noise.zero_()
        else:
            static_noise.copy_(noise)
        return graphed(prompt, static_noise)


def _capturing(t: torch.Tensor) -> bool:
    """Is ``t``'s CUDA stream being captured (by ``passray.step_graph``)? Never asks CUDA for a CPU tensor."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class _GraphedMasks(nn.Module):
    """The pruner's differentiable mask computation as one module (its parameters: the hypernet's)."""

    def __init__(self, pruner: PassPruner) -> None:
        super().__init__()
        self.hypernet = pruner.hypernet
        object.__setattr__(self, "pruner", pruner)  # not a submodule: the graph's parameters are the hypernet's

    def forward(self, prompt: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.pruner._flat_masks(self.pruner.scores(prompt), noise)


def create_pass_pruner(groups: ChannelGroups, cfg: HypernetConfig, allocator: Allocator, use_prompt: bool,
                       hypernet: PassHypernet | None = None, priors: Sequence[torch.Tensor] | None = None,
                       seed: int = 0) -> PassPruner:
    """A pruner for ``groups``: a fresh hypernet sized by ``cfg``, or a given (e.g. transferred) one."""
    if hypernet is None:
        stats_dim = group_statistics(groups, cfg.stats_length).shape[1]
        hypernet = PassHypernet(stats_dim, cfg.hidden_size, cfg.recurrent, use_prompt, cfg.stats_length, prior=cfg.prior)
    if priors is None and cfg.prior != "l1":  # a Taylor prior needs data: the caller passes ``global_priors``
        priors = [torch.zeros(w) for w in groups.widths]
    return PassPruner(hypernet, groups, allocator, priors, cfg.temperature, cfg.sample, seed, cfg.project_budget,
                      cfg.estimator, cfg.cuda_graph)


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
        if spec.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{config_path}: schema_version {spec.get('schema_version')} != {SCHEMA_VERSION} "
                             "(made by another passray version)")
        hypernet = PassHypernet(spec["stats_dim"], spec["hidden_size"], spec["recurrent"], spec["use_prompt"],
                                spec["stats_length"], spec["embed_dim"], spec["scorer_size"], spec["prior"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{config_path}: not a passray hypernet config ({type(err).__name__}: {err})") from None
    try:
        state = load_file(str(weights_path))
        hypernet.load_state_dict(state, strict=True)
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{weights_path}: does not match {config_path.name} ({str(err).splitlines()[0]})") from None
    return hypernet, spec
