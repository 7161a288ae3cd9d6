"""The stages of one pruning run, and the context they share.

pretrain (dense training, or the cached backbone) -> search (``passray.search`` for PASS;
``baseline_search`` here: scores -> masks, optional head training) -> ``prune`` (BN
recalibration under the final masks, physical pruning checked against the masked network)
-> ``finetune`` -> ``finish`` (results, structure, export). Each stage reads and writes
``RunContext``; what must survive a restart lives in ``RunContext.state`` (a ``RunState``),
the rest is rebuilt. Masks are passed to the network explicitly (``Masked``); nothing here
knows about Ray (``Runtime.wrap`` does DDP, ``Runtime.reporter`` checkpoints).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn

from passray import dense_cache, engine
from passray.cost import CostModel
from passray._state_io import save_state
from passray.budget import Allocator
from passray.config import Config, DataConfig, OptimConfig
from passray.data import Dataset, load_dataset, make_loaders
from passray.equivalence import check_equivalence, exact_fp32
from passray.export import measure, save_pruned, structure_record
from passray.groups import ChannelGroups
from passray.hypernet import PassHypernet, save_hypernet
from passray.importance import compute_scores
from passray.latency import LatencyCostModel, attach, measure_speedup
from passray.latency_tables import load_or_build_table
from passray.models import backbone_id, classifier, create_backbone
from passray.network import Masked, PrunableNet
from passray.prompts import create_prompt
from passray.run_state import RunState

__all__ = ["NullReporter", "Reporter", "RunContext", "Runtime", "baseline_search", "finetune", "finish",
           "prepare_groups", "pretrain", "prune"]


class Reporter(Protocol):
    def report(self, metrics: dict[str, Any], save_state: Callable[[Path], None] | None) -> None: ...


class NullReporter:
    """Local runs: metrics are printed by the CLI, no checkpoints."""

    def report(self, metrics: dict[str, Any], save_state: Callable[[Path], None] | None) -> None:
        return None


def _raise(err: Exception) -> None:
    raise err


@dataclass
class Runtime:
    """Where and how a run executes, and its extension points (all optional)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    # DDP under Ray Train; its flag: the parameters that reach the loss change between steps (PASS's warm-up)
    wrap: Callable[[nn.Module, bool], nn.Module] = lambda m, varying: m
    reporter: Reporter = field(default_factory=NullReporter)
    restored: dict[str, Any] | None = None  # state of the last checkpoint, if resuming
    progress: bool = True
    export_dir: str | None = None  # rank 0 writes the final export here (None under Ray: it is in the checkpoint)
    fault: Callable[[str], None] = field(default=lambda msg: _raise(RuntimeError(msg)))
    load_data: Callable[[DataConfig], Dataset] = load_dataset  # the data source (benchmarks memoise it)
    on_epoch_start: Callable[[str, int], None] | None = None  # (stage, epoch) before each epoch's first step
    # Transfer: start PASS from a trained hypernet (frozen: only prompt and head are fitted),
    # or skip search altogether with masks taken from a registered structure.
    hypernet: PassHypernet | None = None
    freeze_hypernet: bool = False
    structure: dict[str, Any] | None = None


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class RunContext:
    """What every stage reads and writes: config, runtime, data, network, groups, allocator, state."""

    def __init__(self, cfg: Config, rt: Runtime) -> None:
        self.cfg, self.rt = cfg, rt
        self.device = rt.device or engine.resolve_device(cfg.device)
        self.amp = cfg.amp and self.device.type == "cuda"
        self.restored = rt.restored
        self.state = RunState.from_dict(rt.restored["meta"]) if rt.restored is not None else RunState()
        self.hypernet: PassHypernet | None = None
        self.masks: list[torch.Tensor] | None = None  # the final masks, once search (or transfer) chose them
        self.teacher: nn.Module | None = None  # the dense network, kept for fine-tune distillation
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.structure: dict[str, Any] | None = None
        self.started = time.time()

    # -------------------------------------------------------------- setup
    def setup(self) -> None:
        """Data, loaders and the network (backbone + prompt) on the device."""
        cfg, rt = self.cfg, self.rt
        torch.manual_seed(cfg.seed)
        self.ds = rt.load_data(cfg.data)
        self.loaders = make_loaders(self.ds, cfg.data, self.device, rt.rank, rt.world_size, cfg.seed,
                                    cfg.channels_last and self.device.type == "cuda")
        backbone = create_backbone(cfg.model, self.ds.num_classes).to(self.device)
        if cfg.channels_last and self.device.type == "cuda":
            backbone = backbone.to(memory_format=torch.channels_last)
        self.net = PrunableNet(backbone, create_prompt(cfg.prompt, self.ds.image_size)).to(self.device)

    # -------------------------------------------------------------- checkpoints and reports
    def checkpoint(self) -> dict[str, Any]:
        """Everything a resumed run needs, as nested tensors and plain data."""
        state = {"meta": self.state.to_dict(), "net": self.net.state_dict()}
        if self.hypernet is not None:
            state["hypernet"] = self.hypernet.state_dict()
        if self.masks is not None:
            state["masks"] = [m.detach().cpu() for m in self.masks]
        if self.teacher is not None:  # a resumed run cannot rebuild it: pretraining is over, search moved the head
            state["teacher"] = self.teacher.state_dict()
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def report(self, metrics: dict[str, Any]) -> None:
        self.state.history.append(metrics)
        # "step": index of this report in the run, restored with the history, so an MLflow run
        # resumed after a worker restart continues its curves instead of restarting at step 0.
        self.rt.reporter.report({**metrics, **self.state.results, "step": len(self.state.history) - 1},
                                lambda d: save_state(d, self.checkpoint()))

    # -------------------------------------------------------------- the epoch loop
    def fit(self, stage: str, module: nn.Module, params: list, ocfg: OptimConfig,
            on_epoch_start: Callable[[int], bool | None] | None = None, evaluate: Callable[[], dict] | None = None,
            on_step: Callable[[int], None] | None = None, distill: engine.Distillation | None = None,
            varying: bool = False) -> None:
        """Epoch loop shared by pretrain, search and fine-tune; resumes mid-stage. ``varying``: which
        parameters reach the loss may change from step to step (``Runtime.wrap`` tells DDP).
        ``on_epoch_start(epoch)`` returns True when the step computes something else from that epoch on
        (PASS's warm-up ends): the stage's step, and its CUDA graph, are then made anew."""
        state, loaders = self.state, self.loaders
        if ocfg.epochs == 0 or state.done(stage, ocfg.epochs - 1):
            return
        steps = ocfg.epochs * len(loaders.train)
        self.optimizer, self.scheduler = engine.build_optimizer(params, ocfg, steps)
        first = 0
        if self.restored is not None and self.restored["meta"]["stage"] == stage and "optimizer" in self.restored:
            self.optimizer.load_state_dict(self.restored["optimizer"])
            self.scheduler.load_state_dict(self.restored["scheduler"])
            first = state.epoch + 1
        wrapped = self.rt.wrap(module, varying)
        step = None  # one Step for the stage's epochs: its CUDA graph is captured once, then replayed
        try:
            for epoch in range(first, ocfg.epochs):
                loaders.train.set_epoch(state.global_step + epoch)
                wrapped.train()
                changed = on_epoch_start(epoch) if on_epoch_start is not None else False
                if self.rt.on_epoch_start is not None:
                    self.rt.on_epoch_start(stage, epoch)
                if step is None or changed:
                    if step is not None:
                        step.close()
                    step = engine.Step(wrapped, self.device, optimizer=self.optimizer, scheduler=self.scheduler,
                                       amp=self.amp, label_smoothing=ocfg.label_smoothing, distill=distill,
                                       cuda_graph=self.cfg.cuda_graph, ddp_graph=self.cfg.train.ddp_cuda_graph)
                self._epoch(stage, epoch, ocfg, wrapped, module, step, evaluate, on_step)
        finally:
            if step is not None:
                step.close()
        self.optimizer = None

    def _epoch(self, stage: str, epoch: int, ocfg: OptimConfig, wrapped: nn.Module, module: nn.Module,
               step: engine.Step, evaluate: Callable[[], dict] | None, on_step: Callable[[int], None] | None) -> None:
        """One training epoch of ``fit``, its evaluation and its report."""
        state, loaders = self.state, self.loaders
        tic = time.perf_counter()
        start, first_of_epoch = state.global_step, epoch * len(loaders.train)

        def step_hook(i: int) -> None:
            self._fault_injection(i)
            if on_step is not None:
                on_step(first_of_epoch + i - start)  # step within this stage

        train = engine.run_epoch(wrapped, loaders.train, self.device, step=step, on_step=step_hook, step_offset=start,
                                 desc=f"{stage} {epoch + 1}/{ocfg.epochs}", progress=self.rt.progress)
        seconds = time.perf_counter() - tic  # run_epoch ends in a host read: the device is done
        state.global_step += len(loaders.train)
        engine.average_bn_statistics(module)
        val = evaluate() if evaluate else self.evaluate(module, "val")
        state.stage, state.epoch = stage, epoch
        state.results[f"{stage}_val_accuracy"] = val["accuracy"]
        self.report({"stage": stage, "epoch": epoch, "train_loss": train["loss"],
                     "train_accuracy": train["accuracy"], "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                     "epoch_seconds": seconds,
                     "images_per_second": len(loaders.train) * loaders.train.batch_size * self.rt.world_size / seconds,
                     **{k: v for k, v in val.items() if k not in ("loss", "accuracy")}})

    def _fault_injection(self, step: int) -> None:
        fail = self.cfg.train.fail_at_step
        if fail is not None and step == fail and self.restored is None:
            self.rt.fault(f"fault injection: train.fail_at_step={fail} reached on rank {self.rt.rank}")

    # -------------------------------------------------------------- evaluation and scores
    def evaluate(self, module: nn.Module, split: str) -> dict[str, float]:
        return engine.evaluate(module, getattr(self.loaders, split), self.device, self.amp)

    def recalibrate(self, module: nn.Module) -> None:
        engine.recalibrate_bn(module, self.loaders.train, self.device, self.cfg.bn_recalibration_batches, self.amp)

    def masked_val(self, masks: list[torch.Tensor]) -> dict[str, float]:
        """Val accuracy under hard masks after BN recalibration (what search reports each epoch).

        The BN buffers are put back afterwards: search with ``hypernet.batch_norm: frozen``
        must keep running on the backbone's statistics, not on the last validated masks'.
        """
        masked = Masked(self.net, masks)
        with engine.kept_bn_statistics(self.net):
            self.recalibrate(masked)
            return self.evaluate(masked, "val")

    def shared_scores(self, method: str) -> list[torch.Tensor]:
        """Baseline scores of the dense network (a baseline's, PASS's prior and reference), rank 0's on
        every rank (data-dependent ones differ per shard); BN statistics are left as they were."""
        with engine.kept_bn_statistics(self.net):
            scores = [s.to(self.device) for s in compute_scores(method, self.groups, self.net, self.loaders.train,
                                                                 seed=self.cfg.seed)]
        if distributed():
            for score in scores:
                torch.distributed.broadcast(score, src=0)
        return [s.cpu() for s in scores]

    def broadcast_masks(self) -> None:
        """All ranks must prune identically (masks restored or transferred on each rank)."""
        if distributed():
            for mask in self.masks:
                torch.distributed.broadcast(mask, src=0)

    def freeze_all_but_head(self) -> nn.Module:
        head = classifier(self.net.backbone)
        self.net.backbone.requires_grad_(False)
        head.requires_grad_(True)
        return head

    # -------------------------------------------------------------- latency
    def serving(self) -> tuple[int, str, bool]:
        """Batch, dtype and memory format the latency budget is about: the run's own on its device."""
        cuda = self.device.type == "cuda"
        return self.cfg.budget.latency_batch_size, "bf16" if self.amp else "fp32", self.cfg.channels_last and cuda

    def latency_cost(self) -> LatencyCostModel:
        """MACs/params cost model plus a latency table (measured once per device and cached)."""
        batch, dtype, channels_last = self.serving()
        table = load_or_build_table(self.groups, backbone_id(self.cfg.model), batch, dtype, self.device, channels_last,
                                    self.cfg.budget.latency_table)
        return attach(self.groups.cost, table)

    def cost_model(self) -> CostModel:
        """What the allocator counts: MACs/params, or latency from the device's table."""
        return self.latency_cost() if self.cfg.budget.kind == "latency" else self.groups.cost


