"""The fast search step computes what the reference step computes.

Fast: masks folded into BatchNorm's affine (``groups._Gates.fold_batch_norm``). Reference:
a forward hook multiplying every gated output. On the embedded default (digits, convnet,
PASS with sampled masks), a few search steps from the same start must draw the same masks
and give the same loss and the same gradients for hypernet, prompt and head (fp32 tolerance).
The CUDA-graph halves (``hypernet.cuda_graph``: the mask computation; ``cuda_graph``: the whole
step, ``engine.Step``) are checked the same way against the eager step on a GPU (skipped without one).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from passray import engine
from passray.budget import Allocator
from passray.config import load_config
from passray.data import load_dataset, make_loaders
from passray.groups import _Gates, build_groups
from passray.hypernet import create_pass_pruner
from passray.models import classifier, create_backbone
from passray.network import PrunableNet
from passray.prompts import create_prompt
from passray.search import SearchNet


def _search_setup(device: str, cuda_graph: bool):
    """The embedded default's search network, pruner and trainable parameters, from seed 0."""
    cfg = load_config("tune_configs/quickstart.yaml", ["data.limit_train=256", f"hypernet.cuda_graph={cuda_graph}"])
    torch.manual_seed(0)
    ds = load_dataset(cfg.data)
    loaders = make_loaders(ds, cfg.data, torch.device(device), 0, 1, cfg.seed)
    backbone = create_backbone(cfg.model, ds.num_classes)
    net = PrunableNet(backbone, create_prompt(cfg.prompt, ds.image_size))
    groups = build_groups(backbone, ds.image_size)
    net.attach(groups)
    pruner = create_pass_pruner(groups, cfg.hypernet, Allocator(groups.cost, cfg.budget, device), True, seed=cfg.seed)
    head = classifier(backbone)
    backbone.requires_grad_(False)
    head.requires_grad_(True)
    model = SearchNet(net, pruner).to(device).train()
    params = [*pruner.hypernet.parameters(), *net.prompt.parameters(), *head.parameters()]
    return model, params, loaders


def _search_steps(steps: int = 3, device: str = "cpu",
                  cuda_graph: bool = False) -> tuple[list[float], list[list[torch.Tensor]], dict[str, torch.Tensor]]:
    """Losses and drawn masks of ``steps`` search steps (SGD: updates stay proportional to gradients),
    the gradients of the first step and the hypernet after the last."""
    model, params, loaders = _search_setup(device, cuda_graph)
    pruner, net, head, backbone = model.pruner, model.net, classifier(model.net.backbone), model.net.backbone
    optimizer = torch.optim.SGD(params, lr=0.05)
    losses, masks, grads = [], [], {}
    for step, (x, y) in zip(range(steps), loaders.train):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            grads = {f"hypernet.{k}": p.grad.clone() for k, p in pruner.hypernet.named_parameters() if p.grad is not None}
            grads.update(prompt=net.prompt.values.grad.clone(), head=head.weight.grad.clone())
        optimizer.step()
        losses.append(loss.item())
        masks.append([m.cpu() for m in pruner.last.masks])
    grads = {k: v.cpu() for k, v in grads.items()}
    grads.update({f"after.{k}": p.detach().cpu() for k, p in pruner.hypernet.named_parameters()})
    grads.update({k: v.cpu() for k, v in backbone.state_dict().items() if "running" in k})  # BN statistics move alike
    return losses, masks, grads


def _engine_steps(step_graph: bool, steps: int = 7) -> tuple[list[float], list[list[torch.Tensor]], dict[str, torch.Tensor]]:
    """Losses and drawn masks of ``steps`` search steps through ``engine.Step`` (what ``run_epoch`` runs) on the
    GPU, with the whole step as a replayed CUDA graph or eager, and the hypernet and BN statistics after them."""
    model, params, loaders = _search_setup("cuda", cuda_graph=False)
    step = engine.Step(model, torch.device("cuda"), optimizer=torch.optim.SGD(params, lr=0.05), cuda_graph=step_graph)
    batches = list(loaders.train)
    losses, masks, total = [], [], 0.0
    for i in range(steps):
        x, y = batches[i % len(batches)]
        step(x, y)
        losses.append((float(step.sums[0]) - total) / len(y))
        total = float(step.sums[0])
        masks.append([m.cpu() for m in model.pruner.last.masks])
    assert (step.graph is not None and step.graph.captured) == step_graph
    after = {f"after.{k}": p.detach().cpu() for k, p in model.pruner.hypernet.named_parameters()}
    after.update({k: v.cpu() for k, v in model.net.backbone.state_dict().items() if "running" in k})
    return losses, masks, after


def _assert_same_steps(fast, reference, rtol: float = 1e-4) -> None:
    assert all(torch.equal(a, b) for step_a, step_b in zip(fast[1], reference[1]) for a, b in zip(step_a, step_b))
    assert fast[0] == pytest.approx(reference[0], rel=rtol / 10)
    assert fast[2].keys() == reference[2].keys()
    for key in fast[2]:
        torch.testing.assert_close(fast[2][key], reference[2][key], rtol=rtol, atol=1e-6, msg=key)


