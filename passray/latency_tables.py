"""Latency tables: every prunable layer timed (or estimated) at a grid of widths.

Every conv/linear layer is rebuilt standalone (same kernel, stride, padding; depthwise
stays depthwise) at kept counts {1/grid, ..., grid/grid} of each dimension pruning can
change, and timed on its traced input shape at the serving batch size and dtype; a norm
layer is timed with a ReLU after it (the elementwise op that follows a norm in almost
every CNN). The dense net and a uniformly half-pruned copy are timed too, and fix a
scale and a constant (``_calibrate``). JSON, cached under ``~/.cache/passray/latency/``.
On a GPU, prune with ``budget.round_to`` >= 8: the grid's widths are multiples of 8
there, and misaligned widths can run slower than dense (ResNet-18, H200, bf16).
Without a measured table, ``analytic_table`` estimates one from a roofline;
``python -m passray.profile`` measures and caches one.
"""
from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from passray.cost import is_depthwise, trace_layer_shapes, traced_forward
from passray.groups import ChannelGroups, build_groups
from passray.latency import (DTYPES, LatencyTable, LayerTable, attach, cache_path, example_batch, prepared_copy,
                             table_key, time_ms)

__all__ = ["ROOFLINES", "LayerSpec", "analytic_table", "build_table", "inspect_layers", "load_or_build_table"]

_log = logging.getLogger(__name__)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}  # by input rank

# Analytic fallback: (sustained MACs/ms, bytes/ms, launch overhead per kernel in ms). Rough figures for an
# H200-class GPU and a 2-core x86 CPU; only their ratios shape a predicted latency *ratio*.
ROOFLINES: dict[tuple[str, str], tuple[float, float, float]] = {
    ("cuda", "bf16"): (2.5e11, 3.5e9, 0.006), ("cuda", "fp32"): (1.0e11, 3.5e9, 0.006),
    ("cpu", "fp32"): (1.0e8, 1.0e7, 0.03), ("cpu", "bf16"): (5.0e7, 1.0e7, 0.03)}


@dataclass(frozen=True)
class LayerSpec:
    """One tabled cost-model column: what to rebuild and time, and which dimensions vary."""

    name: str
    module: nn.Module
    kind: str  # "conv" | "depthwise" | "linear" | "norm"
    out_size: int
    in_size: int
    vary_in: bool
    vary_out: bool
    input_shape: tuple[int, ...]  # one sample's input, traced in the dense net
    out_positions: int  # output positions per sample and channel


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, _CONVS):
        return "depthwise" if is_depthwise(module) else "conv"
    return "linear" if isinstance(module, nn.Linear) else "norm" if isinstance(module, _NORMS) else None


def _record_input(inputs: dict[str, tuple[int, ...]], name: str, module: nn.Module, args: tuple, out: Any) -> None:
    inputs.setdefault(name, tuple(args[0].shape[1:]))


@torch.no_grad()
def inspect_layers(groups: ChannelGroups) -> tuple[list[list[Any]], list[LayerSpec]]:
    """The cost model's columns ``[name, out, in]`` (its order: ``CostModel.build``'s) and the tabled layers.

    Call before physical pruning: it reads the dense model that ``groups.cost`` describes.
    """
    model, cost = groups.model, groups.cost
    example = torch.zeros(1, *groups.input_shape, device=next(model.parameters()).device)
    inputs: dict[str, tuple[int, ...]] = {}
    traced_forward(model, example, {n: functools.partial(_record_input, inputs, n)
                                    for n, m in model.named_modules() if _kind(m)})
    shapes = trace_layer_shapes(model, example)
    names = [n for n, m in model.named_modules() if n in shapes or any(True for _ in m.parameters(recurse=False))]
    if len(names) != cost.out_size.numel():
        raise RuntimeError(f"{len(names)} modules but {cost.out_size.numel()} cost-model columns: was the model pruned?")
    columns = [[n, int(o), int(i)] for n, o, i in zip(names, cost.out_size.tolist(), cost.in_size.tolist())]
    specs = []
    for col, (name, out_size, in_size) in enumerate(columns):
        module, kind = model.get_submodule(name), _kind(model.get_submodule(name))
        if kind is None or name not in inputs:
            continue  # no table: its time stays in the constant
        shape = inputs[name]
        positions = shapes[name].spatial if name in shapes else math.prod(shape) // max(shape[0], 1)
        specs.append(LayerSpec(name, module, kind, out_size, in_size, bool(cost.a_in[:, col].any()),
                               bool(cost.a_out[:, col].any()), shape, positions))
    return columns, specs


def _counts(spec: LayerSpec, size: int, grid: int, vary: bool) -> list[int]:
    """Kept counts to time: k/grid of ``size``, in multiples of a grouped conv's groups (its pruned
    form keeps every conv group, each narrower: ``groups.ChannelGroup`` ties them)."""
    step = spec.module.groups if spec.kind == "conv" else 1
    return [max(step, round(k * size / grid / step) * step) for k in range(1, grid + 1)] if vary else [size]


