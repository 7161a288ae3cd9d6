"""Latency budgets: tables measured and cached, predictions sane, the allocator meets latency targets.

Timing runs single-threaded: on a shared 2-core machine, two intra-op threads wait on
each other's preemption and a 0.2 ms conv takes 30 ms, which no median repairs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from passray import latency, profile
from passray.budget import Allocator
from passray.config import BudgetConfig, ModelConfig
from passray.groups import build_groups
from passray.importance import compute_scores
from passray.models import create_backbone

BATCH = 16  # large enough that compute, not per-call overhead, dominates on a CPU
RATIOS = [0.4, 0.6]


@pytest.fixture(scope="module", autouse=True)
def _one_thread_first(one_thread) -> None:
    """Autouse, so it is set before the module's table fixtures time anything (a mark gives no order)."""


def _groups(arch: str = "convnet", width: float = 0.25):
    torch.manual_seed(0)
    return build_groups(create_backbone(ModelConfig(arch=arch, width=width), 10).eval(), 32)


@pytest.fixture(scope="module")
def tiny():
    """convnet x0.25, batch 4, 3x3 grid: the fast table for format and cache tests."""
    groups = _groups()
    return groups, profile.build_table(groups, "convnet@w0.25", batch_size=4, grid=3, repeats=3)


@pytest.fixture(scope="module")
def measured():
    """convnet x1: wide enough that a 0.4 latency ratio is reachable."""
    groups = _groups(width=1.0)
    return groups, profile.build_table(groups, "convnet@w1.0", batch_size=BATCH, grid=3, repeats=5)


