"""Does a PASS hypernet transfer? Searched on CIFAR-10 classes 0-4, reused on classes 5-9.

The backbone is quality.py's ``shifted`` one (trained on classes 0-4, head removed), so
the same checkpoint and recipe serve both benchmarks and ``fresh`` here is quality's
``shifted/pass`` row. Per seed, at one MACs target:

- ``source``: PASS search on classes 0-4; its export (hypernet/ + structure.json) is kept;
- on classes 5-9, through ``passray.transfer.mode_setup`` (what ``python -m passray.transfer``
  runs after the registry lookup): ``fresh`` (search from scratch, the reference),
  ``warm-start`` (search continues from the source hypernet, ``--warm-epochs``),
  ``zero-shot`` (source hypernet frozen; prompt and head fitted ``--prompt-epochs``) and
  ``mask`` (the source structure as it is; the head trained ``search epochs``, as baselines are).

Every row fine-tunes with the same recipe and reports search cost (seconds and epochs).
Rows already in the results file are skipped, so the same command resumes.

    python benchmarks/transfer.py --smoke
    python benchmarks/transfer.py --data cifar10-images.tar.gz --workdir /tmp/w --time-budget 540
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402
from _common import REPO, ResultsFile, TimeBudget, cached_datasets, cli, estimate, gpu_settings, mean_std, now  # noqa: E402

__all__ = ["MODES", "main"]

MODES = ("source", "fresh", "warm-start", "zero-shot", "mask")
SOURCE_CLASSES, TARGET_CLASSES = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """This script's arguments, and quality.py's for the shared protocol (backbone, recipe, data)."""
    p = argparse.ArgumentParser(prog="benchmarks/transfer.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="CIFAR-10 ImageFolder tarball or folder; required unless --smoke/--summarise")
    p.add_argument("--results", help="results JSON (default benchmarks/results/transfer.json; --smoke: a temp dir)")
    p.add_argument("--workdir", help="backbone checkpoints and source exports (shared with quality.py's --workdir)")
    p.add_argument("--target", type=float, default=0.5, help="keep ratio of dense MACs (default 0.5)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default 0 1 2; --smoke: 0)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), metavar="MODE",
                   help=f"rows (default all): {' '.join(MODES)}")
    p.add_argument("--warm-epochs", type=int, help="warm-start search epochs (default 2; --smoke: 1)")
    p.add_argument("--prompt-epochs", type=int, default=1, help="zero-shot: epochs fitting prompt and head (default 1)")
    p.add_argument("--pretrain-lr", type=float, help="passed to quality.py (the backbone's recipe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to quality.py's protocol")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="start no row that would end after this")
    p.add_argument("--smoke", action="store_true", help="CPU, digits, tiny convnet, 1 epoch per stage")
    p.add_argument("--summarise", action="store_true", help="only rebuild the table from --results")
    p.add_argument("--debug", action="store_true", help="full tracebacks")
    args = p.parse_args(argv)
    if not (args.smoke or args.summarise or args.data):
        p.error("--data is required (the CIFAR-10 ImageFolder tarball), unless --smoke or --summarise")
    args.seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    args.warm_epochs = args.warm_epochs or (1 if args.smoke else 2)
    if args.results is None:
        args.results = (str(Path(tempfile.mkdtemp(prefix="passray-transfer-")) / "transfer.json") if args.smoke
                        else str(REPO / "benchmarks" / "results" / "transfer.json"))
    q = ["--smoke"] if args.smoke else ["--data", args.data]
    q += ["--results", args.results, "--setting", "shifted", "--methods", "pass"]
    if args.workdir:
        q += ["--workdir", args.workdir]
    if args.pretrain_lr is not None:
        q += ["--pretrain-lr", str(args.pretrain_lr)]
    for item in args.set:
        q += ["--set", item]
    qargs = quality.parse_args(q)
    args.workdir = qargs.workdir
    return args, qargs


def protocol(args: argparse.Namespace, qargs: argparse.Namespace) -> dict[str, Any]:
    return {"quality_protocol": quality.protocol(qargs), "target": args.target, "warm_epochs": args.warm_epochs,
            "prompt_epochs": args.prompt_epochs, "source_classes": SOURCE_CLASSES, "target_classes": TARGET_CLASSES,
            "fresh": "quality.py's shifted/pass row", "mask": f"head trained {qargs.search_epochs} epochs, as baselines"}


def mode_config(args, qargs, mode: str, seed: int, weights: Path):
    from passray.config import load_config

    overrides = quality.row_overrides(qargs, "shifted", "pass", args.target, seed, weights)
    if mode == "source":
        overrides.append(f"data.classes={json.dumps(SOURCE_CLASSES)}")
    elif mode == "warm-start":
        overrides.append(f"search.epochs={args.warm_epochs}")
    return load_config(None, overrides)


def run_row(args, qargs, mode: str, seed: int, weights: Path) -> dict[str, Any]:
    from passray.export import load_pruned
    from passray.hypernet import load_hypernet
    from passray.pipeline import run
    from passray.transfer import mode_setup

    cfg = mode_config(args, qargs, mode, seed, weights)
    source_dir = Path(args.workdir) / f"transfer-source-seed{seed}-keep{args.target}"
    hypernet = structure = None
    if mode in ("warm-start", "zero-shot"):
        hypernet = load_hypernet(source_dir / "hypernet")[0]
    elif mode == "mask":
        structure = load_pruned(source_dir)[1]
    cfg, runtime = mode_setup(cfg, "fresh" if mode == "source" else mode, hypernet, structure, args.prompt_epochs)
    recorder = quality.EpochRecorder()
    export = Path(tempfile.mkdtemp(prefix="export-", dir=args.workdir))
    runtime.reporter, runtime.on_epoch_start, runtime.export_dir = recorder, recorder.epoch_start, str(export)
    runtime.load_data = cached_datasets.load
    try:
        t0 = time.perf_counter()
        out = run(cfg, runtime)
        wall = time.perf_counter() - t0
        if mode == "source":  # kept for the target rows (replaced whole: a rerun never mixes two sources)
            shutil.rmtree(source_dir, ignore_errors=True)
            export.replace(source_dir)
    finally:
        shutil.rmtree(export, ignore_errors=True)
    search, tune = recorder.stage("search"), recorder.stage("finetune")
    return {"mode": mode, "seed": seed, "target": args.target,
            "classes": SOURCE_CLASSES if mode == "source" else TARGET_CLASSES,
            "search_epochs": len(search), "search_seconds": sum(e["seconds"] for e in search),
            "hypernet_trained": mode in ("source", "fresh", "warm-start"),
            "macs_ratio": out["macs_ratio"], "initial_masked_val_accuracy": out.get("initial_masked_val_accuracy"),
            "search_best_val_accuracy": out.get("search_best_val_accuracy"),
            "val_before_ft": out["val_accuracy_before_finetune"], "test_before_ft": out["test_accuracy_before_finetune"],
            "test_after_ft_per_epoch": [e.get("test_accuracy") for e in tune], "test_after_ft_final": out["test_accuracy"],
            "val_after_ft_final": out["val_accuracy"], "wall_seconds": wall, "config": cfg.to_dict(), "finished": now()}


SUMMARY_FIELDS = ("macs_ratio", "search_epochs", "search_seconds", "test_before_ft", "test_after_ft_final")


def finish(results: ResultsFile) -> None:
    lines = ["# passray transfer benchmark", "", f"Command: `{results.data.get('command', '')}`  ",
             f"Device: {results.data.get('environment', {}).get('device', '?')}", "",
             "Hypernet searched on classes 0-4, reused on classes 5-9 (test accuracy %, mean ± std over seeds; "
             "search s = seconds of the search stage, head-only epochs included).", "",
             "| mode | seeds | MACs | search epochs | search s | test before FT | test after FT |", "|---|---|---|---|---|---|---|"]
    summary = []
    for mode in MODES:
        rows = [r for r in results.rows if r["mode"] == mode]
        if not rows:
            continue
        entry = {"mode": mode, "seeds": sorted(r["seed"] for r in rows)}
        for f in SUMMARY_FIELDS:
            mean, std, n = mean_std(r.get(f) for r in rows)
            entry[f] = {"mean": mean, "std": std, "n": n}
        summary.append(entry)
        pm = lambda s, k=100.0, d=2: f"{s['mean'] * k:.{d}f} ± {s['std'] * k:.{d}f}"  # noqa: E731
        lines.append(f"| {mode} | {len(rows)} | {pm(entry['macs_ratio'], 1, 3)} | {entry['search_epochs']['mean']:.0f} | "
                     f"{pm(entry['search_seconds'], 1, 1)} | {pm(entry['test_before_ft'])} | "
                     f"{pm(entry['test_after_ft_final'])} |")
    results.data["summary"] = summary
    results.save()
    text = "\n".join(lines) + "\n"
    results.path.with_suffix(".md").write_text(text)
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    args, qargs = parse_args(argv)
    results = ResultsFile(args.results, "transfer", ["mode", "seed", "target"], None if args.summarise else protocol(args, qargs))
    if args.summarise:
        finish(results)
        return 0
    results.start_invocation(gpu_settings())
    budget = TimeBudget(args.time_budget, reserve=5.0)
    plan = [(m, s) for s in args.seeds for m in args.modes]
    todo = [(m, s) for m, s in plan if not results.has((m, s, args.target))]
    print(f"[transfer] {len(plan) - len(todo)} of {len(plan)} rows done; {len(todo)} to run", flush=True)
    weights = quality.ensure_backbone(qargs, "shifted", results) if todo else None
    for mode, seed in todo:
        if mode != "source" and not (Path(args.workdir) / f"transfer-source-seed{seed}-keep{args.target}").is_dir():
            raise ValueError(f"{mode} (seed {seed}) needs the source row of seed {seed} first: add 'source' to --modes")
        guess = estimate(results.rows, "wall_seconds", [lambda r: r["mode"] == mode, lambda r: True])
        if not budget.allows(guess):
            print(f"[transfer] time budget: stopped before {mode}/seed {seed}; run the same command again", flush=True)
            break
        print(f"[transfer] {mode} seed {seed} (elapsed {budget.elapsed():.0f} s)", flush=True)
        row = run_row(args, qargs, mode, seed, weights)
        results.add(row)
        print(f"[transfer]   macs {row['macs_ratio']:.3f}  before FT {row['test_before_ft']:.4f}  "
              f"after FT {row['test_after_ft_final']:.4f}  search {row['search_seconds']:.0f} s", flush=True)
    finish(results)
    return 0


if __name__ == "__main__":
    cli(main, "benchmarks/transfer.py")
