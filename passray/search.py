"""The PASS search, top to bottom: hypernet θ, prompt encoder ω, prompt V and head, backbone frozen.

1. Score the dense network with global Taylor: the prior the scorer starts from
   (``hypernet.prior``) and the reference every epoch is compared with.
2. Build the pruner (``passray.hypernet``): per-channel scores from layer statistics, an
   LSTM over the layers and the prompt's encoding, turned into masks that meet the
   budget exactly (``passray.budget``), with straight-through gradients.
3. Validate the start (the prior's masks): search must beat it to matter.
4. Train epoch by epoch: warm-up epochs fit head and prompt under the prior's masks, then
   masks follow the hypernet at every step (logistic noise of an annealed temperature);
   BN keeps the backbone's statistics (``hypernet.batch_norm: frozen``).
5. After each epoch, validate the hard masks (after BN recalibration) and keep the best
   (``hypernet.keep``), with the head and prompt of that epoch.
6. Hand the best masks to pruning; restore that epoch's head and prompt.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from passray.hypernet import PassPruner, create_pass_pruner, global_priors
from passray.network import PrunableNet
from passray.run_state import kept_indices, masks_from_kept
from passray.stages import RunContext

__all__ = ["SearchNet", "restore_hypernet", "search_pass"]


class SearchNet(nn.Module):
    """The network with masks from the pruner on every forward (so DDP sees hypernet, prompt and head),
    or, during warm-up, fixed ones."""

    def __init__(self, net: PrunableNet, pruner: PassPruner) -> None:
        super().__init__()
        self.net, self.pruner = net, pruner
        self.fixed: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masks = self.fixed if self.fixed is not None else self.pruner(self.net.prompt.tensor())
        return self.net(x, masks)


def search_pass(ctx: RunContext) -> None:
    """Search the masks with PASS; leaves them in ``ctx.masks`` and the hypernet in ``ctx.hypernet``."""
    cfg, state, net = ctx.cfg, ctx.state, ctx.net
    record = state.search
    # 1. Taylor: the prior and the reference; 2. the pruner (restored mid-search)
    taylor = ctx.shared_scores("taylor")
    priors = global_priors(taylor) if cfg.hypernet.prior == "taylor" else None
    pruner = create_pass_pruner(ctx.groups, cfg.hypernet, ctx.allocator, net.prompt.enabled, ctx.rt.hypernet,
                                priors, cfg.seed).to(ctx.device)
    reference = kept_indices(ctx.allocator(taylor).masks)
    record.taylor_kept = [len(k) for k in reference]
    ctx.hypernet = pruner.hypernet
    if ctx.restored is not None and "hypernet" in ctx.restored:
        ctx.hypernet.load_state_dict(ctx.restored["hypernet"])
    head = ctx.freeze_all_but_head()
    # 3. the start
    prior_masks = pruner.hard_masks(net.prompt.tensor()).masks
    if not state.done("search", -1) and "initial_masked_val_accuracy" not in state.results:
        initial = ctx.masked_val(prior_masks)
        state.results["initial_masked_val_accuracy"] = initial["accuracy"]
        record.initial_kept = kept_indices(prior_masks)
        _keep(record, initial["accuracy"], record.initial_kept, _snapshot(head, net))
    # 4. the epochs
    searching = SearchNet(net, pruner)
    total = max(cfg.search.epochs * len(ctx.loaders.train), 1)
    t0, t1 = cfg.hypernet.temperature, cfg.hypernet.temperature_final or cfg.hypernet.temperature

    def start_epoch(epoch: int) -> bool:
        """Warm-up (head and prompt only, under the prior masks), then the search; True where it switches."""
        searching.fixed = prior_masks if epoch < cfg.hypernet.warmup_epochs else None
        if cfg.hypernet.batch_norm == "frozen":
            for m in net.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return epoch == cfg.hypernet.warmup_epochs

    def anneal(step: int) -> None:  # geometric, t0 at the first step to t1 at the last
        pruner.temperature = t0 * (t1 / t0) ** min(step / max(total - 1, 1), 1.0)

    def masked_eval() -> dict[str, float]:  # 5. validate the hard masks, keep the best
        allocation = pruner.hard_masks(net.prompt.tensor())
        out = ctx.masked_val(allocation.masks)
        kept = kept_indices(allocation.masks)
        if out["accuracy"] > record.best_accuracy or cfg.hypernet.keep == "last":
            _keep(record, out["accuracy"], kept, _snapshot(head, net))
        out.update(mask_overlap_initial=overlap(kept, record.initial_kept), mask_overlap_taylor=overlap(kept, reference),
                   kept_per_group=[len(k) for k in kept], macs_ratio=ctx.groups.cost_ratio(allocation.masks, "macs"))
        if cfg.budget.kind != "macs":
            out[f"{cfg.budget.kind}_ratio"] = float(allocation.ratio)
        return out

    ctx.hypernet.requires_grad_(not ctx.rt.freeze_hypernet)
    params = [{"params": list(ctx.hypernet.parameters()), "lr": cfg.hypernet.lr or cfg.search.lr},
              {"params": [*net.prompt.parameters(), *head.parameters()]}]
    ctx.fit("search", searching, params, cfg.search, on_epoch_start=start_epoch, evaluate=masked_eval, on_step=anneal,
            varying=cfg.hypernet.warmup_epochs > 0)  # warm-up epochs leave the hypernet out of the loss
    # 6. the best masks (initial ones included; val is for decisions), with that epoch's head and prompt
    ctx.masks = masks_from_kept(record.best_kept, ctx.groups.widths, ctx.device)
    state.results["search_best_val_accuracy"] = record.best_accuracy
    head.load_state_dict(record.best_trained["head"])
    net.prompt.load_state_dict(record.best_trained["prompt"])
    net.backbone.requires_grad_(True)


def restore_hypernet(ctx: RunContext) -> None:
    """Resuming after the search: the searched hypernet, for the export."""
    ctx.hypernet = create_pass_pruner(ctx.groups, ctx.cfg.hypernet, ctx.allocator, ctx.net.prompt.enabled,
                                      ctx.rt.hypernet).hypernet
    ctx.hypernet.load_state_dict(ctx.restored["hypernet"])


def _keep(record, accuracy: float, kept: list[list[int]], trained: dict[str, dict[str, torch.Tensor]]) -> None:
    record.best_accuracy, record.best_kept, record.best_trained = accuracy, kept, trained


def _snapshot(head: nn.Module, net: PrunableNet) -> dict[str, dict[str, torch.Tensor]]:
    copy = lambda module: {k: v.detach().clone() for k, v in module.state_dict().items()}  # noqa: E731
    return {"head": copy(head), "prompt": copy(net.prompt)}


def overlap(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """Kept channels two structures share, over the channels either keeps (1: the same masks)."""
    shared = sum(len(set(x) & set(y)) for x, y in zip(a, b))
    return shared / max(sum(len(set(x) | set(y)) for x, y in zip(a, b)), 1)
