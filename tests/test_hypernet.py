"""PASS hypernetwork: gradients flow through straight-through masks, budgets hold every
step, the LSTM carries state across groups, and save/load reproduces masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from passray.budget import Allocator
from passray.config import BudgetConfig, ModelConfig
from passray.groups import build_groups
from passray.hypernet import PassHypernet, PassPruner, group_statistics, load_hypernet, save_hypernet
from passray.models import create_backbone
from passray.network import PrunableNet
from passray.search import SearchNet
from passray.prompts import VisualPrompt


def _setup(arch: str = "resnet18", prompt_kind: str = "pad", recurrent: bool = True, keep: float = 0.5, **pruner_kw):
    torch.manual_seed(0)
    backbone = create_backbone(ModelConfig(arch=arch), num_classes=10)
    groups = build_groups(backbone, 32)
    stats = group_statistics(groups, 8)
    hypernet = PassHypernet(stats.shape[1], hidden_size=16, recurrent=recurrent, use_prompt=prompt_kind != "none",
                            stats_length=8)
    pruner = PassPruner(hypernet, groups, Allocator(groups.cost, BudgetConfig(keep_ratio=keep)), **pruner_kw)
    net = PrunableNet(backbone, VisualPrompt(prompt_kind, 4, 32))
    net.attach(groups)
    return net, groups, hypernet, pruner


def _perturb(module: torch.nn.Module, scale: float = 0.1) -> None:
    """Move every parameter off its initialisation (the learned parts start at zero)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


@pytest.mark.parametrize("estimator", ["dropped", "straight_through"])
def test_gradients_reach_theta_omega_and_prompt(estimator: str) -> None:
    """After one step off the zero start, the loss reaches the LSTM, the per-channel scorer,
    the prompt encoder and the prompt, and never the frozen backbone."""
    net, _, hypernet, pruner = _setup("resnet8", estimator=estimator, sample=True)
    net.backbone.requires_grad_(False)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    optimizer = torch.optim.Adam(hypernet.parameters(), lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        net.prompt.values.grad = None
        F.cross_entropy(SearchNet(net, pruner)(x), y).backward()
        optimizer.step()
    parts = {"theta (LSTM)": hypernet.cell, "theta (scorer)": hypernet.scorer_channel,
             "theta (layer head)": hypernet.group_head, "omega (encoder)": hypernet.encoder,
             "statistics embedding": hypernet.embed}
    for name, module in parts.items():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads, f"no gradient reached {name}"
        total = sum(g.abs().sum() for g in grads)
        assert torch.isfinite(total) and total > 0, name
    assert net.prompt.values.grad is not None
    assert torch.isfinite(net.prompt.values.grad).all() and net.prompt.values.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.backbone.parameters())  # backbone stays frozen


def test_dropped_channels_receive_gradient_through_relu() -> None:
    """A gate sits before the activation and ReLU'(0) = 0: the search's masks leak a tiny
    fraction so that a dropped channel's score still learns what bringing it back is worth."""
    net, groups, _, pruner = _setup("resnet8", keep=0.3, estimator="dropped", sample=False, project=False)
    net.backbone.requires_grad_(False)
    z = pruner.scores(net.prompt.tensor()).detach().requires_grad_(True)
    masks = pruner._masks(z)
    groups.set_masks(masks)
    F.cross_entropy(net.backbone(torch.randn(16, 3, 32, 32)), torch.randint(0, 10, (16,))).backward()
    dropped = torch.cat(pruner.last.masks) < 0.5
    inner = [gi for gi, g in enumerate(groups.groups) if g.name.endswith(".conv1")]
    assert inner, "resnet8 has inner (conv1 -> bn1 -> relu) groups"
    for gi in inner:
        start = sum(groups.widths[:gi])
        sl = slice(start, start + groups.widths[gi])
        assert dropped[sl].any()
        assert (z.grad[sl][dropped[sl]] != 0).any(), groups.groups[gi].name
    assert (z.grad[~dropped] == 0).all()  # dropped estimator: kept channels' own gradients are not used
    for mask, hard in zip(masks, pruner.last.masks):  # forward is the hard mask up to the 1e-4 leak
        torch.testing.assert_close(mask.detach(), hard + 1e-4 * (1 - hard))


