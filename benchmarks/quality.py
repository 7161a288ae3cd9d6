"""PASS vs baselines: accuracy of pruned networks at equal MACs, before and after fine-tuning.

Two settings: ``all`` (backbone trained on all classes, pruned and fine-tuned on the same
data, head already trained) and ``shifted`` (backbone trained on classes 0-4, pruned and
fine-tuned on classes 5-9 with a new head). In both, baselines get ``head_epochs = search epochs``
of head-only training under their masks: the head training PASS's search gives its head.
Every (setting, row, target, seed) is one ``passray.pipeline.run`` from the same backbone
checkpoint; rows already in the results file are skipped, so the same command resumes.

    python benchmarks/quality.py --smoke                        # CPU, seconds
    python benchmarks/quality.py --data cifar10-images.tar.gz --time-budget 540
    python benchmarks/quality.py --summarise                    # table + plot from the JSON
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for pretraining; set before CUDA starts
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, ResultsFile, TimeBudget, cached_datasets, cli, deterministic, estimate,  # noqa: E402
                     gpu_settings, mean_std, now, sha256_file, write_atomic)

__all__ = ["ROWS", "SETTINGS", "main"]


@dataclass(frozen=True)
class RowSpec:
    """One line of the table: a scoring method, an allocation and config switches."""

    method: str
    allocation: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def is_pass(self) -> bool:
        return self.method == "pass"


ROWS: dict[str, RowSpec] = {
    "pass": RowSpec("pass", "global"),
    "pass_no_prompt": RowSpec("pass", "global", {"prompt.kind": "none"}),
    "pass_no_recurrence": RowSpec("pass", "global", {"hypernet.recurrent": False}),
    "pass_uniform": RowSpec("pass", "uniform"),
    "global_l2": RowSpec("l2", "global"),
    "global_taylor": RowSpec("taylor", "global"),
    "uniform_l1": RowSpec("l1", "uniform"),
    "uniform_random": RowSpec("random", "uniform"),
    "global_bn_scale": RowSpec("bn_scale", "global"),
}


@dataclass(frozen=True)
class Setting:
    pretrain_classes: list[int] | None  # classes the backbone is trained on (None: all)
    prune_classes: list[int] | None  # classes searched, fine-tuned and tested on
    new_head: bool  # the pruning run starts from a fresh head


SETTINGS: dict[str, Setting] = {
    "all": Setting(None, None, False),
    "shifted": Setting([0, 1, 2, 3, 4], [5, 6, 7, 8, 9], True),
}

SMOKE = dict(methods=["pass", "uniform_l1"], targets=[0.5], seeds=[0], setting=["all", "shifted"], arch="convnet",
             pretrain_epochs=1, pretrain_lr=0.1, search_epochs=1, finetune_epochs=1, batch_size=64)
FULL = dict(methods=list(ROWS), targets=[0.5, 0.25], seeds=[0, 1, 2], setting=["all", "shifted"], arch="resnet18",
            pretrain_epochs=40, pretrain_lr=0.4, search_epochs=8, finetune_epochs=5, batch_size=512)
# With the protocol, what makes a row: backbone architecture, budget kind and fine-tune length vary by row,
# so MACs and latency rows, ResNet-18 and MobileNetV2, FT 5 and FT 30 share one table.
KEY_FIELDS = ["setting", "arch", "row", "budget_kind", "target", "seed", "finetune_epochs"]
ROW_LEVEL = ("model.arch=", "budget.kind=", "budget.latency_batch_size=", "finetune.epochs=")  # not protocol
LATENCY_BATCH = 2048  # latency rows: table and measured speed-up at this serving batch (bf16 on the GPU)
PLOT_RESERVE_S = 15.0  # summary + plot at the end of a budgeted command


def _q(value: Any) -> str:
    """A ``--set`` value that YAML parses back to exactly ``value`` (strings JSON-quoted)."""
    return json.dumps(value) if isinstance(value, (str, list)) else str(value).lower() if isinstance(value, bool) else str(value)


def base_overrides(args: argparse.Namespace, user: bool = True) -> list[str]:
    """What every pretrain and every row shares: data, backbone, device, budget rules, recipes
    (then the user's ``--set`` overrides, unless ``user`` is False)."""
    if args.smoke:
        common = ["device=cpu", "amp=false", "channels_last=false", "data.name=digits", "data.image_size=16",
                  "data.eval_batch_size=512", "model.width=0.25",
                  "budget.min_channels=1", "budget.round_to=1", "bn_recalibration_batches=2"]
    else:
        common = ["device=auto", "amp=true", "channels_last=true", "data.name=imagefolder",
                  f"data.root={_q(str(Path(args.data).expanduser().resolve()))}", "data.eval_batch_size=2048",
                  "model.cifar_stem=true", "budget.min_channels=8", "budget.round_to=8",
                  "bn_recalibration_batches=40", "hypernet.warmup_epochs=1"]
    return [*common, f"model.arch={args.arch}", f"data.batch_size={args.batch_size}", "data.val_fraction=0.1",
            "data.seed=0", f"budget.kind={args.budget_kind}",
            *([f"budget.latency_batch_size={LATENCY_BATCH}"] if args.budget_kind == "latency" else []),
            f"pretrain.epochs={args.pretrain_epochs}", f"pretrain.lr={args.pretrain_lr}", "pretrain.label_smoothing=0.1",
            f"search.epochs={args.search_epochs}", "search.lr=0.003", "search.optimizer=adamw", "search.weight_decay=0.0",
            f"finetune.epochs={args.finetune_epochs}", "finetune.lr=0.02", "finetune.optimizer=sgd",
            "finetune.weight_decay=0.0005", *(args.set if user else [])]


def _recipe(args: argparse.Namespace) -> list[str]:
    """``base_overrides`` without the data path: moving the tarball changes no result."""
    return [o for o in base_overrides(args) if not o.startswith("data.root=")]


def protocol(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that must match for rows to share a table (rows themselves are selected by the CLI)."""
    return {"smoke": args.smoke, "data_file": None if args.smoke else Path(args.data).name,
            "overrides": [o for o in _recipe(args) if not o.startswith(ROW_LEVEL)],
            "row_level": f"model.arch, budget.kind (latency: table and measured speed-up at batch {LATENCY_BATCH}, bf16, "
                         "channels_last, timed alone on the GPU by --remeasure-speedup) and finetune.epochs are "
                         "part of each row's key",
            "settings": {k: vars(v) for k, v in SETTINGS.items()},
            "head_epochs": "baselines: search.epochs of head-only training under their masks in every setting, "
                           "the head training PASS's search gives its head (v1 gave none in 'all': unfair)",
            "budget_rules": "every method's masks come from passray.budget.Allocator at the same keep_ratio; "
                            "min_channels and round_to as in overrides; BN recalibrated under every mask",
            "decisions": "search on train minus a stratified 10 % val split (data.seed 0, the same for every run); "
                         "PASS keeps the masks that validated best; test is only reported"}


# ------------------------------------------------------------------ backbones
_NOT_PRETRAIN = ("search.", "finetune.", "budget.", "prompt.", "hypernet.", "head_epochs=", "bn_recalibration_batches=")


def _backbone_paths(args: argparse.Namespace, name: str) -> tuple[Path, Path]:
    """Checkpoint + marker, named by what pretraining depends on (so other pruning recipes share it)."""
    setting = SETTINGS[name]
    pretrain_recipe = [o for o in _recipe(args) if not o.startswith(_NOT_PRETRAIN)]
    recipe = json.dumps([pretrain_recipe, setting.pretrain_classes, setting.new_head], sort_keys=True)
    digest = hashlib.sha1(recipe.encode()).hexdigest()[:10]
    stem = Path(args.workdir) / f"backbone-{name}-{digest}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _strip_head(cfg, source: Path, target: Path) -> None:
    """Save ``source`` without the classifier, so the pruning run starts from a fresh head."""
    from safetensors.torch import load_file, save_file

    from passray.models import classifier, create_backbone

    net = create_backbone(cfg.model.model_copy(update={"weights": None}), 2)
    head = classifier(net)
    prefix = next(n for n, m in net.named_modules() if m is head)
    state = {k: v for k, v in load_file(str(source)).items() if not k.startswith(prefix + ".")}
    save_file(state, str(target))


def ensure_backbone(args: argparse.Namespace, name: str, results: ResultsFile) -> Path:
    """Train the dense backbone of a setting once (the ``.json`` marker is written last)."""
    from passray.config import load_config
    from passray.pipeline import Runtime, pretrain

    weights, marker = _backbone_paths(args, name)
    setting = SETTINGS[name]
    if not (weights.is_file() and marker.is_file()):
        for stale in (weights, marker):
            stale.unlink(missing_ok=True)
        extra = [] if setting.pretrain_classes is None else [f"data.classes={_q(setting.pretrain_classes)}"]
        # pretrain.cache=false: this benchmark keeps its own backbones (and the smoke test checks they retrain bit-exactly)
        cfg = load_config(None, [*base_overrides(args), *extra, "method=l1", "seed=0", "pretrain.cache=false"])
        print(f"[quality] pretraining the {name!r} backbone ({cfg.pretrain.epochs} epochs) -> {weights}", flush=True)
        full = weights.with_name(weights.stem + "-with-head.safetensors")
        with deterministic():
            out = pretrain(cfg, full, Runtime(progress=False, load_data=cached_datasets.load))
        if setting.new_head:
            _strip_head(cfg, full, weights)
            full.unlink()
        else:
            full.replace(weights)
        record = {"setting": name, "path": str(weights), "sha256": sha256_file(weights), "classes": setting.pretrain_classes,
                  "val_accuracy": out["val_accuracy"], "test_accuracy": out["test_accuracy"],
                  "wall_seconds": out["wall_seconds"], "epochs": cfg.pretrain.epochs, "head_removed": setting.new_head,
                  "config": cfg.to_dict(), "finished": now()}
        write_atomic(marker, json.dumps(record, indent=1))
        print(f"[quality] backbone {name!r}: val {out['val_accuracy']:.4f} test {out['test_accuracy']:.4f} "
              f"in {out['wall_seconds']:.0f} s", flush=True)
    record = json.loads(marker.read_text())
    entry = f"{name}/{args.arch}"
    known = results.data.get("backbones", {}).get(entry, {}).get("sha256")
    if known is not None and known != record["sha256"]:
        raise ValueError(
            f"the {name!r} backbone in {weights} (sha256 {record['sha256'][:12]}) is not the one the rows of "
            f"{results.path} were made with ({known[:12]}): pretraining was not bit-reproducible on this machine. "
            f"Bring back that checkpoint (--workdir), or start a new --results file")
    results.data.setdefault("backbones", {})[entry] = record
    results.save()
    return weights


def _pretrain_estimate(args: argparse.Namespace, name: str, results: ResultsFile) -> float | None:
    """From another setting's pretraining time, scaled by its share of classes; else unknown."""
    for entry, record in results.data.get("backbones", {}).items():
        other, arch = entry.split("/")
        if other != name and arch == args.arch and record.get("epochs") == args.pretrain_epochs:
            share = len(SETTINGS[name].pretrain_classes or range(10)) / len(SETTINGS[other].pretrain_classes or range(10))
            return record["wall_seconds"] * share * 1.15 + 20.0
    return None


# ------------------------------------------------------------------ one row
class EpochRecorder:
    """The pipeline's reporter: per-epoch metrics and wall time of search and fine-tune epochs.

    ``epoch_start`` (the runtime's ``on_epoch_start``) marks each epoch's start, so an epoch's time
    excludes setup and the previous report; it includes the epoch's evaluation (evaluation reads
    the metrics back to the host, which synchronises CUDA).
    """

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []
        self._mark = time.perf_counter()

    def epoch_start(self, stage: str, epoch: int) -> None:
        self._mark = time.perf_counter()

    def report(self, metrics: dict[str, Any], save_state) -> None:
        if metrics.get("stage") not in ("search", "finetune"):
            return
        stamp = time.perf_counter()
        keep = ("stage", "epoch", "train_loss", "train_accuracy", "val_accuracy", "test_accuracy", "macs_ratio",
                "mask_overlap_initial", "mask_overlap_taylor", "kept_per_group")
        self.epochs.append({**{k: metrics[k] for k in keep if k in metrics}, "seconds": stamp - self._mark})

    def stage(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.epochs if e["stage"] == name]


def row_overrides(args: argparse.Namespace, setting: str, row: str, target: float, seed: int, weights: Path) -> list[str]:
    spec, st = ROWS[row], SETTINGS[setting]
    head_epochs = 0 if spec.is_pass else args.search_epochs  # the head training PASS's search gives its head
    extra = [] if st.prune_classes is None else [f"data.classes={_q(st.prune_classes)}"]
    return [*base_overrides(args, user=False), *extra, f"method={spec.method}",
            f"budget.allocation={spec.allocation}", f"budget.keep_ratio={target}", f"seed={seed}",
            f"model.weights={_q(str(weights))}", "pretrain.epochs=0", f"head_epochs={head_epochs}",
            *(f"{k}={_q(v)}" for k, v in spec.overrides.items()), *args.set]


def row_key(args: argparse.Namespace, setting: str, row: str, target: float, seed: int) -> tuple:
    """The row's KEY_FIELDS values."""
    return setting, args.arch, row, args.budget_kind, target, seed, args.finetune_epochs


def run_row(args: argparse.Namespace, setting: str, row: str, target: float, seed: int, weights: Path) -> dict[str, Any]:
    from passray.config import load_config
    from passray.pipeline import Runtime, run

    spec = ROWS[row]
    cfg = load_config(None, row_overrides(args, setting, row, target, seed, weights))
    recorder = EpochRecorder()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    export = Path(tempfile.mkdtemp(prefix="export-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        out = run(cfg, Runtime(reporter=recorder, on_epoch_start=recorder.epoch_start, load_data=cached_datasets.load,
                               progress=False, export_dir=str(export)))
        wall = time.perf_counter() - t0
        structure = json.loads((export / "structure.json").read_text())
    finally:
        shutil.rmtree(export, ignore_errors=True)
    search, tune = recorder.stage("search"), recorder.stage("finetune")
    test_ft = [e.get("test_accuracy") for e in tune]
    at = lambda xs, n: xs[n - 1] if len(xs) >= n else None  # noqa: E731
    return {
        "setting": setting, "row": row, "method": spec.method, "allocation": spec.allocation,
        "prompt": cfg.prompt.kind if spec.is_pass else None, "recurrent": cfg.hypernet.recurrent if spec.is_pass else None,
        "target": target, "seed": seed, "arch": cfg.model.arch, "budget_kind": cfg.budget.kind, "head_epochs": cfg.head_epochs,
        "macs_ratio": out["macs_ratio"], "params_ratio": out["params_ratio"],
        "pruned_macs": out["pruned_macs"], "dense_macs": out["dense_macs"], "pruned_params": out.get("pruned_params"),
        "test_before_ft": out["test_accuracy_before_finetune"], "val_before_ft": out["val_accuracy_before_finetune"],
        "test_after_ft1": at(test_ft, 1), "test_after_ft5": at(test_ft, 5), "test_after_ft_final": out["test_accuracy"],
        "val_after_ft_final": out["val_accuracy"], "finetune_epochs": cfg.finetune.epochs,
        "test_after_ft_per_epoch": test_ft, "val_after_ft_per_epoch": [e.get("val_accuracy") for e in tune],
        "dense_val_accuracy": out.get("dense_val_accuracy"),
        **{k: out.get(k) for k in ("speedup_predicted", "speedup_measured", "latency_ratio_predicted",
                                   "latency_dense_ms", "latency_pruned_ms")},
        "initial_masked_val_accuracy": out.get("initial_masked_val_accuracy"),
        "search_best_val_accuracy": out.get("search_best_val_accuracy"),
        "search_val_per_epoch": [e.get("val_accuracy") for e in search],
        "search_overlap_initial_per_epoch": [e.get("mask_overlap_initial") for e in search],
        "search_overlap_taylor_per_epoch": [e.get("mask_overlap_taylor") for e in search],
        "search_kept_per_epoch": [e.get("kept_per_group") for e in search],
        "search_seconds": sum(e["seconds"] for e in search),
        "search_epoch_seconds": [e["seconds"] for e in search],
        "finetune_seconds_per_epoch": sum(e["seconds"] for e in tune) / max(len(tune), 1),
        "finetune_epoch_seconds": [e["seconds"] for e in tune],
        "wall_seconds": wall, "equivalence_max_abs_diff": out.get("equivalence_max_abs_diff"),
        "backbone_sha256": sha256_file(weights),
        "kept_per_group": [len(g["kept"]) for g in structure["groups"]],
        "groups": [[g["name"], g["width"]] for g in structure["groups"]],
        "config": cfg.to_dict(), "finished": now(),
    }


def _row_estimate(args: argparse.Namespace, results: ResultsFile, setting: str, row: str, new_data: bool) -> float | None:
    pass_kind = ROWS[row].is_pass
    same_kind = lambda r: ROWS.get(r["row"], ROWS["pass"]).is_pass == pass_kind  # noqa: E731
    guess = estimate(results.rows, "wall_seconds", [
        lambda r: r["setting"] == setting and r["row"] == row and r.get("arch") == args.arch
        and r.get("finetune_epochs") == args.finetune_epochs,
        lambda r: r["setting"] == setting and r["row"] == row,
        lambda r: r["setting"] == setting and same_kind(r),
        lambda r: r["row"] == row, same_kind, lambda r: True])
    if guess is not None and new_data:  # this process has not decoded this setting's data yet
        guess += cached_datasets.typical_load_seconds() or 20.0
    return guess


# ------------------------------------------------------------------ latency rows
def _profile_args(args: argparse.Namespace, setting: str) -> list[str]:
    """``passray.profile`` arguments that build the table a latency row of ``setting`` looks up."""
    overrides = row_overrides(args, setting, "pass", 0.5, 0, _backbone_paths(args, setting)[0])
    overrides = [o for o in overrides if not o.startswith("model.weights=")]  # the table needs no weights
    return [a for o in overrides for a in ("--set", o)] + (["--channels-last"] if not args.smoke else [])


def profile_latency(args: argparse.Namespace) -> None:
    """Build (and cache) each setting's latency table before rows start: rows sharing a GPU would time each other."""
    from passray.profile import main as profile

    for setting in args.setting:
        print(f"[quality] latency table for {setting!r}", flush=True)
        profile(_profile_args(args, setting))


def remeasure_speedup(paths: list[str]) -> None:
    """Time dense vs pruned again, alone on the device, for every latency row of the results files.

    Rows measure their speed-up at the end of the run, while other processes may share the GPU;
    this pass rebuilds each row's pruned shape (latency depends on the kept widths, not on which
    channels or weights: the first k channels of each group are kept) and times it with nothing else running.
    """
    import torch

    from passray.config import Config
    from passray.groups import build_groups
    from passray.latency import measure_speedup
    from passray.models import create_backbone

    shapes: dict[str, tuple[int, int]] = {}  # data config -> (classes, image size): decode each setting's data once
    for path in paths:
        results = ResultsFile(path, "quality", KEY_FIELDS)
        for row in results.rows:
            if row.get("budget_kind") != "latency":
                continue
            cfg = Config.model_validate(row["config"])
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            data_key = cfg.data.model_dump_json()
            if data_key not in shapes:
                ds = cached_datasets.load(cfg.data)
                shapes[data_key] = ds.num_classes, ds.image_size
            num_classes, image_size = shapes[data_key]
            pruned = create_backbone(cfg.model.model_copy(update={"weights": None}), num_classes).to(device)
            dense = copy.deepcopy(pruned)
            groups = build_groups(pruned, image_size)
            if [[g.name, g.width] for g in groups.groups] != row["groups"]:
                raise ValueError(f"{path}: row {results.key(row)}: the rebuilt network's groups differ from the row's")
            groups.prune([(torch.arange(w) < k).float() for (_, w), k in zip(row["groups"], row["kept_per_group"])])
            cuda = device.type == "cuda"
            measured = measure_speedup(dense, pruned, groups.input_shape, cfg.budget.latency_batch_size,
                                       "bf16" if cfg.amp and cuda else "fp32", device, channels_last=cfg.channels_last and cuda)
            row.update(speedup_measured_in_run=row.get("speedup_measured_in_run", row.get("speedup_measured")), speedup_measured=measured["speedup"],
                       latency_dense_ms=measured["dense_ms"], latency_pruned_ms=measured["pruned_ms"],
                       speedup_timing="alone on the device, after all rows (benchmarks/quality.py --remeasure-speedup)")
            print(f"[quality] {results.key(row)}: speed-up {measured['speedup']:.2f}x "
                  f"(in the run: {row['speedup_measured_in_run']})", flush=True)
        results.save(replace=True)


# ------------------------------------------------------------------ summary
SUMMARY_FIELDS = ("test_before_ft", "test_after_ft1", "test_after_ft5", "test_after_ft_final", "macs_ratio",
                  "params_ratio", "speedup_measured", "val_before_ft", "initial_masked_val_accuracy",
                  "search_best_val_accuracy", "search_seconds", "finetune_seconds_per_epoch")
GROUP_FIELDS = ("setting", "arch", "row", "budget_kind", "target", "finetune_epochs")  # KEY_FIELDS but the seed


def summarise(results: ResultsFile) -> list[dict[str, Any]]:
    """Mean ± std over seeds per key but the seed, in table order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results.rows:
        groups.setdefault(tuple(r.get(f) for f in GROUP_FIELDS), []).append(r)
    index = lambda names, x: list(names).index(x) if x in names else 99  # noqa: E731
    order = lambda k: (index(SETTINGS, k[0]), k[1] != "resnet18", k[1], k[3] != "macs", k[5], -k[4],  # noqa: E731
                       index(ROWS, k[2]))
    summary = []
    for key in sorted(groups, key=order):
        rows = groups[key]
        entry: dict[str, Any] = {**dict(zip(GROUP_FIELDS, key)), "seeds": sorted(r["seed"] for r in rows)}
        for f in SUMMARY_FIELDS:
            mean, std, n = mean_std(r.get(f) for r in rows)
            entry[f] = {"mean": mean, "std": std, "n": n}
        summary.append(entry)
    return summary


def _pm(stat: dict[str, Any], scale: float = 100.0, digits: int = 2) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def markdown(results: ResultsFile, summary: list[dict[str, Any]]) -> str:
    lines = ["# passray quality benchmark", "", f"Command (latest): `{results.data.get('command', '')}`  ",
             f"Device: {results.data.get('environment', {}).get('device', '?')}", ""]
    for name, b in results.data.get("backbones", {}).items():
        classes = "all classes" if b.get("classes") is None else f"classes {b['classes']}"
        lines.append(f"- dense backbone `{name}` ({classes}, {b.get('epochs')} epochs, {b['wall_seconds']:.0f} s): "
                     f"val {100 * b['val_accuracy']:.2f} %, test {100 * b['test_accuracy']:.2f} %")
    lines += ["", "Test accuracy (%), mean ± std over seeds. budget: `macs` rows keep `target` of dense MACs, `latency` "
              f"rows `target` of the predicted dense latency (batch {LATENCY_BATCH}, bf16); speed-up = measured dense / "
              "pruned time there. FT N = after N fine-tune epochs (FT 5 of a 30-epoch run is mid-schedule). "
              "masked val: val accuracy under the masks after BN recalibration, before fine-tuning; initial: "
              "PASS's first masks.", "",
              "| setting | arch | row | budget | target | n | MACs | speed-up | before FT | FT 1 | FT 5 | FT end (ep) "
              "| masked val | initial | search s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(
            f"| {s['setting']} | {s['arch']} | {s['row']} | {s['budget_kind']} | {s['target']} | {len(s['seeds'])} | "
            f"{_pm(s['macs_ratio'], 1, 3)} | {_pm(s['speedup_measured'], 1, 2)} | {_pm(s['test_before_ft'])} | "
            f"{_pm(s['test_after_ft1'])} | {_pm(s['test_after_ft5'])} | {_pm(s['test_after_ft_final'])} "
            f"({s['finetune_epochs']}) | {_pm(s['val_before_ft'])} | {_pm(s['initial_masked_val_accuracy'])} | "
            f"{_pm(s['search_seconds'], 1, 1)} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], path: Path) -> bool:
    """Test accuracy before and after fine-tuning vs achieved MACs, one line per row and budget kind, one panel
    per setting; only the most common (arch, fine-tune epochs) is drawn (the other rows are in the table)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[quality] matplotlib missing: no plot", flush=True)
        return False
    if not summary:
        return False
    arch, ft = Counter((e["arch"], e["finetune_epochs"]) for e in summary).most_common(1)[0][0]
    shown = [e for e in summary if (e["arch"], e["finetune_epochs"]) == (arch, ft)]
    settings = [s for s in SETTINGS if any(e["setting"] == s for e in shown)]
    metrics = (("test_before_ft", "before fine-tuning"), ("test_after_ft_final", f"after {ft} fine-tune epochs"))
    fig, axes = plt.subplots(len(metrics), len(settings), figsize=(6 * len(settings), 4.2 * len(metrics)), squeeze=False)
    for (metric, when), ax_row in zip(metrics, axes):
        for ax, setting in zip(ax_row, settings):
            for row in ROWS:
                for kind, marker in (("macs", "o"), ("latency", "s")):
                    pts = sorted((e["macs_ratio"]["mean"], e[metric]["mean"], e[metric]["std"]) for e in shown
                                 if (e["setting"], e["row"], e["budget_kind"]) == (setting, row, kind)
                                 and e[metric]["mean"] is not None)
                    if pts:
                        xs, ys, es = zip(*pts)
                        ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in es], marker=marker, capsize=3,
                                    label=row if kind == "macs" else f"{row} (latency budget)",
                                    linestyle="-" if ROWS[row].is_pass else "--")
            ax.set_title(f"{arch}, setting {setting}: {when}")
            ax.set_xlabel("achieved MACs / dense MACs")
            ax.set_ylabel(f"test accuracy {when} (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def finish(results: ResultsFile) -> None:
    summary = summarise(results)
    results.data["summary"] = summary
    results.save()
    text = markdown(results, summary)
    md, png = results.path.with_suffix(".md"), results.path.with_suffix(".png")
    md.write_text(text)
    print(text, flush=True)
    drawn = plot(summary, png)
    print(f"[quality] wrote {results.path}, {md}" + (f", {png}" if drawn else ""), flush=True)


# ------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/quality.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="CIFAR-10 ImageFolder tarball or folder (train/, test/); required unless --smoke/--summarise")
    p.add_argument("--results", help="results JSON (default benchmarks/results/quality.json; --smoke: a temp dir)")
    p.add_argument("--workdir", help="backbone checkpoints (default: <results dir>/work, git-ignored)")
    p.add_argument("--setting", nargs="+", choices=list(SETTINGS), metavar="SETTING",
                   help=f"settings to run: {' '.join(SETTINGS)} (default: both)")
    p.add_argument("--targets", nargs="+", type=float, help="keep ratios of dense MACs (default 0.5 0.25)")
    p.add_argument("--methods", nargs="+", choices=list(ROWS), metavar="ROW",
                   help=f"table rows (default: all): {' '.join(ROWS)}")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default 0 1 2)")
    p.add_argument("--budget-kind", choices=["macs", "latency"], default="macs",
                   help=f"what --targets keep a fraction of (latency: predicted at batch {LATENCY_BATCH}, bf16)")
    p.add_argument("--profile-latency", action="store_true",
                   help="only build the settings' latency tables (run alone on the GPU, before latency rows)")
    p.add_argument("--remeasure-speedup", nargs="+", metavar="FILE",
                   help="time every latency row of these results files again, alone on the device")
    p.add_argument("--arch", help="backbone (default resnet18 with CIFAR stem; --smoke: convnet)")
    p.add_argument("--pretrain-epochs", type=int, help="dense backbone epochs (default 40)")
    p.add_argument("--pretrain-lr", type=float, help="dense backbone peak SGD learning rate at batch 512 (default 0.4)")
    p.add_argument("--pretrain-only", action="store_true", help="train (or find) the settings' backbones, run no row")
    p.add_argument("--search-epochs", type=int, help="PASS search epochs = baseline head epochs in 'shifted' (default 8)")
    p.add_argument("--finetune-epochs", type=int, help="fine-tune epochs, the same for every row (default 5)")
    p.add_argument("--batch-size", type=int, help="training batch (default 512)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run (part of the protocol; repeatable)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="start no pretraining or row that would end after this many seconds from launch")
    p.add_argument("--smoke", action="store_true", help="CPU, digits, tiny convnet, 1 epoch per stage, pass + uniform_l1")
    p.add_argument("--summarise", action="store_true", help="only rebuild summary, table and plot from --results")
    p.add_argument("--merge", nargs="+", metavar="FILE",
                   help="add the rows of results files made under the same protocol (e.g. one per process) to --results, then summarise")
    p.add_argument("--debug", action="store_true", help="full tracebacks")
    args = p.parse_args(argv)
    defaults = SMOKE if args.smoke else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.results is None:
        args.results = (str(Path(tempfile.mkdtemp(prefix="passray-quality-")) / "quality.json") if args.smoke
                        else str(REPO / "benchmarks" / "results" / "quality.json"))
    args.workdir = args.workdir or str(Path(args.results).parent / "work")
    if not (args.smoke or args.summarise or args.merge or args.remeasure_speedup or args.data):
        p.error("--data is required (the CIFAR-10 ImageFolder tarball), unless --smoke or --summarise")
    return args


def run_plan(args: argparse.Namespace, todo: list[tuple], results: ResultsFile, budget: TimeBudget) -> list[str]:
    """Run the missing rows in order until done or out of time; returns the failures."""
    from passray.config import load_config

    backbones: dict[str, Path] = {}
    failures: list[str] = []
    for i, (setting, row, target, seed) in enumerate(todo):
        label = f"{setting}/{row}/keep={target}/seed={seed}"
        if setting not in backbones:
            weights, marker = _backbone_paths(args, setting)
            if not (weights.is_file() and marker.is_file()) and not budget.allows(_pretrain_estimate(args, setting, results)):
                return _stopped(failures, f"pretraining the {setting!r} backbone", len(todo) - i, budget)
            backbones[setting] = ensure_backbone(args, setting, results)
        data_cfg = load_config(None, row_overrides(args, setting, row, target, seed, backbones[setting])).data
        guess = _row_estimate(args, results, setting, row, not cached_datasets.loaded(data_cfg))
        if not budget.allows(guess):
            return _stopped(failures, f"{label} (estimate {guess:.0f} s)", len(todo) - i, budget)
        print(f"[quality] {i + 1}/{len(todo)} {label} (elapsed {budget.elapsed():.0f} s)", flush=True)
        try:
            record = run_row(args, setting, row, target, seed, backbones[setting])
        except Exception as err:  # one broken row must not cost the rest of a device command
            if args.debug:
                raise
            message = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            failures.append(f"{label}: {message}")
            results.data.setdefault("failures", []).append(
                {"key": list(row_key(args, setting, row, target, seed)), "error": message, "when": now(),
                 "traceback": traceback.format_exc()[-3000:]})
            results.save()
            print(f"[quality]   FAILED: {message}", flush=True)
            continue
        results.add(record)
        print(f"[quality]   macs {record['macs_ratio']:.3f}  test before FT {record['test_before_ft']:.4f}  "
              f"after FT {record['test_after_ft_final']:.4f}  ({record['wall_seconds']:.0f} s)", flush=True)
    return failures


def _stopped(failures: list[str], what: str, left: int, budget: TimeBudget) -> list[str]:
    print(f"[quality] time budget: stopped before {what} after {budget.elapsed():.0f} s; {left} row(s) left: "
          "run the same command again to continue", flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.remeasure_speedup:
        remeasure_speedup(args.remeasure_speedup)
        return 0
    if args.profile_latency:
        profile_latency(args)
        return 0
    if args.summarise or args.merge:
        if not args.merge and not Path(args.results).is_file():
            raise FileNotFoundError(f"--summarise: no results file at {args.results}")
        results = ResultsFile(args.results, "quality", KEY_FIELDS)
        for path in args.merge or []:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--merge: no results file at {path}")
            results.absorb(ResultsFile(path, "quality", KEY_FIELDS))
        finish(results)
        return 0
    settings = gpu_settings()
    budget = TimeBudget(args.time_budget, reserve=PLOT_RESERVE_S)
    results = ResultsFile(args.results, "quality", KEY_FIELDS, protocol(args))
    results.start_invocation(settings)
    if args.pretrain_only:
        for setting in args.setting:
            ensure_backbone(args, setting, results)
        return 0
    # Seeds outermost: every finished command leaves whole seeds of the table, not whole settings.
    plan = [(s, r, t, seed) for seed in args.seeds for s in args.setting for t in args.targets for r in args.methods]
    todo = [k for k in plan if not results.has(row_key(args, *k))]
    print(f"[quality] {len(plan) - len(todo)} of {len(plan)} rows already in {args.results}; {len(todo)} to run", flush=True)
    failures = run_plan(args, todo, results, budget)
    finish(results)
    for failure in failures:
        print(f"[quality] failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    cli(main, "benchmarks/quality.py")
