"""Grouped convolutions are pruned in tied units: unit j is position j of every conv group, so each
conv group keeps the same channels and the pruned layer is still a grouped conv with its G groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from passray.budget import Allocator
from passray.config import BudgetConfig, ModelConfig, load_config
from passray.equivalence import check_equivalence
from passray.export import load_pruned
from passray.groups import build_groups, count_macs_params
from passray.importance import compute_scores
from passray.models import create_backbone
from passray.pipeline import Runtime, run
from passray.prunability import check_prunable

pytestmark = pytest.mark.usefixtures("one_thread")

QUICKSTART = Path(__file__).resolve().parents[1] / "tune_configs" / "quickstart.yaml"


def _randomised(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so a wrongly gated or pruned channel shows."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def _backbone(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return _randomised(create_backbone(ModelConfig(arch=arch), num_classes=10))


def _grouped_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels}


def test_a_unit_is_one_position_of_every_conv_group() -> None:
    groups = build_groups(_backbone("resnext8"), 32)
    group = groups.groups[groups.names.index("features.1.conv2")]  # 32 channels, 4 conv groups of 8
    assert (group.channels, group.width, group.unit_channels) == (32, 8, 4)
    assert torch.equal(group.unit_of, torch.arange(32) % 8)
    assert not groups.left_whole
    mask = torch.zeros(8).index_fill_(0, torch.tensor([1, 6]), 1.0)
    assert torch.nonzero(group.to_channels(mask)).flatten().tolist() == [1, 6, 9, 14, 17, 22, 25, 30]


# resnext8 is small: one unit of its first stage is 2.5 % of its MACs, so a single threshold lands within
# one unit's cost of the target; the real ResNeXt/RegNetX units are fine enough for 1 %.
@pytest.mark.parametrize("arch,tolerance", [("resnext8", None), ("resnext50_32x4d", 0.01),
                                            ("regnet_x_400mf", 0.01)])
def test_tied_groups_prune_exactly_to_the_budget(arch: str, tolerance: float | None) -> None:
    model, keep = _backbone(arch), 0.5
    conv_groups = {n: m.groups for n, m in _grouped_convs(model).items()}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    dense_macs, _ = count_macs_params(model, x[:1])
    groups = build_groups(model, 32)
    assert not groups.left_whole and any(g.unit_of is not None for g in groups.groups)
    scores = [torch.rand(g.width, generator=torch.Generator().manual_seed(i)) for i, g in enumerate(groups.groups)]
    allocation = Allocator(groups.cost, BudgetConfig(keep_ratio=keep))(scores)
    groups.set_masks(allocation.masks)
    with torch.no_grad():
        masked = model(x)
    groups.prune(allocation.masks)
    with torch.no_grad():
        pruned = model(x)
    check_equivalence(masked / masked.abs().max(), pruned / masked.abs().max())
    macs, params = count_macs_params(model, x[:1])
    kept = allocation.kept[None]
    assert (macs, params) == pytest.approx([float(groups.cost.cost(kept, k)[0]) for k in ("macs", "params")], rel=1e-9)
    step = float(groups.cost.marginal(groups.cost.widths).max()) / dense_macs if tolerance is None else tolerance * keep
    assert keep - step <= macs / dense_macs <= keep, macs / dense_macs
    tied = [(g, int(k)) for g, k in zip(groups.groups, allocation.kept) if g.unit_of is not None]
    assert any(0 < k < g.width for g, k in tied)  # tied groups are pruned, not left whole
    for name, conv in _grouped_convs(model).items():  # still G conv groups, each as wide as the group keeps
        assert conv.groups == conv_groups[name]
        for g, k in tied:
            for it in g.items:
                if it.module == name:
                    assert (conv.out_channels if it.dim == "out" else conv.in_channels) == k * g.unit_channels


class _TwoGroupSizes(nn.Module):
    """Two channel groups (stem's, and conv_a's + conv_b's summed), each held by two grouped convs with conv
    groups of ``12 / a`` and ``12 / b`` channels; a plain third group (last)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.conv_a, self.bn_a = nn.Conv2d(12, 12, 3, padding=1, groups=a, bias=False), nn.BatchNorm2d(12)
        self.conv_b, self.bn_b = nn.Conv2d(12, 12, 3, padding=1, groups=b, bias=False), nn.BatchNorm2d(12)
        self.last, self.bn_last = nn.Conv2d(12, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x)).relu()
        x = (self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(x))).relu()
        return self.fc(self.bn_last(self.last(x)).relu().mean((2, 3)))