def _standalone(spec: LayerSpec, cin: int, cout: int) -> tuple[nn.Module, tuple[int, ...]]:
    """The layer rebuilt with ``cin``/``cout`` kept channels, and one sample's input shape for it."""
    m, shape = spec.module, list(spec.input_shape)
    if spec.kind == "linear":
        shape[-1] = cin
        return nn.Linear(cin, cout, bias=m.bias is not None), tuple(shape)
    if spec.kind == "norm":
        shape[0] = cout
        return nn.Sequential(_BN[len(shape) + 1](cout), nn.ReLU()), tuple(shape)
    cin, groups = (cout, cout) if spec.kind == "depthwise" else (cin, m.groups)
    shape[0] = cin
    return _CONVS[len(m.kernel_size) - 1](cin, cout, m.kernel_size, m.stride, m.padding, m.dilation, groups,
                                          m.bias is not None, m.padding_mode), tuple(shape)


def build_table(groups: ChannelGroups, backbone: str, batch_size: int = 256, dtype: str = "fp32",
                device: torch.device | str = "cpu", grid: int = 8, repeats: int = 5, channels_last: bool = False,
                calibrate: bool = True) -> LatencyTable:
    """Measure a latency table for the dense network ``groups`` describes (see the module docstring)."""
    if grid < 2 or dtype not in DTYPES or batch_size < 1:
        raise ValueError(f"need grid >= 2, batch_size >= 1 and dtype in {list(DTYPES)}; got {grid}, {batch_size}, {dtype!r}")
    device = torch.device(device)
    columns, specs = inspect_layers(groups)
    layers = {}
    for spec in specs:
        ins, outs = _counts(spec, spec.in_size, grid, spec.vary_in), _counts(spec, spec.out_size, grid, spec.vary_out)
        memo: dict[tuple[int, int], float] = {}
        for cin, cout in ((ci, co) for ci in ins for co in outs if (ci, co) not in memo):
            module, shape = _standalone(spec, cin, cout)
            module = prepared_copy(module, device, dtype, channels_last)
            x = example_batch(shape, batch_size, device, dtype, channels_last)
            memo[cin, cout] = time_ms(lambda: module(x), device, repeats)
        layers[spec.name] = LayerTable(spec.kind, ins, outs, [[memo[ci, co] for co in outs] for ci in ins])
    x = example_batch(groups.input_shape, batch_size, device, dtype, channels_last)

    def forward(model: nn.Module) -> float:
        net = prepared_copy(model, device, dtype, channels_last)
        return time_ms(lambda: net(x), device, repeats)

    key = table_key(columns, backbone, groups.input_shape, batch_size, dtype, device, channels_last)
    table = LatencyTable(key, "measured", columns, layers, 0.0, forward(groups.model),
                         {"grid": grid, "repeats": repeats, "torch": torch.__version__})
    table.rest_ms = max(0.0, table.dense_measured_ms - table.dense_ms)
    if calibrate:
        _calibrate(table, groups, forward)
    return table


def _calibrate(table: LatencyTable, groups: ChannelGroups, forward: Callable[[nn.Module], float]) -> None:
    """Fit ``measured = scale * sum(layer tables) + rest`` through the dense net and a uniformly half-pruned copy.

    Standalone timings miss what happens between a network's layers (adds, pools, fresh
    activations out of cache, launch gaps), and part of it shrinks with the channels: a
    constant remainder alone predicted 1.43x for ResNet-8 on a CPU where 2.2x was measured;
    on an H200 at batch 256 the standalone sum was 2.8x the launch-bound real forward.
    """
    pruned = build_groups(prepared_copy(groups.model, next(groups.model.parameters()).device, "fp32"),
                          groups.input_shape[-1])
    if pruned.names != groups.names or pruned.widths != groups.widths:  # groups built with other ignored layers
        _log.warning("latency calibration skipped: the groups of a copy differ from the given groups")
        return
    half = [max(1, round(w / 2)) for w in groups.widths]
    pruned.prune([torch.arange(w) < k for w, k in zip(groups.widths, half)])
    bare = attach(groups.cost, replace(table, rest_ms=0.0))
    s_dense, s_half = bare.cost(torch.stack([groups.cost.widths, torch.tensor(half).double()]), "latency").tolist()
    m_dense, m_half = table.dense_measured_ms, forward(pruned.model)
    if not (s_dense > s_half and m_dense > m_half):
        _log.warning("latency timings look inconsistent (half width not faster): time on a quiet machine, fewer threads")
    scale = (m_dense - m_half) / (s_dense - s_half) if s_dense > s_half and m_dense > m_half else 1.0
    scale = min(scale, m_dense / s_dense)  # the constant rest stays >= 0
    for t in table.layers.values():
        t.ms = [[v * scale for v in row] for row in t.ms]
    table.rest_ms = max(0.0, m_dense - scale * s_dense)
    table.meta["calibration"] = {"scale": scale, "half_kept": half, "half_measured_ms": m_half,
                                 "half_predicted_ms": scale * s_half + table.rest_ms}