# ------------------------------------------------------------------ pretrain
def pretrain(ctx: RunContext) -> dict[str, Any] | None:
    """Dense training, or the backbone an earlier run trained from the same ``dense_cache.dense_key``.

    Sets ``pretrain_seconds`` (run start to dense backbone ready: what a search's time must not
    include) and, when there is pretraining, ``dense_reused``. Returns the cache record (val/test
    accuracy of the dense backbone), None when the cache is off or there is no pretraining.
    """
    cfg, state = ctx.cfg, ctx.state
    if cfg.pretrain.epochs == 0 or state.done("pretrain", cfg.pretrain.epochs - 1):
        state.results.setdefault("pretrain_seconds", time.time() - ctx.started)
        return None
    key = dense_cache.dense_key(cfg, ctx.device, ctx.rt.world_size) if cfg.pretrain.cache else None
    record = _reuse_dense(ctx, key) if key is not None and state.stage is None else None
    reused = record is not None
    if reused:  # the rest of the run proceeds exactly as after training
        state.stage, state.epoch = "pretrain", cfg.pretrain.epochs - 1
        state.global_step += cfg.pretrain.epochs * len(ctx.loaders.train)
    else:
        tic = time.time()
        backbone = ctx.net.backbone
        ctx.fit("pretrain", backbone, list(backbone.parameters()), cfg.pretrain)
        if key is not None:
            record = _store_dense(ctx, key, time.time() - tic)
    state.results.update(dense_reused=reused, pretrain_seconds=time.time() - ctx.started)
    return record