def test_budget_projection_keeps_the_soft_cost_constant() -> None:
    """The projected gradient moves scores along the budget's level set (first order)."""
    net, groups, _, pruner = _setup("resnet18", keep=0.3, sample=False, estimator="straight_through")
    net.backbone.requires_grad_(False)
    z = pruner.scores(net.prompt.tensor()).detach().requires_grad_(True)
    groups.set_masks(pruner._masks(z))
    F.cross_entropy(net.backbone(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))).backward()
    allocation = pruner.last
    tau = allocation.thresholds.index_select(0, pruner.group_index)
    soft = torch.sigmoid((z.detach() - tau) / pruner.temperature)
    slope = soft * (1 - soft) / pruner.temperature
    cost = pruner.allocator.cost.marginal(allocation.kept, "macs").float().index_select(0, pruner.group_index)
    change = (slope * cost * z.grad).sum() / (slope * cost).abs().mul(z.grad.abs()).sum()
    assert z.grad.abs().sum() > 0 and abs(float(change)) < 1e-4


def test_every_search_step_meets_the_budget() -> None:
    net, groups, hypernet, pruner = _setup("resnet18", keep=0.4)
    net.backbone.requires_grad_(False)
    optimizer = torch.optim.Adam([*hypernet.parameters(), net.prompt.values], lr=0.05)
    for step in range(4):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        optimizer.zero_grad()
        F.cross_entropy(SearchNet(net, pruner)(x), y).backward()
        optimizer.step()
        allocation = pruner.last
        kept = groups.kept_counts(allocation.masks)
        assert torch.equal(kept, allocation.kept.cpu())
        assert 0.4 * 0.99 <= groups.cost_ratio(allocation.masks) <= 0.4, step


@pytest.mark.parametrize("recurrent", [True, False])
def test_lstm_carries_state_across_groups(recurrent: bool) -> None:
    _, groups, hypernet, pruner = _setup("resnet18", recurrent=recurrent)
    _perturb(hypernet)
    prompt = torch.randn(3, 32, 32)
    stats = pruner.stats.clone()
    score = lambda s: hypernet(s, pruner.features, pruner.group_index, prompt).split(pruner.widths)  # noqa: E731
    before = score(stats)
    stats[1] += 3.0  # change group 1's statistics only
    after = score(stats)
    assert not torch.allclose(before[1], after[1])
    changed_later = not torch.allclose(before[5], after[5])
    assert changed_later == recurrent


def test_prompt_conditions_the_scores() -> None:
    _, _, hypernet, pruner = _setup("resnet8")
    _perturb(hypernet)
    a = hypernet(pruner.stats, pruner.features, pruner.group_index, torch.zeros(3, 32, 32))
    b = hypernet(pruner.stats, pruner.features, pruner.group_index, torch.ones(3, 32, 32))
    assert not torch.allclose(a, b)


def test_first_masks_are_the_priors_masks() -> None:
    """The learned parts start at zero: search starts exactly from the prior through the same allocator."""
    _, groups, _, pruner = _setup("resnet18", keep=0.25)
    scores = [torch.rand(w) for w in groups.widths]
    from passray.hypernet import global_priors

    bound = PassPruner(pruner.hypernet, groups, pruner.allocator, global_priors(scores))
    expected = pruner.allocator(scores).masks
    assert all(torch.equal(a, b) for a, b in zip(bound.hard_masks(torch.zeros(3, 32, 32)).masks, expected))


def test_sampled_masks_meet_the_budget_and_agree_across_ranks() -> None:
    """Noise is seeded by (seed, step): two pruners in lockstep (DDP ranks) draw the same masks."""
    _, groups, _, a = _setup("resnet18", keep=0.3, sample=True, seed=3)
    _, _, _, b = _setup("resnet18", keep=0.3, sample=True, seed=3)
    prompt = torch.zeros(3, 32, 32)
    first = [m.detach() for m in a(prompt)]
    assert all(torch.equal(x, y.detach()) for x, y in zip(first, b(prompt)))
    second = [m.detach() for m in a(prompt)]
    assert any(not torch.equal(x, y) for x, y in zip(first, second))  # a new draw each step
    for masks in (first, second):
        assert 0.3 * 0.99 <= groups.cost_ratio(masks) <= 0.3
    a.eval()
    assert all(torch.equal(x.detach() > 0.5, y > 0.5) for x, y in zip(a(prompt), a.hard_masks(prompt).masks))


def test_round_trip_gives_identical_masks(tmp_path) -> None:
    net, groups, hypernet, pruner = _setup("resnet18")
    _perturb(hypernet)
    prompt = torch.randn(3, 32, 32)
    expected = pruner.hard_masks(prompt).masks
    save_hypernet(hypernet, tmp_path / "hypernet")
    loaded, spec = load_hypernet(tmp_path / "hypernet")
    assert spec["hidden_size"] == 16
    again = PassPruner(loaded, groups, pruner.allocator).hard_masks(prompt).masks
    assert all(torch.equal(a, b) for a, b in zip(expected, again))