def test_folded_batch_norm_gates_match_the_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = _search_steps()
    monkeypatch.setattr(_Gates, "fold_batch_norm", False)
    _assert_same_steps(fast, _search_steps())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_step_matches_the_eager_step() -> None:
    _assert_same_steps(_search_steps(device="cuda", cuda_graph=True), _search_steps(device="cuda"), rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_whole_step_graph_matches_the_eager_step() -> None:
    """Two eager warm-up steps, the capture, then replays: the same masks, losses, hypernet and BN statistics."""
    _assert_same_steps(_engine_steps(step_graph=True), _engine_steps(step_graph=False), rtol=1e-3)


def test_folding_applies_to_every_whole_group_batch_norm() -> None:
    """resnet8's BNs each hold exactly one group's channels: all folded, none hooked twice; removal restores them."""
    backbone = create_backbone(load_config(None, ["model.arch=resnet8"]).model, 10)
    groups = build_groups(backbone, 32)
    x = torch.randn(2, 3, 32, 32)
    backbone.eval()
    dense = backbone(x)
    with groups.gated([torch.ones(w) for w in groups.widths]):
        folded = {bn for bn, _ in groups._gates.folded}
        assert folded == {m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)}
        assert not groups._gates.handles and all("forward" in vars(bn) for bn in folded)
        torch.testing.assert_close(backbone(x), dense)
    groups.remove_gates()
    assert not any("forward" in vars(m) for m in backbone.modules())


def test_a_kept_step_restarts_its_sums_each_epoch() -> None:
    """``run_epoch(step=...)``: the caller's step runs another epoch; loss and accuracy are that epoch's alone."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    step = engine.Step(net, torch.device("cpu"), optimizer=torch.optim.SGD(net.parameters(), lr=0.0))
    first = engine.run_epoch(net, batches, torch.device("cpu"), step=step)
    again = engine.run_epoch(net, batches, torch.device("cpu"), step=step)
    assert again == first and float(step.sums[2]) == 24
    assert first == engine.run_epoch(net, batches, torch.device("cpu"), optimizer=torch.optim.SGD(net.parameters(), lr=0.0))


def test_a_stage_keeps_one_training_step_and_makes_a_new_one_when_warm_up_ends(monkeypatch, tmp_path) -> None:
    """So a CUDA graph is captured once per stage (twice in a search with warm-up), not once per epoch."""
    from conftest import TINY

    from passray.pipeline import Runtime, run

    made = []
    original = engine.Step.__init__

    def counting(self, model, device, **kwargs):
        original(self, model, device, **kwargs)
        if self.optimizer is not None:
            made.append(self)

    monkeypatch.setattr(engine.Step, "__init__", counting)
    cfg = load_config(None, [*TINY, "pretrain.epochs=2", "search.epochs=3", "hypernet.warmup_epochs=1",
                             "finetune.epochs=2", f"output_dir={tmp_path}"])
    run(cfg, Runtime(progress=False))
    assert len(made) == 4  # pretrain, search warm-up, search, fine-tune


def _kept_step_epochs(step_graph: bool) -> tuple[list[float], list[list[torch.Tensor]], dict[str, torch.Tensor]]:
    """Two search epochs through one kept ``engine.Step`` (as ``RunContext.fit`` keeps it) on the GPU, with
    what search validation runs between them (BN recalibration and evaluation, statistics put back)."""
    model, params, loaders = _search_setup("cuda", cuda_graph=False)
    device = torch.device("cuda")
    step = engine.Step(model, device, optimizer=torch.optim.SGD(params, lr=0.05), cuda_graph=step_graph)
    batches = list(loaders.train)
    epoch = [batches[i % len(batches)] for i in range(5)]  # 2 eager, the capture, 2 replays; then 5 replays
    losses, masks = [], []
    for i in range(2):
        model.train()
        losses.append(engine.run_epoch(model, epoch, device, step=step)["loss"])
        if i == 0:  # drawn masks of the first epoch only: evaluation then replaces pruner.last, replays do not
            masks.append([m.cpu() for m in model.pruner.last.masks])
        with engine.kept_bn_statistics(model):
            engine.recalibrate_bn(model, epoch, device, batches=2)
            engine.evaluate(model, epoch, device)
    assert (step.graph is not None and step.graph.captured) == step_graph
    step.close()
    after = {f"after.{k}": p.detach().cpu() for k, p in model.pruner.hypernet.named_parameters()}
    after.update({k: v.cpu() for k, v in model.net.backbone.state_dict().items() if "running" in k})
    return losses, masks, after


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_step_graph_kept_across_epochs_matches_eager_epochs() -> None:
    """The graph captured in the first epoch, replayed in the second after validation ran in between."""
    _assert_same_steps(_kept_step_epochs(step_graph=True), _kept_step_epochs(step_graph=False), rtol=1e-3)