class _ConcatIntoGroupedConv(nn.Module):
    """A grouped conv whose input channels come from two channel groups (a concat)."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.bn_left = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.right, self.bn_right = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.grouped, self.bn = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.bn_left(self.left(x)), self.bn_right(self.right(x))], 1).relu()
        return self.fc(self.bn(self.grouped(x)).relu().mean((2, 3)))


def test_convs_of_different_group_sizes_tie_at_their_common_divisor() -> None:
    """Conv groups of 6 and 3 channels: position mod 3 ties both, so 3 units of 4 channels."""
    model = _randomised(_TwoGroupSizes(2, 4))
    groups = build_groups(model, 8)
    assert [(g.channels, g.width) for g in groups.groups] == [(12, 3), (12, 3), (8, 8)]
    assert all(torch.equal(g.unit_of, torch.arange(12) % 3) for g in groups.groups[:2])
    check_prunable(model, 8, BudgetConfig(keep_ratio=0.5), "two-sizes")  # masked == pruned, costs exact, reloads


@pytest.mark.parametrize("model,left_whole", [
    (_TwoGroupSizes(3, 4), {n: "grouped convolutions conv_a (groups=3), conv_b (groups=4) tie all 12 channels "
                                  "into one unit" for n in ("stem", "conv_b")}),
    (_ConcatIntoGroupedConv(), {n: "grouped convolution grouped (groups=4) has 8 of its 16 in-channels in this "
                                   "group: its conv groups cannot keep equal channels" for n in ("left", "right")}),
])
def test_grouped_convs_that_cannot_be_tied_leave_their_group_whole(model: nn.Module, left_whole: dict) -> None:
    groups = build_groups(_randomised(model), 8)
    assert groups.left_whole == left_whole
    check_prunable(model, 8, BudgetConfig(keep_ratio=0.95), "untied")  # the rest still prunes exactly


def test_baseline_scores_average_a_units_channels_as_torch_pruning_does() -> None:
    groups = build_groups(_backbone("resnext8"), 32)
    scores = compute_scores("l1", groups)
    assert [len(s) for s in scores] == groups.widths
    for group, score in zip(groups.groups, scores):
        raw = tp.importance.GroupMagnitudeImportance(p=1)(group.tp_group)
        conv_groups = group.unit_channels  # unit j = channel j of each of the G conv groups: TP's view(G, -1)
        torch.testing.assert_close(score, raw.view(conv_groups, -1).mean(0))


def test_min_channels_and_round_to_count_channels_not_units() -> None:
    """A unit of resnext8 is 4 channels: 8 channels are 2 units (counting units, 8 of them would keep the first
    stage's tied groups whole)."""
    groups = build_groups(_backbone("resnext8"), 32)
    allocator = Allocator(groups.cost, BudgetConfig(keep_ratio=0.4, min_channels=8, round_to=8))
    tied = torch.tensor([g.unit_channels == 4 for g in groups.groups])
    assert tied.any() and (allocator.floor[tied] == 2).all() and (allocator.step[tied] == 2).all()
    assert (allocator.floor[~tied] == 8).all() and (allocator.step[~tied] == 8).all()
    allocation = allocator([torch.randn(g.width) for g in groups.groups])
    channels = [int(k) * g.unit_channels for g, k in zip(groups.groups, allocation.kept)]
    assert all(c >= 8 and c % 8 == 0 for c in channels), channels
    assert float(allocation.ratio) <= 0.4


def test_pass_search_on_a_grouped_backbone_exports_and_reloads(tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART, ["model.arch=resnext8", "data.limit_train=64", "pretrain.epochs=0",
                                   "search.epochs=1", "finetune.epochs=0", "bn_recalibration_batches=1", "device=cpu",
                                   f"output_dir={tmp_path}"])
    results = run(cfg, Runtime(export_dir=str(tmp_path), progress=False))
    assert 0.45 <= results["macs_ratio"] <= 0.5
    structure = json.loads((tmp_path / "structure.json").read_text())
    widths = {g["name"]: (g["width"], len(g["kept"])) for g in structure["groups"]}
    assert widths["features.1.conv2"][0] == 8  # 32 channels in 8 units of 4
    net, _ = load_pruned(tmp_path)
    again, _ = load_pruned(tmp_path)
    conv = net.backbone.features[1].conv2
    assert conv.groups == 4 and conv.out_channels == 4 * widths["features.1.conv2"][1]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), again(x), rtol=0, atol=0)
    assert results["pruned_macs"] == pytest.approx(results["macs_ratio"] * results["dense_macs"], rel=1e-9)


def test_latency_tables_time_grouped_convs_at_widths_they_can_be_pruned_to() -> None:
    """A grouped conv's latency varies with its kept units (multiples of its groups), so a latency
    budget prunes tied groups too, and meets it."""
    from passray.latency import attach
    from passray.latency_tables import analytic_table, inspect_layers

    backbone = _backbone("resnext8")
    groups = build_groups(backbone, 32)
    grouped = _grouped_convs(backbone)
    specs = {s.name: s for s in inspect_layers(groups)[1]}
    assert grouped and all(specs[n].vary_in and specs[n].vary_out for n in grouped)
    table = analytic_table(groups, "resnext8", batch_size=8)
    for name, conv in grouped.items():
        counts = table.layers[name].in_counts + table.layers[name].out_counts
        assert all(c % conv.groups == 0 for c in counts), (name, counts)
    cost = attach(groups.cost, table)
    allocation = Allocator(cost, BudgetConfig(kind="latency", keep_ratio=0.6, min_channels=2))(compute_scores("l1", groups))
    assert float(allocation.ratio) <= 0.6
    tied = [i for i, g in enumerate(groups.groups) if g.channels > g.width]
    assert tied and any(allocation.kept[i] < groups.groups[i].width for i in tied)
