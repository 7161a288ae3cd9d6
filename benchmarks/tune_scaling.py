"""Trials per hour of one ``passray.tune`` search at K trials per GPU (``train.gpus_per_worker`` = 1/K).

The same search (``tune_configs/cifar10_resnet18.yaml``: 16 trials, epochs reduced by flags)
runs once per K on this machine's GPUs, with the concurrency ``passray.tune`` derives from
the cluster, on one dense backbone trained before the first K and shared by all (as the
trials of one search share theirs). Each K is a row of ``results/scaling.json``: part
``tune``, gpus, trials_per_gpu, trials, trials_per_hour (finished trials over the wall time
of ``passray.tune``, dense training excluded), best and every trial's val accuracy, command
and device. Rows already there are skipped, so the same command resumes.

    python benchmarks/tune_scaling.py --smoke     # CPU, 1 logical GPU, digits, 2 tiny trials, K = 1, 2
    python benchmarks/tune_scaling.py --data cifar10-images.tar.gz --search-epochs 2 --finetune-epochs 1 \\
        --time-budget 540
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, TimeBudget, cli, estimate, now  # noqa: E402
from _mps import mps_daemon, mps_servers  # noqa: E402
from _scaling import RESULTS, add_recipe_flags, config_label, dense_backbone, recipe, results_file, write_summary  # noqa: E402

__all__ = ["main"]

SMOKE = {"data.limit_train": 128, "model.width": 0.25, "pretrain.epochs": 1, "search.epochs": 1, "finetune.epochs": 1,
         "bn_recalibration_batches": 2}
SMOKE_CPUS = 4  # logical: two trials at once, the driver's dense task and room to spare


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/tune_scaling.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_flags(p)
    p.add_argument("--per-gpu", nargs="+", type=int, help="trials per GPU, one row each [1 2 4; --smoke: 1 2]")
    p.add_argument("--trials", type=int, help="trials of the search [the config's tune.num_samples; --smoke: 2]")
    p.add_argument("--gpus", type=int, help="GPUs Ray may use [all torch sees; --smoke: 1 logical GPU]")
    p.add_argument("--trial-workers", type=int, choices=(0, 1), default=0,
                   help="0: each trial runs the pipeline in-process; 1: on a Ray Train worker [0]")
    p.add_argument("--results", help=f"results JSON [{RESULTS.relative_to(REPO)}; --smoke: a temp dir]")
    p.add_argument("--workdir", help="dense backbone, Tune and MLflow files [benchmarks/results/work/scaling; "
                                     "--smoke: beside the results]")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="start no row that would end after this")
    p.add_argument("--mps", action="store_true", help="run the trials under a private NVIDIA MPS daemon, so that "
                                                      "trials packed on a GPU overlap their kernels (benchmarks/_mps.py)")
    p.add_argument("--smoke", action="store_true", help="CPU: quickstart digits, tiny convnet, logical GPUs")
    p.add_argument("--debug", action="store_true", help="full tracebacks")
    args = p.parse_args(argv)
    if not (args.smoke or args.data):
        p.error("--data is required (the CIFAR-10 ImageFolder tarball), unless --smoke")
    if args.smoke and args.mps:
        p.error("--mps needs GPUs; --smoke runs on the CPU")
    if args.smoke:
        args.config = str(REPO / "tune_configs" / "quickstart.yaml") if args.config.endswith("cifar10_resnet18.yaml") \
            else args.config
        args.results = args.results or str(Path(tempfile.mkdtemp(prefix="passray-scaling-")) / "scaling.json")
    args.per_gpu = args.per_gpu or ([1, 2] if args.smoke else [1, 2, 4])
    args.results = args.results or str(RESULTS)
    args.workdir = Path(args.workdir or (Path(args.results).parent / "work" if args.smoke
                                         else REPO / "benchmarks" / "results" / "work" / "scaling"))
    return args


def _gpus(args: argparse.Namespace) -> int:
    import torch

    gpus = args.gpus if args.gpus is not None else (1 if args.smoke else torch.cuda.device_count())
    if gpus < 1:
        raise ValueError("no GPU here: run with --smoke (logical GPUs on the CPU), or on a GPU machine")
    return gpus


def timeline(rows: list[dict[str, Any]], uri: str, started: float, ended: float) -> dict[str, Any]:
    """Where a search's wall time went, from its trials' MLflow child runs (each starts as its trial
    starts and ends after the trial's export is logged): the seconds before the first trial and after
    the last are the search's fixed cost, which no packing hides; ``trial_seconds`` are whole trials."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    spans = [(info.start_time / 1000, info.end_time / 1000) for info in
             (client.get_run(r["mlflow_run_id"]).info for r in rows if r.get("mlflow_run_id"))]
    spans = [(s, e) for s, e in spans if e]
    if not spans:
        return {}
    return {"seconds_before_first_trial": round(min(s for s, _ in spans) - started, 2),
            "seconds_after_last_trial": round(ended - max(e for _, e in spans), 2),
            "trial_seconds": [round(e - s, 2) for s, e in sorted(spans)]}