def _candidates(groups, n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    widths = torch.tensor(groups.widths, dtype=torch.float64)
    return torch.maximum(torch.ones(()), torch.round(torch.rand(n, len(widths), generator=g, dtype=torch.float64) * widths))


def _budget(keep: float, allocation: str, round_to: int = 1) -> BudgetConfig:
    return BudgetConfig(kind="latency", keep_ratio=keep, allocation=allocation, min_channels=1, round_to=round_to)


def test_table_covers_every_layer_and_round_trips(tiny, tmp_path: Path) -> None:
    groups, table = tiny
    layers = {n for n, m in groups.model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert layers <= set(table.layers)
    assert all(len(t.ms) == len(t.in_counts) and all(len(r) == len(t.out_counts) for r in t.ms) for t in table.layers.values())
    assert table.layers["features.0.0"].in_counts == [3]  # the RGB input is never pruned: one count
    assert len(table.layers["features.2.0"].in_counts) == len(table.layers["features.2.0"].out_counts) == 3
    path = table.save(tmp_path / "t.json")
    again = latency.LatencyTable.load(path)
    kept = _candidates(groups)
    torch.testing.assert_close(latency.attach(groups.cost, again).cost(kept, "latency"),
                               latency.attach(groups.cost, table).cost(kept, "latency"))


def test_cache_is_keyed_and_reused(tiny, tmp_path: Path, monkeypatch) -> None:
    groups, _ = tiny
    args = dict(batch_size=4, device="cpu", source="measure", cache_dir=tmp_path, grid=2, repeats=2)
    first = profile.load_or_build_table(groups, "convnet@w0.25", **args)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and files[0] == latency.cache_path(first.key, tmp_path)
    monkeypatch.setattr(profile, "build_table", lambda *a, **k: pytest.fail("cached table was rebuilt"))
    second = profile.load_or_build_table(groups, "convnet@w0.25", **args)
    assert second.to_dict() == first.to_dict()
    other = profile.load_or_build_table(groups, "convnet@w0.25", **{**args, "batch_size": 8, "source": "auto"})
    assert other.source == "analytic"  # no table for batch 8, and "auto" never times by surprise


@pytest.mark.parametrize("content", ["{not json", json.dumps({"schema": "something/else"}), json.dumps([1, 2]),
                                     json.dumps({"schema": latency.SCHEMA, "layers": {}})])
def test_corrupt_or_foreign_cache_is_one_line_error(tiny, tmp_path: Path, content: str) -> None:
    groups, table = tiny
    path = latency.cache_path(table.key, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        profile.load_or_build_table(groups, "convnet@w0.25", batch_size=4, source="measure", cache_dir=tmp_path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_table_of_another_key_or_network_is_refused(tiny, tmp_path: Path) -> None:
    groups, table = tiny
    foreign = copy.deepcopy(table)
    foreign.key["batch_size"] = 999
    foreign.save(latency.cache_path(table.key, tmp_path))
    with pytest.raises(ValueError, match="another key"):
        profile.load_or_build_table(groups, "convnet@w0.25", batch_size=4, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        latency.attach(_groups("resnet8").cost, table)


def test_predicted_dense_latency_is_sane(measured) -> None:
    groups, table = measured
    net = latency.prepared_copy(groups.model, "cpu", "fp32")
    x = latency.example_batch(groups.input_shape, BATCH, "cpu", "fp32")
    actual = latency.time_ms(lambda: net(x), "cpu", repeats=7)
    predicted = latency.attach(groups.cost, table).dense("latency")
    assert predicted == pytest.approx(table.dense_ms)
    assert 0.3 * actual <= predicted <= 3 * actual, (predicted, actual)
    assert 0 < sum(t.dense_ms for t in table.layers.values()) <= predicted * (1 + 1e-9)


def _best_reachable(allocator: Allocator, scores: list[torch.Tensor]) -> float:
    """The largest latency ratio within budget among the allocator's own candidates."""
    uniform = allocator.budget.allocation == "uniform"
    candidates = allocator._uniform_candidates() if uniform else allocator._global_candidates(allocator._pad(scores))
    candidates = torch.cat([candidates, allocator.floor[None]])  # the all-minimum network is always a candidate
    costs = allocator.cost.cost(candidates, "latency")
    return float(costs[costs <= allocator.target * (1 + 1e-9)].max() / allocator.dense)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("keep", RATIOS)
@pytest.mark.parametrize("source", ["measured", "analytic"])
def test_allocator_meets_latency_target(measured, source: str, keep: float, allocation: str) -> None:
    """Within 2 % on a smooth table. A measured one can have cliffs (on this CPU the first
    block of convnet x1 gets ~16x slower from 21 to 32 channels: ~3 % of the network per
    channel), so there the check is that nothing reachable lies closer to the target."""
    groups, table = measured
    if source == "analytic":
        table = profile.analytic_table(groups, "convnet@w1.0", batch_size=BATCH)
    cost = latency.attach(groups.cost, table)
    allocator, scores = Allocator(cost, _budget(keep, allocation)), compute_scores("l1", groups)
    result = allocator(scores)
    ratio = float(result.ratio)
    assert ratio <= keep + 1e-9 and ratio == pytest.approx(_best_reachable(allocator, scores), rel=1e-12)
    assert keep - ratio <= (0.02 if source == "analytic" else 0.1) * keep, (source, allocation, ratio)
    kept = groups.kept_counts(result.masks)
    assert float(cost.cost(kept[None], "latency")[0]) / cost.dense("latency") == pytest.approx(ratio)
    assert groups.cost_ratio(result.masks, "macs") < 1  # macs/params still answered by the wrapped model


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_allocator_rounds_widths_under_latency(measured, allocation: str) -> None:
    groups, table = measured
    allocator, scores = Allocator(latency.attach(groups.cost, table), _budget(0.5, allocation, 8)), compute_scores("l1", groups)
    result = allocator(scores)
    widths = torch.tensor(groups.widths, dtype=torch.float64)
    assert bool(((result.kept % 8 == 0) | (result.kept == widths)).all()), result.kept.tolist()
    assert float(result.ratio) == pytest.approx(_best_reachable(allocator, scores), rel=1e-12)
    assert float(result.ratio) <= 0.5 + 1e-9


def test_pruned_network_speed_matches_prediction_loosely(measured) -> None:
    groups, table = measured
    result = Allocator(latency.attach(groups.cost, table), _budget(0.5, "global"))(compute_scores("l1", groups))
    pruned = copy.deepcopy(groups.model)
    build_groups(pruned, 32).prune(result.masks)
    speed = latency.measure_speedup(groups.model, pruned, groups.input_shape, BATCH, repeats=7)
    predicted = 1 / float(result.ratio)
    assert predicted / 2 <= speed["speedup"] <= predicted * 2, (predicted, speed)


def test_analytic_fallback_is_monotone() -> None:
    groups = _groups("resnet8", 1.0)
    cost = latency.attach(groups.cost, profile.analytic_table(groups, "resnet8@w1.0", batch_size=4))
    kept = _candidates(groups, n=32) + 1
    kept = torch.minimum(kept, torch.tensor(groups.widths, dtype=torch.float64))
    base = cost.cost(kept, "latency")
    for g in range(len(groups.widths)):
        fewer = kept.clone()
        fewer[:, g] = (fewer[:, g] - 1).clamp(min=1)
        changed = fewer[:, g] < kept[:, g]
        assert bool((cost.cost(fewer, "latency")[changed] < base[changed]).all()), g
    assert cost.dense("latency") > cost.minimum("latency", 1) > 0
    torch.testing.assert_close(cost.cost(kept, "macs"), groups.cost.cost(kept, "macs"))
    with pytest.raises(ValueError, match="latency"):
        cost.cost(kept, "flops")


def test_measure_speedup_reports_both_and_leaves_nets_alone() -> None:
    dense = create_backbone(ModelConfig(arch="convnet", width=0.5), 10).train()
    pruned = create_backbone(ModelConfig(arch="convnet", width=0.25), 10).train()
    out = latency.measure_speedup(dense, pruned, (3, 32, 32), batch_size=4, repeats=3)
    assert {"dense_ms", "pruned_ms", "speedup", "batch_size", "dtype", "device"} <= set(out)
    assert out["dense_ms"] > 0 and out["pruned_ms"] > 0 and out["speedup"] > 0
    assert dense.training and pruned.training and next(dense.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        latency.measure_speedup(dense, pruned, (3, 32, 32), 4, dtype="fp8")


def test_profile_cli_saves_and_prints(tmp_path: Path, capsys) -> None:
    out = tmp_path / "table.json"
    table = profile.main(["--set", "model.arch=convnet", "--set", "model.width=0.25", "--batch-size", "2",
                          "--grid", "2", "--repeats", "2", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "dense predicted" in printed and "features.0.0" in printed and "share" in printed
    assert latency.LatencyTable.load(out).to_dict() == table.to_dict()


@pytest.mark.parametrize("budget", [["budget.kind=latency", "budget.latency_table=analytic", "budget.keep_ratio=0.85"],
                                    ["budget.kind=macs", "budget.measure_speedup=true"]])
def test_pipeline_reports_predicted_and_measured_speedup(budget: list[str], tmp_path: Path) -> None:
    """Both budget kinds end with MACs ratio, predicted and measured speed-up side by side."""
    from conftest import TINY

    from passray.config import load_config
    from passray.pipeline import Runtime, run

    cfg = load_config(None, [*TINY, *budget, "budget.latency_batch_size=4", f"output_dir={tmp_path}"])
    out = run(cfg, Runtime(progress=False))
    assert 0 < out["macs_ratio"] < 1
    assert out["speedup_predicted"] > 1 and out["speedup_measured"] > 0
    assert out["latency_dense_ms"] > 0 and out["latency_pruned_ms"] > 0
    if cfg.budget.kind == "latency":
        assert out["latency_ratio_predicted"] <= 0.85 * (1 + 1e-6)
