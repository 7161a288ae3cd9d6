"""One pruning run, stage by stage, resumable at any epoch.

pretrain (optional dense training) -> search (PASS: joint search of hypernet, prompt
encoder, prompt and head with the backbone frozen; baselines: scores, then optional
head training) -> BN recalibration under the final masks -> physical pruning (checked
against the masked network) -> fine-tune -> export.

Every epoch ends in ``reporter.report(metrics, save_state)``: the CLI ignores it, Ray
Train turns it into a checkpoint, and a restored state skips finished stages and epochs.
The pipeline itself knows nothing about Ray (``Runtime.wrap`` does DDP for it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn
from safetensors.torch import save_file

from passray import dense_cache, engine
from passray._cost import CostModel
from passray._state_io import check_writable, save_state
from passray.budget import Allocator
from passray.config import Config, OptimConfig
from passray.data import load_dataset, make_loaders
from passray.export import (build_groups, check_equivalence, exact_fp32, masks_from_structure, measure, save_pruned,
                            structure_record)
from passray.hypernet import PassHypernet, create_pass_pruner, global_priors
from passray.importance import compute_scores
from passray.latency import LatencyCostModel, attach, measure_speedup
from passray.models import backbone_id, classifier, create_backbone
from passray.network import PrunableNet
from passray.profile import load_or_build_table
from passray.prompts import create_prompt
from passray.prunability import check_prunable

__all__ = ["NullReporter", "Reporter", "Runtime", "pretrain", "run"]

STAGES = ("pretrain", "search", "finetune", "done")
_log = logging.getLogger(__name__)


class Reporter(Protocol):
    def report(self, metrics: dict[str, Any], save_state: Callable[[Path], None] | None) -> None: ...


class NullReporter:
    """Local runs: metrics are printed by the CLI, no checkpoints."""

    def report(self, metrics: dict[str, Any], save_state: Callable[[Path], None] | None) -> None:
        return None


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m  # DDP under Ray Train
    reporter: Reporter = field(default_factory=NullReporter)
    restored: dict[str, Any] | None = None  # state of the last checkpoint, if resuming
    progress: bool = True
    export_dir: str | None = None  # rank 0 writes the final export here (None under Ray: it is in the checkpoint)
    fault: Callable[[str], None] = field(default=lambda msg: _raise(RuntimeError(msg)))
    # Transfer: start PASS from a trained hypernet (frozen: only prompt and head are fitted),
    # or skip search altogether with masks taken from a registered structure.
    hypernet: PassHypernet | None = None
    freeze_hypernet: bool = False
    structure: dict[str, Any] | None = None


def _raise(err: Exception) -> None:
    raise err


class _Run:
    def __init__(self, cfg: Config, rt: Runtime) -> None:
        self.cfg, self.rt = cfg, rt
        self.device = rt.device or engine.resolve_device(cfg.device)
        self.amp = cfg.amp and self.device.type == "cuda"
        self.meta: dict[str, Any] = {"stage": None, "epoch": -1, "global_step": 0, "history": [], "results": {}}
        self.restored = rt.restored
        if self.restored is not None:
            self.meta.update(self.restored["meta"])
        self.hypernet: PassHypernet | None = None
        self.masks: list[torch.Tensor] | None = None
        self.teacher: nn.Module | None = None  # the dense network, kept for fine-tune distillation
        self.started = time.time()

    # -------------------------------------------------------------- helpers
    def _done(self, stage: str, epoch: int | None = None) -> bool:
        """Was this stage (or this epoch of it) finished before the restored checkpoint?"""
        if self.meta["stage"] is None:
            return False
        here, there = STAGES.index(stage), STAGES.index(self.meta["stage"])
        return here < there or (here == there and epoch is not None and epoch <= self.meta["epoch"])

    def _on_step(self, step: int) -> None:
        fail = self.cfg.train.fail_at_step
        if fail is not None and step == fail and self.restored is None:
            self.rt.fault(f"fault injection: train.fail_at_step={fail} reached on rank {self.rt.rank}")

    def _state(self) -> dict[str, Any]:
        state = {"meta": self.meta, "net": self.net.state_dict()}
        if self.hypernet is not None:
            state["hypernet"] = self.hypernet.state_dict()
        if self.masks is not None:
            state["masks"] = [m.detach().cpu() for m in self.masks]
        if self.teacher is not None:  # a resumed run cannot rebuild it: pretraining is over, search moved the head
            state["teacher"] = self.teacher.state_dict()
        if getattr(self, "optimizer", None) is not None:
            state["optimizer"] = self.optimizer.state_dict()
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def _report(self, metrics: dict[str, Any]) -> None:
        self.meta["history"].append(metrics)
        # "step": index of this report in the run, restored with the history, so an MLflow run
        # resumed after a worker restart continues its curves instead of restarting at step 0.
        self.rt.reporter.report({**metrics, **self.meta["results"], "step": len(self.meta["history"]) - 1},
                                lambda d: save_state(d, self._state()))

    # -------------------------------------------------------------- stages
    def _fit(self, stage: str, module: nn.Module, params: list[nn.Parameter], ocfg: OptimConfig,
             on_epoch_start: Callable[[int], None] | None = None, evaluate: Callable[[], dict] | None = None,
             on_step: Callable[[int], None] | None = None, distill: engine.Distillation | None = None) -> None:
        """Epoch loop shared by pretrain, search and fine-tune; resumes mid-stage."""
        if ocfg.epochs == 0 or self._done(stage, ocfg.epochs - 1):
            return
        loaders = self.loaders
        steps = ocfg.epochs * len(loaders.train)
        self.optimizer, self.scheduler = engine.build_optimizer(params, ocfg, steps)
        first = 0
        if self.restored is not None and self.restored["meta"]["stage"] == stage and "optimizer" in self.restored:
            self.optimizer.load_state_dict(self.restored["optimizer"])
            self.scheduler.load_state_dict(self.restored["scheduler"])
            first = self.meta["epoch"] + 1
        wrapped = self.rt.wrap(module)
        for epoch in range(first, ocfg.epochs):
            loaders.train.set_epoch(self.meta["global_step"] + epoch)
            wrapped.train()
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            tic = time.perf_counter()
            start, first_of_epoch = self.meta["global_step"], epoch * len(loaders.train)

            def step_hook(step: int) -> None:
                self._on_step(step)
                if on_step is not None:
                    on_step(first_of_epoch + step - start)  # step within this stage

            train = engine.run_epoch(wrapped, loaders.train, self.device, optimizer=self.optimizer,
                                     scheduler=self.scheduler, amp=self.amp, label_smoothing=ocfg.label_smoothing,
                                     distill=distill,
                                     on_step=step_hook, step_offset=start,
                                     desc=f"{stage} {epoch + 1}/{ocfg.epochs}", progress=self.rt.progress)
            seconds = time.perf_counter() - tic  # run_epoch ends in a host read: the device is done
            self.meta["global_step"] += len(loaders.train)
            val = evaluate() if evaluate else engine.evaluate(module, loaders.val, self.device, self.amp)
            self.meta.update(stage=stage, epoch=epoch)
            self.meta["results"][f"{stage}_val_accuracy"] = val["accuracy"]
            self._report({"stage": stage, "epoch": epoch, "train_loss": train["loss"],
                          "train_accuracy": train["accuracy"], "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                          "epoch_seconds": seconds,
                          "images_per_second": len(loaders.train) * loaders.train.batch_size * self.rt.world_size / seconds,
                          **{k: v for k, v in val.items() if k not in ("loss", "accuracy")}})
        self.optimizer = None

    def _dense_teacher(self) -> nn.Module | None:
        """A frozen copy of the dense network (backbone with its own head, as loaded or pretrained) when
        fine-tune distils; taken before search, which trains the head on masked features."""
        if self.cfg.finetune.distill.weight == 0 or self.cfg.finetune.epochs == 0:
            return None
        with torch.random.fork_rng(devices=[]):  # building it must not shift the run's random stream
            teacher = create_backbone(self.cfg.model.model_copy(update={"weights": None}), self.ds.num_classes)
        restored = self.restored is not None and "teacher" in self.restored
        teacher.load_state_dict(self.restored["teacher"] if restored else self.net.backbone.state_dict())
        if self.cfg.channels_last and self.device.type == "cuda":
            teacher = teacher.to(memory_format=torch.channels_last)
        return teacher.to(self.device).eval().requires_grad_(False)

    def _distillation(self) -> engine.Distillation | None:
        """Fine-tune's KD from the dense network, for PASS and every baseline alike.

        The teacher is the dense network with its *own* head, fed the raw batch (it never had a
        prompt). Where that head was never trained on these classes (a new head: the ``shifted``
        setting, a random network) there is no dense teacher, and the head search or head training
        fitted to *masked* features is no classifier of dense ones: a dense network that validates no
        better than the pruned student does before fine-tuning is refused, not distilled from.
        """
        if self.teacher is None:
            return None
        results = self.meta["results"]
        dense, student = results["dense_val_accuracy"], results["val_accuracy_before_finetune"]  # the teacher's val
        if dense <= student:
            raise ValueError(f"finetune.distill.weight={self.cfg.finetune.distill.weight}: the dense teacher "
                             f"(val accuracy {dense:.4f}) is no better than the pruned student before fine-tuning "
                             f"({student:.4f}); is its head new (not trained on these classes)? Set it to 0 here")
        distill = self.cfg.finetune.distill
        return engine.Distillation(self.teacher, distill.weight, distill.temperature)

    def _val_and_test(self) -> dict[str, float]:
        """Fine-tune epochs also report test accuracy (for reporting only: no decision reads it)."""
        val = engine.evaluate(self.net, self.loaders.val, self.device, self.amp)
        return {**val, "test_accuracy": engine.evaluate(self.net, self.loaders.test, self.device, self.amp)["accuracy"]}

    def _masked_val(self, masks: list[torch.Tensor]) -> dict[str, float]:
        """Val accuracy under hard masks after BN recalibration (what search reports each epoch).

        The BN buffers are put back afterwards: search with ``hypernet.batch_norm: frozen``
        must keep running on the backbone's statistics, not on the last validated masks'.
        """
        self.net.fix_masks(masks)
        with engine.kept_bn_statistics(self.net):
            engine.recalibrate_bn(self.net, self.loaders.train, self.device, self.cfg.bn_recalibration_batches, self.amp)
            return engine.evaluate(self.net, self.loaders.val, self.device, self.amp)

    def _search_pass(self) -> None:
        cfg = self.cfg
        backbone = self.net.backbone
        taylor = self._shared_scores("taylor")  # the strongest baseline: a prior, and a reference to compare with
        priors = global_priors(taylor) if cfg.hypernet.prior == "taylor" else None
        pruner = create_pass_pruner(self.groups, cfg.hypernet, self.allocator, self.net.prompt.enabled,
                                    self.rt.hypernet, priors, cfg.seed).to(self.device)
        reference = self._kept(self.allocator(taylor).masks)
        self.meta["taylor_kept"] = [len(k) for k in reference]
        self.hypernet = pruner.hypernet
        if self.restored is not None and "hypernet" in self.restored:
            self.hypernet.load_state_dict(self.restored["hypernet"])
        head = self._freeze_all_but_head()
        best = self.meta.setdefault("best_search", {"accuracy": -1.0, "masks": None})
        prior_masks = pruner.hard_masks(self.net.prompt.tensor()).masks  # the start; warm-up epochs keep them
        if not self._done("search", -1) and "initial_masked_val_accuracy" not in self.meta["results"]:
            initial = self._masked_val(prior_masks)
            self.meta["results"]["initial_masked_val_accuracy"] = initial["accuracy"]
            self.meta["initial_masks"] = self._kept(prior_masks)
            best.update(accuracy=initial["accuracy"], masks=self.meta["initial_masks"], trained=self._snapshot(head))
        total = max(cfg.search.epochs * len(self.loaders.train), 1)
        t0, t1 = cfg.hypernet.temperature, cfg.hypernet.temperature_final or cfg.hypernet.temperature

        def start_epoch(epoch: int) -> None:
            if epoch < cfg.hypernet.warmup_epochs:  # head (and prompt) only, under the prior's masks
                self.net.fix_masks(prior_masks)
            else:
                self.net.attach(self.groups, pruner)
            if cfg.hypernet.batch_norm == "frozen":
                for m in self.net.backbone.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()

        def anneal(step: int) -> None:  # geometric, t0 at the first step to t1 at the last
            pruner.temperature = t0 * (t1 / t0) ** min(step / max(total - 1, 1), 1.0)

        def masked_eval() -> dict[str, float]:
            allocation = pruner.hard_masks(self.net.prompt.tensor())
            out = self._masked_val(allocation.masks)
            kept = self._kept(allocation.masks)
            if out["accuracy"] > best["accuracy"] or cfg.hypernet.keep == "last":
                best.update(accuracy=out["accuracy"], masks=kept, trained=self._snapshot(head))
            out.update(mask_overlap_initial=_overlap(kept, self.meta["initial_masks"]),
                       mask_overlap_taylor=_overlap(kept, reference), kept_per_group=[len(k) for k in kept],
                       macs_ratio=self.groups.cost_ratio(allocation.masks, "macs"))
            if cfg.budget.kind != "macs":
                out[f"{cfg.budget.kind}_ratio"] = float(allocation.ratio)
            return out

        self.hypernet.requires_grad_(not self.rt.freeze_hypernet)
        params = [{"params": list(self.hypernet.parameters()), "lr": cfg.hypernet.lr or cfg.search.lr},
                  {"params": [*self.net.prompt.parameters(), *head.parameters()]}]
        self.net.attach(self.groups, pruner)  # before _fit wraps the net: DDP must see the hypernet's parameters
        self._fit("search", self.net, params, cfg.search, on_epoch_start=start_epoch, evaluate=masked_eval,
                  on_step=anneal)
        # hypernet.keep=best: the masks that validated best (initial ones included); val is for decisions.
        self.masks = [torch.zeros(w, device=self.device).index_fill_(0, torch.as_tensor(k, device=self.device), 1.0)
                      for w, k in zip(self.groups.widths, best["masks"])]
        self.meta["results"]["search_best_val_accuracy"] = best["accuracy"]
        head.load_state_dict(best["trained"]["head"])  # with the head and prompt of that epoch
        self.net.prompt.load_state_dict(best["trained"]["prompt"])
        self.net.fix_masks(self.masks)
        self.net.backbone.requires_grad_(True)

    def _shared_scores(self, method: str) -> list[torch.Tensor]:
        """Baseline scores of the dense network (a baseline's, PASS's prior and reference), rank 0's on
        every rank (data-dependent ones differ per shard); BN statistics are left as they were."""
        with engine.kept_bn_statistics(self.net):
            scores = [s.to(self.device) for s in compute_scores(method, self.groups, self.net, self.loaders.train,
                                                                 seed=self.cfg.seed)]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for score in scores:
                torch.distributed.broadcast(score, src=0)
        return [s.cpu() for s in scores]

    def _broadcast_masks(self) -> None:
        """All ranks must prune identically (masks restored or transferred on each rank)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for mask in self.masks:
                torch.distributed.broadcast(mask, src=0)

    def _snapshot(self, head: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        copy = lambda module: {k: v.detach().clone() for k, v in module.state_dict().items()}  # noqa: E731
        return {"head": copy(head), "prompt": copy(self.net.prompt)}

    @staticmethod
    def _kept(masks: list[torch.Tensor]) -> list[list[int]]:
        return [torch.nonzero(m > 0.5).flatten().tolist() for m in masks]

    def _freeze_all_but_head(self) -> nn.Module:
        head = classifier(self.net.backbone)
        self.net.backbone.requires_grad_(False)
        head.requires_grad_(True)
        return head

    def _search_baseline(self) -> None:
        cfg = self.cfg
        if self.masks is None:
            self.masks = self.allocator(self._shared_scores(cfg.method)).masks
        self.net.fix_masks(self.masks)
        if cfg.head_epochs:  # same head training PASS's search gives its head, for a fair comparison
            head = self._freeze_all_but_head()
            self._fit("search", self.net, list(head.parameters()), cfg.search.model_copy(update={"epochs": cfg.head_epochs}),
                      evaluate=lambda: self._masked_val(self.masks))
            self.net.fix_masks(self.masks)
            self.net.backbone.requires_grad_(True)

    def _prune(self) -> None:
        """Recalibrate, evaluate before fine-tuning, then physically prune and check equivalence."""
        self.net.fix_masks(self.masks)
        results = self.meta["results"]
        if "val_accuracy_before_finetune" not in results:
            engine.recalibrate_bn(self.net, self.loaders.train, self.device, self.cfg.bn_recalibration_batches, self.amp)
            results["val_accuracy_before_finetune"] = engine.evaluate(self.net, self.loaders.val, self.device, self.amp)["accuracy"]
            results["test_accuracy_before_finetune"] = engine.evaluate(self.net, self.loaders.test, self.device, self.amp)["accuracy"]
        probe = next(iter(self.loaders.val))[0][:16].float()
        self.net.eval()
        with torch.no_grad(), exact_fp32():
            masked = self.net(probe)
        results["macs_ratio"] = self.groups.cost_ratio(self.masks, "macs")
        results["params_ratio"] = self.groups.cost_ratio(self.masks, "params")
        speed = self.cfg.budget.kind == "latency" or self.cfg.budget.measure_speedup
        if speed:
            cost = self.allocator.cost if isinstance(self.allocator.cost, LatencyCostModel) else self._latency_cost()
            kept = self.groups.kept_counts(self.masks).to(cost.widths.device)[None]
            results["latency_ratio_predicted"] = float(cost.cost(kept, "latency")[0]) / cost.dense("latency")
            results["speedup_predicted"] = 1 / results["latency_ratio_predicted"]
        self.groups.prune(self.masks)
        with torch.no_grad(), exact_fp32():
            results["equivalence_max_abs_diff"] = check_equivalence(masked, self.net(probe))
        if speed:  # same shapes, fresh weights: latency does not depend on them
            batch, dtype, channels_last = self._serving()
            dense_net = create_backbone(self.cfg.model.model_copy(update={"weights": None}), self.ds.num_classes)
            measured = measure_speedup(dense_net, self.net.backbone, self.groups.input_shape, batch, dtype, self.device,
                                       channels_last=channels_last)
            results.update(speedup_measured=measured["speedup"], latency_dense_ms=measured["dense_ms"],
                           latency_pruned_ms=measured["pruned_ms"])

    def _serving(self) -> tuple[int, str, bool]:
        """Batch, dtype and memory format the latency budget is about: the run's own on its device."""
        cuda = self.device.type == "cuda"
        return self.cfg.budget.latency_batch_size, "bf16" if self.amp else "fp32", self.cfg.channels_last and cuda

    def _cost_model(self) -> CostModel:
        """What the allocator counts: MACs/params, or latency from the device's table."""
        return self._latency_cost() if self.cfg.budget.kind == "latency" else self.groups.cost

    def _latency_cost(self) -> LatencyCostModel:
        """MACs/params cost model plus a latency table (measured once per device and cached)."""
        batch, dtype, channels_last = self._serving()
        table = load_or_build_table(self.groups, backbone_id(self.cfg.model), batch, dtype, self.device, channels_last,
                                    self.cfg.budget.latency_table)
        return attach(self.groups.cost, table)

    # -------------------------------------------------------------- main
    def setup(self) -> None:
        cfg, rt = self.cfg, self.rt
        torch.manual_seed(cfg.seed)
        self.ds = load_dataset(cfg.data)
        self.loaders = make_loaders(self.ds, cfg.data, self.device, rt.rank, rt.world_size, cfg.seed,
                                    cfg.channels_last and self.device.type == "cuda")
        backbone = create_backbone(cfg.model, self.ds.num_classes).to(self.device)
        if cfg.channels_last and self.device.type == "cuda":
            backbone = backbone.to(memory_format=torch.channels_last)
        self.net = PrunableNet(backbone, create_prompt(cfg.prompt, self.ds.image_size)).to(self.device)

    def _pretrain(self) -> dict[str, Any] | None:
        """Dense training, or the backbone an earlier run trained from the same ``dense_cache.dense_key``.

        Sets ``pretrain_seconds`` (run start to dense backbone ready: what a search's time must not
        include) and, when there is pretraining, ``dense_reused``. Returns the cache record (val/test
        accuracy of the dense backbone), None when the cache is off or there is no pretraining.
        """
        cfg, results = self.cfg, self.meta["results"]
        if cfg.pretrain.epochs == 0 or self._done("pretrain", cfg.pretrain.epochs - 1):
            results.setdefault("pretrain_seconds", time.time() - self.started)
            return None
        key = dense_cache.dense_key(cfg, self.device, self.rt.world_size) if cfg.pretrain.cache else None
        record = self._reuse_dense(key) if key is not None and self.meta["stage"] is None else None
        reused = record is not None
        if reused:  # the rest of the run proceeds exactly as after training
            self.meta.update(stage="pretrain", epoch=cfg.pretrain.epochs - 1)
            self.meta["global_step"] += cfg.pretrain.epochs * len(self.loaders.train)
        else:
            tic = time.time()
            backbone = self.net.backbone
            self._fit("pretrain", backbone, list(backbone.parameters()), cfg.pretrain)
            if key is not None:
                record = self._store_dense(key, time.time() - tic)
        results.update(dense_reused=reused, pretrain_seconds=time.time() - self.started)
        return record

    def _reuse_dense(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """Load the cached backbone of ``key`` if a sound one exists; its record (empty on ranks > 0), else None.

        Rank 0 reads its cache; under DDP the other ranks take its answer and its weights, so
        all agree whatever their own node's cache holds."""
        backbone = self.net.backbone
        found = dense_cache.load(key, backbone.state_dict()) if self.rt.rank == 0 else None
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        hit = torch.tensor([found is not None], dtype=torch.int32, device=self.device)
        if distributed:
            torch.distributed.broadcast(hit, src=0)
        if not hit.item():
            return None
        record: dict[str, Any] = {}
        if found is not None:
            state, record = found
            backbone.load_state_dict(state)
            print(f"reusing dense backbone {record['path']} (trained {record['created'].replace('T', ' ')[:16]}, "
                  f"val {100 * record['val_accuracy']:.1f} %)", flush=True)
        if distributed:
            for tensor in backbone.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        return record

    def _store_dense(self, key: dict[str, Any], seconds: float) -> dict[str, Any]:
        """Rank 0 stores the freshly trained backbone under ``key``; every rank evaluates (a collective)."""
        record = {**self._dense_accuracies(), "epochs": self.cfg.pretrain.epochs, "wall_seconds": seconds}
        if self.rt.rank == 0:
            path = dense_cache.store(key, self.net.backbone.state_dict(), record)
            print(f"stored dense backbone {path} for reuse (val {100 * record['val_accuracy']:.1f} %)", flush=True)
        return record

    def _dense_accuracies(self) -> dict[str, float]:
        return {split: engine.evaluate(self.net, loader, self.device, self.amp)["accuracy"]
                for split, loader in (("val_accuracy", self.loaders.val), ("test_accuracy", self.loaders.test))}

    def execute(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.rt.export_dir is not None and self.rt.rank == 0:  # the export is written last: refuse now, not then
            check_writable(self.rt.export_dir, "output_dir")
        self.setup()
        backbone = self.net.backbone
        check_prunable(backbone, self.ds.image_size, cfg.budget, backbone_id(cfg.model))  # refuse before any training
        if self.restored is not None and not self._done("search"):
            self.net.load_state_dict(self.restored["net"])
        self._pretrain()
        if self.restored is None or not self._done("search", -1):
            self.meta["results"]["dense_val_accuracy"] = engine.evaluate(self.net, self.loaders.val, self.device, self.amp)["accuracy"]
        self.teacher = self._dense_teacher()
        self.groups = build_groups(backbone, self.ds.image_size)
        self.net.attach(self.groups)
        for name, why in self.groups.left_whole.items():
            _log.info("group %s is left whole: %s", name, why)
        self.dense_macs = self.groups.cost.dense("macs")
        self.allocator = Allocator(self._cost_model(), cfg.budget, self.device)
        if self.restored is not None and "masks" in self.restored:
            self.masks = [m.to(self.device) for m in self.restored["masks"]]
        elif self.rt.structure is not None:
            self.masks = [m.to(self.device) for m in masks_from_structure(self.rt.structure, self.groups)]
        if cfg.method == "pass" and self.rt.structure is None:
            if self._done("finetune", -1):
                self.hypernet = create_pass_pruner(self.groups, cfg.hypernet, self.allocator, self.net.prompt.enabled,
                                                   self.rt.hypernet).hypernet
                self.hypernet.load_state_dict(self.restored["hypernet"])
            else:
                self._search_pass()
        else:
            self._search_baseline()
        self._broadcast_masks()
        if self._done("finetune", -1):  # resuming inside fine-tune: rebuild the pruned net, then load
            self.groups.prune(self.masks)
            self.net.load_state_dict(self.restored["net"])
        else:
            self._prune()
        if self.meta["stage"] in (None, "pretrain", "search"):
            self.meta.update(stage="finetune", epoch=-1)
        self._fit("finetune", self.net, list(self.net.parameters()), cfg.finetune, evaluate=self._val_and_test,
                  distill=self._distillation())
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        results = self.meta["results"]
        results["val_accuracy"] = engine.evaluate(self.net, self.loaders.val, self.device, self.amp)["accuracy"]
        results["test_accuracy"] = engine.evaluate(self.net, self.loaders.test, self.device, self.amp)["accuracy"]
        results.update({f"pruned_{k}": v for k, v in measure(self.net, self.ds.image_size).items()})
        results["dense_macs"] = self.dense_macs
        results["wall_seconds"] = time.time() - self.started
        self.structure = structure_record(
            self.groups, self.masks, self.cfg.model, self.ds.num_classes, self.ds.image_size, self.net.prompt,
            {"method": self.cfg.method, "budget": self.cfg.budget.model_dump(),
             "data": {"name": self.cfg.data.name, "classes": self.ds.class_names, "mean": list(self.ds.mean),
                      "std": list(self.ds.std)},
             "macs": {"dense": self.dense_macs, "pruned": results["pruned_macs"]},
             "results": dict(results), "left_whole": self.groups.left_whole, "search": self._search_record(),
             "pruning_history": self.groups.pruning_history()})
        if self.rt.rank == 0 and self.rt.export_dir is not None:
            self.export(self.rt.export_dir)
        self.meta.update(stage="done", epoch=0)
        self.rt.reporter.report({"stage": "done", **results, "step": len(self.meta["history"])}, self._final_checkpoint)
        return {"method": self.cfg.method, "keep_ratio": self.cfg.budget.keep_ratio, **results,
                "history": list(self.meta["history"])}

    def _search_record(self) -> dict[str, Any] | None:
        """What the search did, epoch by epoch (drawn into search.png); None without a PASS search."""
        epochs = [h for h in self.meta["history"] if h.get("stage") == "search" and "mask_overlap_initial" in h]
        if not epochs:
            return None
        results = self.meta["results"]
        return {"initial_val": results["initial_masked_val_accuracy"], "best_val": results["search_best_val_accuracy"],
                "val_per_epoch": [h["val_accuracy"] for h in epochs],
                "overlap_initial": [h["mask_overlap_initial"] for h in epochs],
                "overlap_taylor": [h["mask_overlap_taylor"] for h in epochs],
                "kept_per_epoch": [h["kept_per_group"] for h in epochs], "taylor_kept": self.meta["taylor_kept"]}

    def _final_checkpoint(self, directory: Path) -> None:
        """Resumable state (stage 'done') and the export, side by side."""
        self.export(directory)  # first: save_pruned replaces the whole directory (atomic_directory)
        save_state(directory, self._state())

    def export(self, directory: str | Path) -> None:
        """structure.json + weights.safetensors (+ hypernet/) of the final pruned network."""
        save_pruned(directory, self.net, self.structure, self.hypernet,
                    {"backbone_id": backbone_id(self.cfg.model), "prompt": self.cfg.prompt.model_dump()})


def _overlap(a: list[list[int]], b: list[list[int]]) -> float:
    """Kept channels two structures share, over the channels either keeps (1: the same masks)."""
    shared = sum(len(set(x) & set(y)) for x, y in zip(a, b))
    return shared / max(sum(len(set(x) | set(y)) for x, y in zip(a, b)), 1)


def pretrain(cfg: Config, path: str | Path, runtime: Runtime | None = None) -> dict[str, Any]:
    """Dense training only (or its cached result, ``pretrain.cache``); saves the backbone to ``path``
    (safetensors) for ``model.weights``.

    One checkpoint reused by every method, seed and trial is what makes comparisons fair.
    """
    job = _Run(cfg, runtime or Runtime())
    job.setup()
    dense = job._pretrain() or job._dense_accuracies()
    if job.rt.rank == 0:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")  # a crash never leaves a file that looks finished
        save_file({k: v.detach().cpu().contiguous() for k, v in job.net.backbone.state_dict().items()}, str(partial))
        partial.replace(path)
    return {"val_accuracy": dense["val_accuracy"], "test_accuracy": dense["test_accuracy"], "path": str(path),
            "wall_seconds": time.time() - job.started, "dense_reused": job.meta["results"].get("dense_reused", False)}


def run(cfg: Config, runtime: Runtime | None = None) -> dict[str, Any]:
    """Run one configuration end to end; returns the final metrics."""
    return _Run(cfg, runtime or Runtime()).execute()