def run_row(base, backbone: Path, per_gpu: int, trials: int, trial_workers: int, work: Path) -> dict[str, Any]:
    """One search of ``trials`` trials at ``per_gpu`` trials per GPU, as ``python -m passray.tune`` runs it."""
    import yaml

    from passray.tune import concurrent_trials, main as tune_main

    name = f"scaling-k{per_gpu}-w{trial_workers}"
    cfg = base.derive({"model.weights": str(backbone), "pretrain.epochs": 0, "train.use_gpu": True,
                       "train.gpus_per_worker": 1 / per_gpu, "train.num_workers": trial_workers,
                       "tune.num_samples": trials, "tune.name": name, "tracking.register_best": False,
                       "train.storage_path": str(work / "ray_results"), "tracking.uri": f"sqlite:///{work / 'mlflow.db'}"})
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    t0 = time.time()
    rows = tune_main(["--config", str(path)])
    t1 = time.time()
    wall = t1 - t0
    done = [r for r in rows if r["status"] == "done" and r.get("val_accuracy") is not None]
    return {"trials_per_gpu": per_gpu, "trials": trials, "trial_workers": trial_workers,
            "concurrent_trials": concurrent_trials(cfg), "wall_seconds": round(wall, 2),
            "trials_per_hour": round(3600 * len(done) / wall, 2),
            "best_val_accuracy": max((r["val_accuracy"] for r in done), default=None),
            "val_accuracies": [r["val_accuracy"] for r in done], "macs_ratios": [r["macs_ratio"] for r in done],
            # each trial's own run (data, network, search, fine-tune): wall_seconds minus these is Tune's overhead
            "trial_wall_seconds": [r.get("wall_seconds") for r in done],
            **timeline(done, cfg.tracking.uri, t0, t1),
            "failed_trials": trials - len(done), "config_used": cfg.to_dict(), "finished": now()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    from passray.config import load_config

    changes = {**(SMOKE if args.smoke else {}), **recipe(args)}
    base = load_config(args.config, args.set).derive(changes)
    trials = args.trials or (2 if args.smoke else base.tune.num_samples)
    label = config_label(args.config, {**recipe(args), **dict(s.split("=", 1) for s in args.set)}) + \
        (" (smoke)" if args.smoke else "") + (" +MPS" if args.mps else "")
    results = results_file(args.results)
    results.start_invocation()
    device = results.data["environment"]["device"]
    gpus = _gpus(args)
    key = lambda k: ("tune", label, device, gpus, k, trials)  # noqa: E731  (results' KEY order)
    todo = [k for k in args.per_gpu if not results.has(key(k))]
    print(f"[tune_scaling] {len(args.per_gpu) - len(todo)} of {len(args.per_gpu)} rows already in {args.results}; "
          f"{len(todo)} to run", flush=True)
    if todo:
        args.workdir.mkdir(parents=True, exist_ok=True)
        with mps_daemon() if args.mps else contextlib.nullcontext():
            ray.init(address="local", num_gpus=gpus, num_cpus=SMOKE_CPUS if args.smoke else None,  # this machine's
                     include_dashboard=False, log_to_driver=False)
            budget = TimeBudget(args.time_budget, reserve=5.0)
            try:
                backbone, dense = dense_backbone(base.derive({"train.use_gpu": True}), args.workdir)
                for k in todo:
                    same = lambda r: r["part"] == "tune" and r["config"] == label and r["device"] == device  # noqa: E731
                    guess = estimate(results.rows, "wall_seconds", [lambda r: same(r) and r["trials_per_gpu"] == k,
                                                                    lambda r: same(r) and r["trials_per_gpu"] < k])
                    if not budget.allows(guess):
                        print(f"[tune_scaling] time budget: stopped before {k} per GPU; run the same command again")
                        break
                    print(f"[tune_scaling] {trials} trials, {k} per GPU on {gpus} GPU(s) "
                          f"(elapsed {budget.elapsed():.0f} s)", flush=True)
                    row = run_row(base, backbone, k, trials, args.trial_workers, args.workdir)
                    if args.mps:
                        row["mps_servers"] = mps_servers()
                    results.add({"part": "tune", "config": label, "device": device, "gpus": gpus, **row, "mps": args.mps,
                                 "dense": dense, "command": results.data["command"], "smoke": args.smoke})
                    print(f"[tune_scaling]   {row['trials_per_hour']:.1f} trials/h ({row['concurrent_trials']} at once, "
                          f"{row['wall_seconds']:.0f} s: {row.get('seconds_before_first_trial')} s before the first "
                          f"trial, {row.get('seconds_after_last_trial')} s after the last), "
                          f"best val {row['best_val_accuracy']}", flush=True)
            finally:
                ray.shutdown()
    print(write_summary(results).read_text(), flush=True)
    return 0


if __name__ == "__main__":
    cli(main, "benchmarks/tune_scaling.py")
