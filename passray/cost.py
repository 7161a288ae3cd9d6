"""MACs and parameter counts of a network as a function of how many channels each group keeps.

Every conv/linear/norm dimension is affine in the per-group kept counts k (a dimension
loses ``r`` entries per removed group unit: ``r`` > 1 after a flatten, or when grouped convs
tie G channels into one unit), so each cost is
``sum_l a_l*out_l*in_l + b_l*out_l + c_l*in_l + d_l``. Evaluating it for many candidate k
at once is a few matrix products, which is what lets the allocator test every threshold
in one shot on the GPU without a host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = ["LAYERS", "CostModel", "LayerShape", "is_depthwise", "layer_dims", "trace_layer_shapes", "traced_forward"]

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def is_depthwise(module: nn.Module) -> bool:
    """One filter per channel: in = out = groups, so in- and out-channels are one dimension."""
    return isinstance(module, LAYERS[:3]) and module.groups == module.in_channels == module.out_channels > 1


@dataclass(frozen=True)
class LayerShape:
    spatial: int  # output positions per sample (H*W for a conv, tokens for a linear)


def traced_forward(model: nn.Module, example_input: torch.Tensor,
                   hooks: dict[str, Callable[[nn.Module, tuple, Any], None]]) -> None:
    """One eval-mode, no-grad forward pass with a forward hook on each named module; the hooks are
    removed and the training mode restored afterwards (a train-mode pass would move BN statistics)."""
    handles = [model.get_submodule(name).register_forward_hook(hook) for name, hook in hooks.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def trace_layer_shapes(model: nn.Module, example_input: torch.Tensor) -> dict[str, LayerShape]:
    """Output positions per sample of every conv/linear layer, from one forward pass (in execution order)."""
    shapes: dict[str, LayerShape] = {}
    batch = example_input.shape[0]

    def record(name: str) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            channels = out.shape[-1] if isinstance(mod, nn.Linear) else out.shape[1]
            shapes[name] = LayerShape(spatial=out.numel() // (batch * channels))
        return hook

    traced_forward(model, example_input, {n: record(n) for n, m in model.named_modules() if isinstance(m, LAYERS)})
    return shapes


def layer_dims(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, LAYERS):
        return module.out_channels, module.in_channels
    weight = getattr(module, "weight", None)
    size = weight.shape[0] if weight is not None and weight.dim() >= 1 else 0
    return size, size


class CostModel:
    """Exact conv/linear MACs and parameter counts under per-group kept counts."""

    def __init__(self, out_size: torch.Tensor, in_size: torch.Tensor, a_out: torch.Tensor, a_in: torch.Tensor,
                 widths: torch.Tensor, terms: dict[str, torch.Tensor],
                 unit_channels: torch.Tensor | None = None) -> None:
        self.out_size, self.in_size = out_size, in_size  # [M]
        self.a_out, self.a_in = a_out, a_in  # [G, M]: entries removed per removed group unit
        self.widths = widths  # [G] units per group
        self.terms = terms  # kind -> [4, M] coefficients (bilinear, out, in, const)
        # [G] channels per unit (None: one each); min_channels and round_to count channels, not units
        self.unit_channels = torch.ones_like(widths) if unit_channels is None else unit_channels

    @classmethod
    def build(cls, model: nn.Module, shapes: dict[str, LayerShape], groups) -> "CostModel":
        names = [n for n, m in model.named_modules() if n in shapes or any(True for _ in m.parameters(recurse=False))]
        index = {n: i for i, n in enumerate(names)}
        n_mod, n_grp = len(names), len(groups)
        a_out = torch.zeros(n_grp, n_mod, dtype=torch.float64)
        a_in = torch.zeros(n_grp, n_mod, dtype=torch.float64)
        controlled_out = set()
        for gi, group in enumerate(groups):
            for it in group.items:
                if it.module not in index:
                    continue
                target = a_out if it.dim == "out" else a_in
                target[gi, index[it.module]] += len(it.idxs) / group.width
                if it.dim == "out":
                    controlled_out.add(it.module)
        out_size = torch.zeros(n_mod, dtype=torch.float64)
        in_size = torch.zeros(n_mod, dtype=torch.float64)
        terms = {k: torch.zeros(4, n_mod, dtype=torch.float64) for k in ("macs", "params")}
        for name in names:
            i, module = index[name], model.get_submodule(name)
            out_size[i], in_size[i] = layer_dims(module)
            cls._add_terms(module, name, i, shapes, terms, controlled_out)
        widths = torch.tensor([g.width for g in groups], dtype=torch.float64)
        return cls(out_size, in_size, a_out, a_in, widths, terms,
                   torch.tensor([g.unit_channels for g in groups], dtype=torch.float64))

    @staticmethod
    def _add_terms(module: nn.Module, name: str, i: int, shapes: dict[str, LayerShape],
                   terms: dict[str, torch.Tensor], controlled_out: set[str]) -> None:
        depthwise = is_depthwise(module)
        if isinstance(module, LAYERS):
            groups = 1 if isinstance(module, nn.Linear) else module.groups
            kernel = module.weight[0, 0].numel()
            per_position = (1, kernel) if depthwise else (0, kernel / groups)  # (row, coefficient)
            if name in shapes:  # layers that never run (aux heads in eval mode) cost no MACs, but have weights
                terms["macs"][per_position[0], i] += per_position[1] * shapes[name].spatial
            terms["params"][per_position[0], i] += per_position[1]
        out_channels = layer_dims(module)[0]
        for pname, p in module.named_parameters(recurse=False):
            if pname == "weight" and isinstance(module, LAYERS):
                continue
            if name in controlled_out and p.dim() >= 1 and p.shape[0] == out_channels:
                terms["params"][1, i] += p.numel() / out_channels
            else:
                terms["params"][3, i] += p.numel()

    def to(self, device: torch.device | str) -> "CostModel":
        move = lambda t: t.to(device)  # noqa: E731
        return CostModel(move(self.out_size), move(self.in_size), move(self.a_out), move(self.a_in),
                         move(self.widths), {k: move(v) for k, v in self.terms.items()}, move(self.unit_channels))

    def cost(self, kept: torch.Tensor, kind: str = "macs") -> torch.Tensor:
        """Cost for each row of ``kept`` ([N, G] channels kept per group) -> [N]."""
        if kind not in self.terms:
            raise ValueError(f"unknown budget kind {kind!r}; choose one of {', '.join(self.terms)}")
        out, inp = self.layer_sizes(kept)
        t = self.terms[kind]
        return (out * inp) @ t[0] + out @ t[1] + inp @ t[2] + t[3].sum()

    def layer_sizes(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Out- and in-sizes ([N, M] each) of every layer column for each row of ``kept`` ([N, G])."""
        removed = self.widths.to(kept.dtype) - kept
        return self.out_size - removed @ self.a_out, self.in_size - removed @ self.a_in

    def marginal(self, kept: torch.Tensor, kind: str = "macs") -> torch.Tensor:
        """[G]: cost saved by removing one more channel of each group from ``kept`` ([G])."""
        kept = kept.to(self.widths.dtype)
        fewer = kept[None, :] - torch.eye(len(kept), dtype=kept.dtype, device=kept.device)
        costs = self.cost(torch.cat([kept[None], fewer]), kind)
        return (costs[0] - costs[1:]).clamp(min=0)

    def dense(self, kind: str = "macs") -> float:
        return float(self.cost(self.widths[None], kind)[0])

    def unit_steps(self, round_to: int) -> torch.Tensor:
        """[G]: the fewest units whose channels are a multiple of ``round_to`` (kept counts move in these steps)."""
        units = self.unit_channels.long()
        return (round_to // torch.gcd(units, torch.full_like(units, round_to))).to(self.widths.dtype)

    def floor(self, min_channels: int, round_to: int = 1) -> torch.Tensor:
        """[G]: the fewest units a group may keep: ``min_channels`` channels rounded up to a step, at most all."""
        step = self.unit_steps(round_to)
        units = torch.ceil(min_channels / self.unit_channels)
        return torch.minimum(torch.ceil(units / step) * step, self.widths)

    def minimum(self, kind: str, min_channels: int, round_to: int = 1) -> float:
        return float(self.cost(self.floor(min_channels, round_to)[None], kind)[0])
