"""One pruning run, stage by stage, resumable at any epoch: the driver.

pretrain (optional dense training) -> search (PASS: ``passray.search``; baselines: scores,
then optional head training) -> BN recalibration under the final masks -> physical pruning
(checked against the masked network) -> fine-tune -> export. The stages live in
``passray.stages``; this module only orders them and skips what a restored checkpoint
(``Runtime.restored``) says is finished.

Every epoch ends in ``reporter.report(metrics, save_state)``: the CLI ignores it, Ray
Train turns it into a checkpoint. The pipeline itself knows nothing about Ray
(``Runtime.wrap`` does DDP for it).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import safetensors.torch

from passray import stages
from passray._state_io import check_writable, write_atomically
from passray.config import Config
from passray.export import masks_from_structure
from passray.groups import build_groups
from passray.models import backbone_id
from passray.prunability import check_prunable
from passray.search import restore_hypernet, search_pass
from passray.stages import NullReporter, Reporter, RunContext, Runtime

__all__ = ["NullReporter", "Reporter", "RunContext", "Runtime", "execute", "pretrain", "run"]

_log = logging.getLogger(__name__)


def run(cfg: Config, runtime: Runtime | None = None) -> dict[str, Any]:
    """Run one configuration end to end; returns the final metrics."""
    return execute(RunContext(cfg, runtime or Runtime()))


def execute(ctx: RunContext) -> dict[str, Any]:
    """Every stage of ``ctx``'s run that its restored state has not finished; the final metrics.
    (``ctx`` holds the trained network, teacher and state afterwards.)"""
    cfg, rt, state = ctx.cfg, ctx.rt, ctx.state
    if rt.export_dir is not None and rt.rank == 0:  # the export is written last: refuse now, not then
        check_writable(rt.export_dir, "output_dir")
    ctx.setup()
    backbone = ctx.net.backbone
    check_prunable(backbone, ctx.ds.image_size, cfg.budget, backbone_id(cfg.model))  # refuse before any training
    if ctx.restored is not None and not state.done("search"):
        ctx.net.load_state_dict(ctx.restored["net"])
    stages.pretrain(ctx)
    if ctx.restored is None or not state.done("search", -1):
        state.results["dense_val_accuracy"] = ctx.evaluate(ctx.net, "val")["accuracy"]
    ctx.teacher = stages.dense_teacher(ctx)
    stages.prepare_groups(ctx, build_groups(backbone, ctx.ds.image_size))
    for name, why in ctx.groups.left_whole.items():
        _log.info("group %s is left whole: %s", name, why)
    if ctx.restored is not None and "masks" in ctx.restored:
        ctx.masks = [m.to(ctx.device) for m in ctx.restored["masks"]]
    elif rt.structure is not None:
        ctx.masks = [m.to(ctx.device) for m in masks_from_structure(rt.structure, ctx.groups)]
    if cfg.method == "pass" and rt.structure is None:
        if state.done("finetune", -1):
            restore_hypernet(ctx)
        else:
            search_pass(ctx)
    else:
        stages.baseline_search(ctx)
    ctx.broadcast_masks()
    if state.done("finetune", -1):  # resuming inside fine-tune: rebuild the pruned net, then load
        ctx.groups.prune(ctx.masks)
        ctx.net.load_state_dict(ctx.restored["net"])
    else:
        stages.prune(ctx)
    if state.stage in (None, "pretrain", "search"):
        state.stage, state.epoch = "finetune", -1
    stages.finetune(ctx)
    return stages.finish(ctx)


def pretrain(cfg: Config, path: str | Path, runtime: Runtime | None = None) -> dict[str, Any]:
    """Dense training only (or its cached result, ``pretrain.cache``); saves the backbone to ``path``
    (safetensors) for ``model.weights``.

    One checkpoint reused by every method, seed and trial is what makes comparisons fair.
    """
    ctx = RunContext(cfg, runtime or Runtime())
    ctx.setup()
    dense = stages.pretrain(ctx) or stages.dense_accuracies(ctx)
    if ctx.rt.rank == 0:
        state = {k: v.detach().cpu().contiguous() for k, v in ctx.net.backbone.state_dict().items()}
        write_atomically(path, safetensors.torch.save(state))  # a crash never leaves a file that looks finished
    return {"val_accuracy": dense["val_accuracy"], "test_accuracy": dense["test_accuracy"], "path": str(path),
            "wall_seconds": time.time() - ctx.started, "dense_reused": ctx.state.results.get("dense_reused", False)}
