"""What ``tune_scaling.py`` and ``train_scaling.py --gpus`` share: one results file
(``results/scaling.json``, rows of part ``tune`` and ``ddp``), its ``.md`` summary, the data
and config flags, and the dense backbone trained once and shared by every row.

Each row carries its own config, command and device instead of a file-wide protocol: the two
parts run different recipes, and a row is only compared with rows of its own config and device.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from _common import REPO, ResultsFile, mean_std

__all__ = ["KEY", "RESULTS", "add_recipe_flags", "config_label", "dense_backbone", "recipe", "results_file",
           "write_summary"]

RESULTS = REPO / "benchmarks" / "results" / "scaling.json"
KEY = ("part", "config", "device", "gpus", "trials_per_gpu", "trials")
DEFAULT_CONFIG = REPO / "tune_configs" / "cifar10_resnet18.yaml"


def results_file(path: str | Path) -> ResultsFile:
    return ResultsFile(path, "scaling", KEY)


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that set what one run computes (both scripts): config, data, epochs."""
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="passray config [tune_configs/cifar10_resnet18.yaml]")
    parser.add_argument("--data", help="CIFAR-10 ImageFolder tarball/folder (or a torchvision CIFAR root); "
                                       "required unless --smoke")
    parser.add_argument("--pretrain-epochs", type=int, help="dense training epochs [the config's]")
    parser.add_argument("--search-epochs", type=int, help="search epochs [the config's]")
    parser.add_argument("--finetune-epochs", type=int, help="fine-tune epochs [the config's]")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config key")


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted config changes the recipe flags ask for (``Config.derive`` takes them)."""
    changes: dict[str, Any] = {}
    if args.data:
        data = Path(args.data).expanduser().resolve()
        folder = data.name.endswith((".tar.gz", ".tgz", ".tar")) or (data / "train").is_dir()
        changes.update({"data.name": "imagefolder" if folder else "cifar10", "data.root": str(data)})
    for flag, key in (("pretrain_epochs", "pretrain.epochs"), ("search_epochs", "search.epochs"),
                      ("finetune_epochs", "finetune.epochs")):
        if getattr(args, flag) is not None:
            changes[key] = getattr(args, flag)
    return changes


def config_label(config: str | Path, changes: dict[str, Any]) -> str:
    """What a row's ``config`` field says: the config file, the data file's name (not its folder) and the
    changes that alter what runs, e.g. ``cifar10_resnet18 cifar10-small.tar.gz search.epochs=2``: rows are
    compared only within one label."""
    data = [Path(str(changes["data.root"])).name] if changes.get("data.root") else []
    shown = [f"{k}={v}" for k, v in sorted(changes.items()) if k not in ("data.root", "data.name")]
    return " ".join([Path(config).stem, *data, *shown])


def dense_backbone(cfg, work: Path) -> tuple[Path, dict[str, Any]]:
    """The dense backbone of ``cfg``, trained once and kept in ``work`` for every row (as ``passray.tune``
    does for its trials: on a GPU worker when the config uses GPUs); returns its path and record."""
    from passray.tune import pretrain_on_cluster

    what = {k: v for k, v in cfg.to_dict().items() if k in ("data", "model", "pretrain", "seed", "amp", "channels_last")}
    digest = hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]
    path, record = work / f"dense-{digest}.safetensors", work / f"dense-{digest}.json"
    if not (path.is_file() and record.is_file()):
        print(f"dense training of {cfg.model.arch}, {cfg.pretrain.epochs} epochs, once -> {path}", flush=True)
        dense = pretrain_on_cluster(cfg, path)
        record.write_text(json.dumps({k: v for k, v in dense.items() if k != "path"}, indent=1))
    return path, json.loads(record.read_text())


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _fixed(row: dict[str, Any]) -> str:
    """A search's seconds before its first trial started and after its last ended (``tune_scaling.timeline``)."""
    if row.get("seconds_before_first_trial") is None:
        return "-"
    return f"{row['seconds_before_first_trial']:.0f} / {row['seconds_after_last_trial']:.0f}"


def _speedup(row: dict[str, Any], rows: list[dict[str, Any]], field: str, base: dict[str, Any]) -> str:
    ref = next((r for r in rows if all(r.get(k) == v for k, v in base.items()) and r.get(field)), None)
    return f"{row[field] / ref[field]:.2f}x" if ref and row.get(field) else "-"


def write_summary(results: ResultsFile) -> Path:
    """``scaling.md``: the tune rows (trials per hour, vs 1 trial per GPU) and the ddp rows (throughput,
    vs 1 GPU), each against rows of the same config and device."""
    rows = results.rows
    lines = ["# passray scaling", "", "Trials per hour of one search (part `tune`; x K: vs 1 trial per GPU on as many "
             "GPUs, x GPUs: vs 1 GPU at as many trials per GPU) and data-parallel throughput of one run (part `ddp`, "
             "x: vs 1 GPU). Every row's command, config and device are in `scaling.json`.", ""]
    tune = [r for r in rows if r["part"] == "tune"]
    if tune:
        lines += ["| config | device | GPUs | trials/GPU | trials | at once | wall s | before / after trials s | trials/h "
                  "| x K | x GPUs | best val % | mean val % |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(tune, key=lambda r: (r["config"], r["device"], r["gpus"], r["trials_per_gpu"])):
            same = {"config": r["config"], "device": r["device"]}
            per_k = _speedup(r, tune, "trials_per_hour", {**same, "gpus": r["gpus"], "trials_per_gpu": 1})
            per_gpus = _speedup(r, tune, "trials_per_hour", {**same, "gpus": 1, "trials_per_gpu": r["trials_per_gpu"]})
            lines.append(f"| {r['config']} | {r['device']} | {r['gpus']} | {r['trials_per_gpu']} | {r['trials']} | "
                         f"{r['concurrent_trials']} | {r['wall_seconds']:.0f} | {_fixed(r)} | {r['trials_per_hour']:.1f} | "
                         f"{per_k} | {per_gpus} | {_percent(r['best_val_accuracy'])} | "
                         f"{_percent(mean_std(r['val_accuracies'])[0])} |")
    ddp = [r for r in rows if r["part"] == "ddp"]
    if ddp:
        lines += ["", "| config | device | GPUs | global batch | search img/s | x | fine-tune img/s | x | wall s | "
                  "test % |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(ddp, key=lambda r: (r["config"], r["device"], r["gpus"])):
            same = {"config": r["config"], "device": r["device"], "gpus": 1, "global_batch": r["global_batch"]}
            rates = [f"{_rate(r[f])} | {_speedup(r, ddp, f, same)}"
                     for f in ("search_images_per_second", "finetune_images_per_second")]
            lines.append(f"| {r['config']} | {r['device']} | {r['gpus']} | {r['global_batch']} | {' | '.join(rates)} | "
                         f"{r['wall_seconds']:.0f} | {_percent(r['test_accuracy'])} |")
    if results.data.get("notes"):
        lines += ["", f"Notes: {results.data['notes']}"]
    path = results.path.with_suffix(".md")
    path.write_text("\n".join(lines) + "\n")
    return path
