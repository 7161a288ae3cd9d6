"""Latency as a budget: per-layer lookup tables, and a ``CostModel`` that answers "latency".

MACs are a poor proxy for speed: a layer can be launch-, memory- or tile-bound, so
halving its MACs may save nothing (ResNet-18/CIFAR, H200, bf16, batch 2048: half the
MACs ran 1.11x faster, a half-*latency* budget from a table ran 2.04x, predicted 2.02x).
A table holds every conv/linear layer's time at a grid of kept (in, out) counts, every
norm layer's time (norm + the elementwise op after it) at a grid of kept channels, and a
constant for the rest; ``passray.profile`` measures it and calibrates it against the real
network. Prediction is bilinear interpolation per layer, written as batched ``torch``
ops over ``[N, G]`` candidates, so the allocator treats "latency" like "macs": every
candidate at once, no host sync.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from passray.cost import CostModel
from passray._state_io import write_atomically

__all__ = ["SCHEMA", "LatencyCostModel", "LatencyTable", "LayerTable", "attach", "cache_path", "example_batch",
           "measure_speedup", "prepared_copy", "table_key", "time_ms"]

SCHEMA = "passray.latency/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class LayerTable:
    """Milliseconds of one layer at kept ``in_counts[i]`` x ``out_counts[j]`` channels (``ms[i][j]``). A
    dimension pruning never changes (RGB input, classes, a depthwise conv's or norm's input) has one count."""

    kind: str  # "conv" | "depthwise" | "linear" | "norm"
    in_counts: list[int]
    out_counts: list[int]
    ms: list[list[float]]

    @property
    def dense_ms(self) -> float:
        return self.ms[-1][-1]


@dataclass
class LatencyTable:
    """A device's per-layer latency model of one backbone at one batch size and dtype."""

    key: dict[str, Any]  # device, backbone, input, batch_size, dtype, channels_last, layers (shape hash)
    source: str  # "measured" | "analytic"
    columns: list[list[Any]]  # [name, out_size, in_size] in the cost model's column order
    layers: dict[str, LayerTable]
    rest_ms: float  # everything not in a layer table, constant under pruning
    dense_measured_ms: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # grid, repeats, torch version: for readers

    @property
    def dense_ms(self) -> float:
        """Predicted dense latency (ms per batch)."""
        return sum(t.dense_ms for t in self.layers.values()) + self.rest_ms

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "key": self.key, "source": self.source, "columns": self.columns,
                "layers": {n: vars(t) for n, t in self.layers.items()}, "rest_ms": self.rest_ms,
                "dense_measured_ms": self.dense_measured_ms, "meta": self.meta}

    @classmethod
    def from_dict(cls, data: Any, origin: str = "table") -> "LatencyTable":
        """Validate and build; anything malformed is one-line ``ValueError`` naming ``origin``."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{origin}: not a passray latency table (schema {found!r}, expected {SCHEMA!r})")
        try:
            layers = {str(n): LayerTable(str(t["kind"]), [int(c) for c in t["in_counts"]],
                                         [int(c) for c in t["out_counts"]], [[float(v) for v in row] for row in t["ms"]])
                      for n, t in data["layers"].items()}
            table = cls(dict(data["key"]), str(data["source"]), [[str(c[0]), int(c[1]), int(c[2])] for c in data["columns"]],
                        layers, float(data["rest_ms"]), data.get("dense_measured_ms"), dict(data.get("meta", {})))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise ValueError(f"{origin}: malformed passray latency table ({type(err).__name__}: {err})") from None
        names = {c[0] for c in table.columns}
        grid = max([len(c) for t in layers.values() for c in (t.in_counts, t.out_counts)] + [2])
        for name, t in [*table.layers.items(), ("rest_ms", LayerTable("rest", [0], [0], [[table.rest_ms]]))]:
            if ((name not in names and name != "rest_ms") or {len(t.in_counts), len(t.out_counts)} - {1, grid}
                    or len(t.ms) != len(t.in_counts) or any(len(r) != len(t.out_counts) for r in t.ms)
                    or not all(math.isfinite(v) and v >= 0 for r in t.ms for v in r)):
                raise ValueError(f"{origin}: malformed passray latency table ({name!r}: unknown layer, counts not 1 "
                                 f"or {grid} per dimension, ms not {len(t.in_counts)}x{len(t.out_counts)}, or a bad time)")
        return table

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (a concurrent reader never sees half a file)."""
        return write_atomically(Path(path).expanduser(), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: corrupt latency table ({type(err).__name__}: {err})") from None
        return cls.from_dict(data, str(path))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), platform.machine())
    return f"cpu:{cpu}:{torch.get_num_threads()}threads"


