"""Probe (#15): where a PASS search step's GPU time goes, and what compiling buys served networks.

Not a benchmark (speed.py is): a one-off to decide what to build. Prints tables and one JSON line.

    python benchmarks/probe_speed.py search     # step variants timed in alternation + kernel tables
    python benchmarks/probe_speed.py search --step-graph   # the same, each step a replayed CUDA graph
    python benchmarks/probe_speed.py serve      # Served uncompiled vs compiled (both graphed), batch 1 and 1024

probe_speed.json was measured before ``Served`` compiled (the compiled modes were built by hand then,
as ``Served(compile=...)`` builds them now) and before training steps were graphed.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ARGS = speed.parse_args(["--results", "/tmp/probe.json"])
NETS = speed.Nets(ARGS)
STEP_GRAPH = "--step-graph" in sys.argv  # steps as replayed CUDA graphs (engine.Step); eager by default


def ms(fn, steps: int = 30) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1000


def kernels(fn, name: str, n: int = 5, rows: int = 25) -> dict:
    """GPU kernel time per step and the top kernels (self device time)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    events = [e for e in p.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.self_device_time_total for e in events) / n
    count = sum(e.count for e in events) / n
    print(f"\n== {name}: {gpu_us / 1000:.3f} ms of kernels per step, {count:.0f} kernels per step", flush=True)
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
        print(f"{e.self_device_time_total / n / 1000:8.3f} ms {e.count / n:6.1f}x  {e.key[:110]}")
    return {"gpu_ms": gpu_us / 1000, "kernels": count}


def search_variant(target: float, bn: str = "batch", masks: str = "pruner", prompt: str = "pad"):
    """``speed.search_step`` with one knob turned: BN mode, where masks come from, prompt on/off."""
    step = speed.search_step(NETS, speed.Case("search", f"pass@{target}", "cuda", 512, "bf16"), DEV, STEP_GRAPH,
                             prompt=prompt)
    searching = step.func.model
    if bn == "frozen":
        for m in searching.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    if masks == "fixed":  # the hypernet gets no gradient: the optimizer skips it
        searching.fixed = [m.detach() for m in step.pruner.hard_masks(searching.net.prompt.tensor()).masks]
    elif masks == "none":  # the ungated network
        step.func.model = searching.net
        if step.func.graph is not None:
            step.func.graph.model = searching.net
    return step


def dense_step():
    return speed.train_step(NETS, speed.Case("train", "dense", "cuda", 512, "bf16"), DEV, STEP_GRAPH)


def probe_search() -> dict:
    out = {}
    variants = {
        "pass@0.5": dict(target=0.5),
        "pass@0.5 bn=frozen": dict(target=0.5, bn="frozen"),
        "pass@0.5 masks=fixed": dict(target=0.5, masks="fixed"),
        "pass@0.5 masks=none": dict(target=0.5, masks="none"),
        "pass@0.5 prompt=none": dict(target=0.5, prompt="none"),
        "pass@0.25": dict(target=0.25),
    }
    dense = dense_step()
    for _ in range(10):
        dense()
    out["dense"] = kernels(dense, "dense train step")
    for name, kw in variants.items():
        step = search_variant(**kw)
        for _ in range(10):
            step()
            dense()
        pairs = [(ms(step), ms(dense)) for _ in range(5)]
        s, d = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        out[name] = {"ms": s, "dense_ms": d, "search_over_dense": d / s, **kernels(step, name, rows=30 if name == "pass@0.5" else 12)}
        print(f"-- {name}: {s:.3f} ms vs dense {d:.3f} ms: {d / s:.3f}x", flush=True)
    return out


def probe_serve() -> dict:
    from passray.serving import Served

    out = {}
    modes = {"graph": None, "compile+graph": "default", "autotune+graph": "max-autotune"}  # Served(compile=...)
    for net_name in ("dense", "uniform_l1@0.25"):
        for batch in (1, 1024):
            x = torch.randn(batch, 3, 32, 32, device=DEV, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
            for mode_name, mode in modes.items():
                if mode == "max-autotune" and batch != 1:
                    continue
                t0 = time.perf_counter()
                try:
                    served = Served(NETS.get(net_name), batch, DEV, "bf16", input_shape=(3, 32, 32), compile=mode)
                except Exception as err:  # noqa: BLE001
                    print(f"!! {net_name} b{batch} {mode_name}: {type(err).__name__}: {str(err)[:300]}", flush=True)
                    continue
                build_s = time.perf_counter() - t0
                steps = 200 if batch == 1 else 30
                for _ in range(10):
                    served(x)
                t = statistics.median(ms(lambda: served(x), steps) for _ in range(5))
                k = kernels(lambda: served(x), f"{net_name} b{batch} {mode_name}", rows=6)
                key = f"{net_name} b{batch} {mode_name}"
                out[key] = {"ms": t, "build_s": build_s, **k}
                print(f"-- {key}: {t:.4f} ms (built in {build_s:.1f} s)", flush=True)
    for batch in (1, 1024):
        for mode_name in modes:
            d, p = out.get(f"dense b{batch} {mode_name}"), out.get(f"uniform_l1@0.25 b{batch} {mode_name}")
            if d and p:
                print(f"== b{batch} {mode_name}: dense {d['ms']:.4f} ms, 25% {p['ms']:.4f} ms: {d['ms'] / p['ms']:.2f}x")
    return out


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    what = sys.argv[1]
    result = probe_search() if what == "search" else probe_serve()
    print("JSON " + json.dumps({what: result, "device": torch.cuda.get_device_name()}))