def _reuse_dense(ctx: RunContext, key: dict[str, Any]) -> dict[str, Any] | None:
    """Load the cached backbone of ``key`` if a sound one exists; its record (empty on ranks > 0), else None.

    Rank 0 reads its cache; under DDP the other ranks take its answer and its weights, so
    all agree whatever their own node's cache holds."""
    backbone = ctx.net.backbone
    found = dense_cache.load(key, backbone.state_dict()) if ctx.rt.rank == 0 else None
    hit = torch.tensor([found is not None], dtype=torch.int32, device=ctx.device)
    if distributed():
        torch.distributed.broadcast(hit, src=0)
    if not hit.item():
        return None
    record: dict[str, Any] = {}
    if found is not None:
        state, record = found
        backbone.load_state_dict(state)
        print(f"reusing dense backbone {record['path']} (trained {record['created'].replace('T', ' ')[:16]}, "
              f"val {100 * record['val_accuracy']:.1f} %)", flush=True)
    if distributed():
        for tensor in backbone.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    return record


def _store_dense(ctx: RunContext, key: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Rank 0 stores the freshly trained backbone under ``key``; every rank evaluates (a collective)."""
    record = {**dense_accuracies(ctx), "epochs": ctx.cfg.pretrain.epochs, "wall_seconds": seconds}
    if ctx.rt.rank == 0:
        path = dense_cache.store(key, ctx.net.backbone.state_dict(), record)
        print(f"stored dense backbone {path} for reuse (val {100 * record['val_accuracy']:.1f} %)", flush=True)
    return record


def dense_accuracies(ctx: RunContext) -> dict[str, float]:
    return {f"{split}_accuracy": ctx.evaluate(ctx.net, split)["accuracy"] for split in ("val", "test")}


def dense_teacher(ctx: RunContext) -> nn.Module | None:
    """A frozen copy of the dense network (backbone with its own head, as loaded or pretrained) when
    fine-tune distils; taken before search, which trains the head on masked features."""
    cfg = ctx.cfg
    if cfg.finetune.distill.weight == 0 or cfg.finetune.epochs == 0:
        return None
    with torch.random.fork_rng(devices=[]):  # building it must not shift the run's random stream
        teacher = create_backbone(cfg.model.model_copy(update={"weights": None}), ctx.ds.num_classes)
    restored = ctx.restored is not None and "teacher" in ctx.restored
    teacher.load_state_dict(ctx.restored["teacher"] if restored else ctx.net.backbone.state_dict())
    if cfg.channels_last and ctx.device.type == "cuda":
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher.to(ctx.device).eval().requires_grad_(False)


# ------------------------------------------------------------------ structure
def prepare_groups(ctx: RunContext, groups: ChannelGroups) -> None:
    """Gate the network through ``groups`` and build the allocator every method prunes with."""
    ctx.groups = groups
    ctx.net.attach(groups)
    ctx.dense_macs = groups.cost.dense("macs")
    ctx.allocator = Allocator(ctx.cost_model(), ctx.cfg.budget, ctx.device)


def baseline_search(ctx: RunContext) -> None:
    """A baseline's masks from its scores, then (``head_epochs``) the head trained under them."""
    cfg = ctx.cfg
    if ctx.masks is None:
        ctx.masks = ctx.allocator(ctx.shared_scores(cfg.method)).masks
    if cfg.head_epochs:  # same head training PASS's search gives its head, for a fair comparison
        head = ctx.freeze_all_but_head()
        ctx.fit("search", Masked(ctx.net, ctx.masks), list(head.parameters()),
                cfg.search.model_copy(update={"epochs": cfg.head_epochs}), evaluate=lambda: ctx.masked_val(ctx.masks))
        ctx.net.backbone.requires_grad_(True)


# ------------------------------------------------------------------ prune
def prune(ctx: RunContext) -> None:
    """Recalibrate, evaluate before fine-tuning, then physically prune and check equivalence."""
    masked, results = Masked(ctx.net, ctx.masks), ctx.state.results
    if "val_accuracy_before_finetune" not in results:
        ctx.recalibrate(masked)
        results["val_accuracy_before_finetune"] = ctx.evaluate(masked, "val")["accuracy"]
        results["test_accuracy_before_finetune"] = ctx.evaluate(masked, "test")["accuracy"]
    probe = next(iter(ctx.loaders.val))[0][:16].float()
    ctx.net.eval()
    with torch.no_grad(), exact_fp32():
        before = masked(probe)
    results["macs_ratio"] = ctx.groups.cost_ratio(ctx.masks, "macs")
    results["params_ratio"] = ctx.groups.cost_ratio(ctx.masks, "params")
    speed = ctx.cfg.budget.kind == "latency" or ctx.cfg.budget.measure_speedup
    if speed:
        cost = ctx.allocator.cost if isinstance(ctx.allocator.cost, LatencyCostModel) else ctx.latency_cost()
        kept = ctx.groups.kept_counts(ctx.masks).to(cost.widths.device)[None]
        results["latency_ratio_predicted"] = float(cost.cost(kept, "latency")[0]) / cost.dense("latency")
        results["speedup_predicted"] = 1 / results["latency_ratio_predicted"]
    ctx.groups.prune(ctx.masks)
    with torch.no_grad(), exact_fp32():
        results["equivalence_max_abs_diff"] = check_equivalence(before, ctx.net(probe))
    if speed:  # same shapes, fresh weights: latency does not depend on them
        batch, dtype, channels_last = ctx.serving()
        dense_net = create_backbone(ctx.cfg.model.model_copy(update={"weights": None}), ctx.ds.num_classes)
        measured = measure_speedup(dense_net, ctx.net.backbone, ctx.groups.input_shape, batch, dtype, ctx.device,
                                   channels_last=channels_last)
        results.update(speedup_measured=measured["speedup"], latency_dense_ms=measured["dense_ms"],
                       latency_pruned_ms=measured["pruned_ms"])


# ------------------------------------------------------------------ fine-tune
def finetune(ctx: RunContext) -> None:
    """Train the pruned network (all of it), reporting test accuracy beside val each epoch."""
    net = ctx.net

    def val_and_test() -> dict[str, float]:  # test for reporting only: no decision reads it
        return {**ctx.evaluate(net, "val"), "test_accuracy": ctx.evaluate(net, "test")["accuracy"]}

    ctx.fit("finetune", net, list(net.parameters()), ctx.cfg.finetune, evaluate=val_and_test,
            distill=_distillation(ctx))


def _distillation(ctx: RunContext) -> engine.Distillation | None:
    """Fine-tune's KD from the dense network, for PASS and every baseline alike.

    The teacher is the dense network with its *own* head, fed the raw batch (it never had a
    prompt). Where that head was never trained on these classes (a new head: the ``shifted``
    setting, a random network) there is no dense teacher, and the head search or head training
    fitted to *masked* features is no classifier of dense ones: a dense network that validates no
    better than the pruned student does before fine-tuning is refused, not distilled from.
    """
    if ctx.teacher is None:
        return None
    results = ctx.state.results
    dense, student = results["dense_val_accuracy"], results["val_accuracy_before_finetune"]  # the teacher's val
    distill = ctx.cfg.finetune.distill
    if dense <= student:
        raise ValueError(f"finetune.distill.weight={distill.weight}: the dense teacher "
                         f"(val accuracy {dense:.4f}) is no better than the pruned student before fine-tuning "
                         f"({student:.4f}); is its head new (not trained on these classes)? Set it to 0 here")
    return engine.Distillation(ctx.teacher, distill.weight, distill.temperature)


# ------------------------------------------------------------------ finish and export
def finish(ctx: RunContext) -> dict[str, Any]:
    """Final accuracies and sizes, the structure record, the export (rank 0), the last report."""
    cfg, state = ctx.cfg, ctx.state
    results = state.results
    results["val_accuracy"] = ctx.evaluate(ctx.net, "val")["accuracy"]
    results["test_accuracy"] = ctx.evaluate(ctx.net, "test")["accuracy"]
    results.update({f"pruned_{k}": v for k, v in measure(ctx.net, ctx.ds.image_size).items()})
    results["dense_macs"] = ctx.dense_macs
    results["wall_seconds"] = time.time() - ctx.started
    ctx.structure = structure_record(
        ctx.groups, ctx.masks, cfg.model, ctx.ds.num_classes, ctx.ds.image_size, ctx.net.prompt,
        {"method": cfg.method, "budget": cfg.budget.model_dump(),
         "data": {"name": cfg.data.name, "classes": ctx.ds.class_names, "mean": list(ctx.ds.mean),
                  "std": list(ctx.ds.std)},
         "macs": {"dense": ctx.dense_macs, "pruned": results["pruned_macs"]},
         "results": dict(results), "left_whole": ctx.groups.left_whole, "search": search_record(state),
         "pruning_history": ctx.groups.pruning_history()})
    if ctx.rt.rank == 0 and ctx.rt.export_dir is not None:
        export(ctx, ctx.rt.export_dir)
    state.stage, state.epoch = "done", 0

    def final_checkpoint(directory: Path) -> None:  # resumable state (stage 'done') and the export, side by side
        export(ctx, directory)  # first: save_pruned replaces the whole directory (atomic_directory)
        save_state(directory, ctx.checkpoint())

    ctx.rt.reporter.report({"stage": "done", **results, "step": len(state.history)}, final_checkpoint)
    return {"method": cfg.method, "keep_ratio": cfg.budget.keep_ratio, **results, "history": list(state.history)}


def search_record(state: RunState) -> dict[str, Any] | None:
    """What the search did, epoch by epoch (drawn into search.png); None without a PASS search."""
    epochs = [h for h in state.history if h.get("stage") == "search" and "mask_overlap_initial" in h]
    if not epochs:
        return None
    results = state.results
    return {"initial_val": results["initial_masked_val_accuracy"], "best_val": results["search_best_val_accuracy"],
            "val_per_epoch": [h["val_accuracy"] for h in epochs],
            "overlap_initial": [h["mask_overlap_initial"] for h in epochs],
            "overlap_taylor": [h["mask_overlap_taylor"] for h in epochs],
            "kept_per_epoch": [h["kept_per_group"] for h in epochs], "taylor_kept": state.search.taylor_kept}


def export(ctx: RunContext, directory: str | Path) -> None:
    """structure.json + weights.safetensors (+ hypernet/) of the final pruned network."""
    hypernet, extra = ctx.hypernet, {"backbone_id": backbone_id(ctx.cfg.model), "prompt": ctx.cfg.prompt.model_dump()}
    write_hypernet = None if hypernet is None else (lambda tmp: save_hypernet(hypernet, tmp / "hypernet", extra))
    save_pruned(directory, ctx.net, ctx.structure, write_hypernet)