def table_key(columns: list[list[Any]], backbone: str, input_shape: tuple[int, ...], batch_size: int, dtype: str,
              device: torch.device | str, channels_last: bool = False) -> dict[str, Any]:
    """What a table is valid for; ``layers`` hashes the column shapes (width multiplier, head size)."""
    shapes = hashlib.sha256(json.dumps(columns).encode()).hexdigest()[:12]
    return {"device": _device_name(torch.device(device)), "backbone": backbone, "input": list(input_shape),
            "batch_size": int(batch_size), "dtype": dtype, "channels_last": bool(channels_last), "layers": shapes}


def cache_path(key: dict[str, Any], cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` or $PASSRAY_LATENCY_CACHE or ``~/.cache/passray/latency``, then the key's hash."""
    root = Path(cache_dir or os.environ.get("PASSRAY_LATENCY_CACHE") or "~/.cache/passray/latency").expanduser()
    return root / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"


# ---------------------------------------------------------------- prediction
def _bracket(grid: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper grid index and interpolation weight of every ``x`` ([L, K] grid, [N, L] x -> [L, N]).

    Weights outside [0, 1] extrapolate linearly (below the smallest timed width); equal
    neighbouring counts (a fixed dimension) get weight 0, their values being equal.
    """
    xt = x.T.contiguous()
    hi = torch.searchsorted(grid, xt).clamp(1, grid.shape[1] - 1)
    lo_v, hi_v = grid.gather(1, hi - 1), grid.gather(1, hi)
    span = hi_v - lo_v
    weight = torch.where(span > 0, (xt - lo_v) / span.clamp(min=1e-12), torch.zeros_like(xt))
    return hi, weight


class LatencyCostModel(CostModel):
    """A ``CostModel`` that also answers kind ``"latency"`` (predicted ms per batch).

    "macs"/"params" are the wrapped model's; the allocator needs nothing else, so a
    latency budget is the same bisection-free search over candidates.
    """

    def __init__(self, base: CostModel, cols: torch.Tensor, in_grid: torch.Tensor, out_grid: torch.Tensor,
                 ms: torch.Tensor, rest: torch.Tensor) -> None:
        super().__init__(base.out_size, base.in_size, base.a_out, base.a_in, base.widths, base.terms, base.unit_channels)
        self.cols = cols  # [L] cost-model column of each layer table
        self.in_grid, self.out_grid = in_grid, out_grid  # [L, K] kept counts, non-decreasing
        self.ms = ms  # [L, K, K]
        self.rest = rest  # 0-dim

    def to(self, device: torch.device | str) -> "LatencyCostModel":
        tables = (self.cols, self.in_grid, self.out_grid, self.ms, self.rest)
        return LatencyCostModel(CostModel.to(self, device), *(t.to(device) for t in tables))

    def cost(self, kept: torch.Tensor, kind: str = "macs") -> torch.Tensor:
        if kind != "latency":
            if kind not in self.terms:
                raise ValueError(f"unknown budget kind {kind!r}; choose one of {', '.join([*self.terms, 'latency'])}")
            return super().cost(kept, kind)
        removed = self.widths.to(kept.dtype) - kept
        out = (self.out_size - removed @ self.a_out)[:, self.cols]  # [N, L]
        inp = (self.in_size - removed @ self.a_in)[:, self.cols]
        i_hi, wi = _bracket(self.in_grid, inp)
        o_hi, wo = _bracket(self.out_grid, out)
        k = self.ms.shape[-1]
        flat = self.ms.flatten(1)  # [L, K*K]
        value = lambda i, o: flat.gather(1, i * k + o)  # noqa: E731
        per_layer = ((1 - wi) * ((1 - wo) * value(i_hi - 1, o_hi - 1) + wo * value(i_hi - 1, o_hi))
                     + wi * ((1 - wo) * value(i_hi, o_hi - 1) + wo * value(i_hi, o_hi)))
        return per_layer.clamp(min=0).sum(0) + self.rest


def _expand(counts: list, k: int) -> list:
    return counts * k if len(counts) == 1 else counts


def attach(cost: CostModel, table: LatencyTable) -> LatencyCostModel:
    """``cost`` plus a latency kind from ``table``; the table must describe the same network.

    Columns are matched by module name and checked against the cost model's dimensions, so
    a table of another backbone, width or head size is refused rather than misapplied.
    """
    sizes = list(zip(cost.out_size.long().tolist(), cost.in_size.long().tolist()))
    mine = [(c[1], c[2]) for c in table.columns]
    if mine != sizes:
        raise ValueError(f"latency table ({table.key.get('backbone')}, {len(mine)} columns) does not match this "
                         f"network's cost model ({len(sizes)} columns): profile this backbone again")
    index = {c[0]: i for i, c in enumerate(table.columns)}
    k = max([len(c) for t in table.layers.values() for c in (t.in_counts, t.out_counts)] + [2])  # validated: 1 or k
    names = list(table.layers)
    in_grid = torch.tensor([_expand(table.layers[n].in_counts, k) for n in names], dtype=torch.float64)
    out_grid = torch.tensor([_expand(table.layers[n].out_counts, k) for n in names], dtype=torch.float64)
    ms = torch.tensor([[_expand(row, k) for row in _expand(table.layers[n].ms, k)] for n in names], dtype=torch.float64)
    cols = torch.tensor([index[n] for n in names], dtype=torch.long)
    return LatencyCostModel(cost, cols, in_grid.reshape(-1, k), out_grid.reshape(-1, k), ms.reshape(-1, k, k),
                            torch.tensor(table.rest_ms, dtype=torch.float64))


# ---------------------------------------------------------------- timing
def _calibrate(fn: Callable[[], Any], device: torch.device, warmup: int, min_ms: float) -> int:
    """Warm up, then the number of back-to-back calls that one timing sample should span."""
    for _ in range(warmup):
        fn()
    once = _sample(fn, device, 1)
    return max(1, min(10_000, math.ceil(min_ms / max(once, 1e-6))))


def _sample(fn: Callable[[], Any], device: torch.device, number: int) -> float:
    """Milliseconds per call over ``number`` back-to-back calls (CUDA events on a GPU)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if device.type == "cuda" else []
    start = time.perf_counter()
    if events:
        events[0].record()
    for _ in range(number):
        fn()
    if events:
        events[1].record()
        events[1].synchronize()
        return events[0].elapsed_time(events[1]) / number
    return (time.perf_counter() - start) * 1e3 / number


@torch.no_grad()
def time_ms(fn: Callable[[], Any], device: torch.device | str, repeats: int = 5, warmup: int = 2,
            min_ms: float = 1.0) -> float:
    """Milliseconds of one call: the median of ``repeats`` samples on a GPU, their minimum on a CPU.

    A shared CPU host's noise is one-sided (preemption and steal time only add time,
    in bursts longer than a sample), so the minimum is the estimate of the layer's own
    cost there; a GPU's samples are steady and the median is the typical serving time.
    """
    device = torch.device(device)
    number = _calibrate(fn, device, warmup, min_ms)
    return _reduce(device)([_sample(fn, device, number) for _ in range(max(1, repeats))])


def _reduce(device: torch.device) -> Callable[[list[float]], float]:
    return min if device.type == "cpu" else statistics.median


def example_batch(input_shape: tuple[int, ...], batch_size: int, device: torch.device | str, dtype: str,
                  channels_last: bool = False) -> torch.Tensor:
    x = torch.randn(batch_size, *input_shape, device=device, dtype=DTYPES[dtype])
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def prepared_copy(net: nn.Module, device: torch.device | str, dtype: str, channels_last: bool = False) -> nn.Module:
    """An eval-mode copy on ``device`` in ``dtype`` without forward hooks: channel gates
    (or other instrumentation) would time work the deployed network does not do."""
    net = copy.deepcopy(net).to(device=device, dtype=DTYPES[dtype]).eval()
    for module in net.modules():
        module._forward_hooks.clear()
    return net.to(memory_format=torch.channels_last) if channels_last else net


@torch.no_grad()
def measure_speedup(dense_net: nn.Module, pruned_net: nn.Module, input_shape: tuple[int, ...], batch_size: int,
                    dtype: str = "fp32", device: torch.device | str = "cpu", repeats: int = 10,
                    channels_last: bool = False) -> dict[str, Any]:
    """Measured inference time of both nets (copies; the originals are untouched) and the speed-up.

    ``input_shape`` is one sample's (C, H, W). Samples of the two nets alternate, so drift
    on a busy machine hits both alike; reduced as in ``time_ms`` (median; minimum on a CPU).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device = torch.device(device)
    x = example_batch(input_shape, batch_size, device, dtype, channels_last)
    nets = [prepared_copy(n, device, dtype, channels_last) for n in (dense_net, pruned_net)]
    calls = [lambda n=n: n(x) for n in nets]
    numbers = [_calibrate(fn, device, warmup=3, min_ms=2.0) for fn in calls]
    samples: list[list[float]] = [[], []]
    for _ in range(max(1, repeats)):
        for i, fn in enumerate(calls):
            samples[i].append(_sample(fn, device, numbers[i]))
    dense_ms, pruned_ms = (_reduce(device)(s) for s in samples)
    return {"dense_ms": dense_ms, "pruned_ms": pruned_ms, "speedup": dense_ms / pruned_ms,
            "batch_size": batch_size, "dtype": dtype, "device": str(device), "repeats": repeats}