def test_a_hypernet_scores_a_backbone_of_other_widths(tmp_path) -> None:
    """Nothing in the hypernet depends on widths: one trained on resnet8 prunes vgg11_bn at budget."""
    _, _, hypernet, _ = _setup("resnet8")
    _perturb(hypernet)
    save_hypernet(hypernet, tmp_path / "h")
    loaded, _ = load_hypernet(tmp_path / "h")
    groups = build_groups(create_backbone(ModelConfig(arch="vgg11_bn"), 10), 32)
    masks = PassPruner(loaded, groups, Allocator(groups.cost, BudgetConfig(keep_ratio=0.4))).hard_masks(
        torch.zeros(3, 32, 32)).masks
    assert 0.4 * 0.99 <= groups.cost_ratio(masks) <= 0.4


def test_hypernet_of_another_statistics_spec_is_refused(tmp_path) -> None:
    _, groups, hypernet, _ = _setup("resnet8")
    other = PassHypernet(hypernet.spec["stats_dim"] + 1, hidden_size=16, stats_length=8)
    with pytest.raises(ValueError, match="statistics per group"):
        PassPruner(other, groups, Allocator(groups.cost, BudgetConfig()))


def test_tampered_hypernet_is_refused(tmp_path) -> None:
    _, _, hypernet, _ = _setup("resnet8")
    save_hypernet(hypernet, tmp_path / "h")
    (tmp_path / "h" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_hypernet(tmp_path / "h")
    (tmp_path / "h" / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json"):
        load_hypernet(tmp_path / "h")


@pytest.mark.parametrize("kind,pixels", [("pad", 32 * 32 - 24 * 24), ("patch", 16), ("full", 32 * 32), ("none", 0)])
def test_prompt_kinds(kind: str, pixels: int) -> None:
    prompt = VisualPrompt(kind, 4, 32)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(prompt(x), x)  # starts as the identity
    if kind == "none":
        assert prompt.tensor() is None and not list(prompt.parameters())
        return
    assert int(prompt.mask.sum()) == pixels
    with torch.no_grad():
        prompt.values.fill_(1.0)
    assert int((prompt(x) != x).sum()) == 2 * 3 * pixels  # only the prompt's pixels move


def test_search_optimizer_gives_the_hypernet_its_own_learning_rate() -> None:
    """hypernet.lr sets the hypernet's param group; the rest keeps search.lr (both scheduled)."""
    from passray.config import OptimConfig
    from passray.engine import build_optimizer

    hyper, head, frozen = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    frozen.requires_grad_(False)
    opt, sched = build_optimizer([{"params": list(hyper.parameters()), "lr": 1e-4},
                                  {"params": [*head.parameters(), *frozen.parameters()]}],
                                 OptimConfig(lr=3e-3, optimizer="adamw"), total_steps=10)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 3e-3]
    assert len(opt.param_groups[1]["params"]) == 2  # frozen parameters are left out
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] < 1e-4 and opt.param_groups[1]["lr"] < 3e-3


def test_frozen_batch_norm_search_runs_on_the_backbone_statistics(monkeypatch, tmp_path) -> None:
    """Validation recalibrates BN under each epoch's masks; with batch_norm: frozen the next
    search epoch must still see the backbone's running statistics."""
    from conftest import TINY

    from passray import engine
    from passray.config import load_config
    from passray.pipeline import Runtime, run

    seen: list[tuple[str, torch.Tensor]] = []
    original = engine.run_epoch

    def recording(model, *args, desc="", **kwargs):
        stage = (desc.split() or ["other"])[0]
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        seen.append((stage, bn.running_mean.clone()))
        out = original(model, *args, desc=desc, **kwargs)
        seen.append((stage + "-end", bn.running_mean.clone()))
        return out

    monkeypatch.setattr(engine, "run_epoch", recording)
    cfg = load_config(None, [*TINY, "search.epochs=2", "hypernet.batch_norm=frozen", f"output_dir={tmp_path}"])
    run(cfg, Runtime(progress=False))
    pretrained = [v for stage, v in seen if stage == "pretrain-end"][-1]
    search = [v for stage, v in seen if stage.startswith("search")]
    assert len(search) == 4  # start and end of two search epochs
    for value in search:
        torch.testing.assert_close(value, pretrained, rtol=0, atol=0)