def _analytic_ms(spec: LayerSpec, cin: int, cout: int, batch: int, elem: int, roof: tuple[float, float, float]) -> float:
    """Roofline sum for one layer: MACs/peak + bytes/bandwidth + launch overhead (bilinear in cin, cout)."""
    (macs_per_ms, bytes_per_ms, overhead_ms), in_positions = roof, math.prod(spec.input_shape) / spec.in_size
    acts_out = batch * spec.out_positions * cout
    if spec.kind == "norm":  # norm + activation: each reads and writes the activation once
        return 4 * acts_out * elem / bytes_per_ms + 2 * overhead_ms
    m = spec.module
    kernel = 1 if spec.kind == "linear" else math.prod(m.kernel_size)
    if spec.kind == "depthwise":
        weights, acts_in = cout * kernel, batch * in_positions * cout
    else:
        weights, acts_in = cout * cin * kernel / (1 if spec.kind == "linear" else m.groups), batch * in_positions * cin
    macs = batch * spec.out_positions * weights
    return macs / macs_per_ms + (acts_in + acts_out + weights) * elem / bytes_per_ms + overhead_ms


def analytic_table(groups: ChannelGroups, backbone: str, batch_size: int = 256, dtype: str = "fp32",
                   device: torch.device | str = "cpu", channels_last: bool = False,
                   roofline: tuple[float, float, float] | None = None) -> LatencyTable:
    """The no-measurement fallback: roofline times on a 2-point grid (exact, the model being bilinear)."""
    device = torch.device(device)
    roof = roofline or ROOFLINES[("cuda" if device.type == "cuda" else "cpu", dtype)]
    columns, specs = inspect_layers(groups)
    elem = torch.finfo(DTYPES[dtype]).bits // 8
    layers = {}
    for spec in specs:
        ins, outs = _counts(spec, spec.in_size, 2, spec.vary_in), _counts(spec, spec.out_size, 2, spec.vary_out)
        layers[spec.name] = LayerTable(spec.kind, ins, outs, [[_analytic_ms(spec, ci, co, batch_size, elem, roof)
                                                               for co in outs] for ci in ins])
    tabled = {s.name for s in specs}
    untabled = sum(1 for n, m in groups.model.named_modules() if not list(m.children()) and n not in tabled)
    key = table_key(columns, backbone, groups.input_shape, batch_size, dtype, device, channels_last)
    return LatencyTable(key, "analytic", columns, layers, untabled * roof[2], None, {"roofline": list(roof)})


def load_or_build_table(groups: ChannelGroups, backbone: str, batch_size: int = 256, dtype: str = "fp32",
                        device: torch.device | str = "cpu", channels_last: bool = False, source: str = "auto",
                        cache_dir: str | Path | None = None, grid: int = 8, repeats: int = 5) -> LatencyTable:
    """The table a run should use. ``source``: "measure" -- the cached table for this key, else time now and
    cache; "auto" -- cached, else the analytic fallback (never times by surprise: trials sharing a GPU would
    time each other); "analytic"; or a path from ``passray.profile`` (any device's: profile the target)."""
    if source not in ("auto", "measure", "analytic"):
        return LatencyTable.load(source)
    columns, _ = inspect_layers(groups)
    key = table_key(columns, backbone, groups.input_shape, batch_size, dtype, device, channels_last)
    dist, text = torch.distributed, None
    shared = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if source != "analytic" and (not shared or dist.get_rank() == 0):
        path = cache_path(key, cache_dir)
        table = LatencyTable.load(path) if path.is_file() else None
        if table is not None and table.key != key:
            raise ValueError(f"{path}: latency table of another key ({table.key}); delete it or pass its path")
        if table is None and source == "measure":
            table = build_table(groups, backbone, batch_size, dtype, device, grid, repeats, channels_last)
            table.save(path)
        text = json.dumps(table.to_dict()) if table is not None else None
    if shared:  # rank 0's table everywhere: ranks timing on their own would allocate different masks
        box = [text]
        dist.broadcast_object_list(box, src=0)
        text = box[0]
    if text:
        return LatencyTable.from_dict(json.loads(text))
    if source == "auto":
        _log.warning("no latency table for %s; using the analytic roofline fallback (python -m passray.profile "
                     "measures one)", key)
    return analytic_table(groups, backbone, batch_size, dtype, device, channels_last)
