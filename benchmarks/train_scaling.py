"""Ray Train scaling on this machine: the same PASS search + fine-tune on N CPU workers, or
(``--gpus N``) on 1 and N GPU workers.

Every layout (W workers x C CPUs each; torch threads = C) keeps the *global* batch fixed
(per-worker batch = global / W), so all runs take the same optimisation steps and differ
only in how the work is split. The default layouts use all cores: 1xN vs 2x(N/2); add
1x1 to separate "more processes" from "more threads".
Epoch times come from the Ray Train controller: the time between consecutive reports
(an epoch's training steps + its evaluation + the checkpoint commit). The first epoch
also holds worker start-up, so "steady" numbers use the later epochs.

    python benchmarks/train_scaling.py            # digits, resnet8, 3 search + 1 fine-tune epochs
    python benchmarks/train_scaling.py --smoke    # seconds: tiny synthetic run, for CI

``--gpus N`` writes rows of part ``ddp`` into ``results/scaling.json`` (shared with
``tune_scaling.py``): ``--config`` (tune_configs/cifar10_resnet18.yaml) on 1 and N GPU workers
at one global batch, on a dense backbone trained once; per row the median search and fine-tune
images/s of the epochs after each stage's first (the pipeline's own step timing), the fit's
wall seconds and test accuracy. ``--smoke --gpus N`` runs the same on CPU workers.

    python benchmarks/train_scaling.py --gpus 2 --data cifar10-images.tar.gz --global-batch 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO  # noqa: E402
from _scaling import RESULTS, add_recipe_flags, config_label, dense_backbone, recipe, results_file, write_summary  # noqa: E402

POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
RESULT = Path(__file__).resolve().parent / "results" / "train_scaling.json"

FULL = {"model": {"arch": "resnet8", "width": 1.0},
        "data": {"name": "digits", "augment": True},
        "pretrain": {"epochs": 0}, "search": {"epochs": 3}, "finetune": {"epochs": 1},
        "bn_recalibration_batches": 4}
SMOKE = {"model": {"arch": "convnet", "width": 0.25},
         "data": {"name": "synthetic", "num_samples": 64, "image_size": 16, "limit_train": 64, "augment": False},
         "pretrain": {"epochs": 0}, "search": {"epochs": 2}, "finetune": {"epochs": 0},
         "bn_recalibration_batches": 1}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _machine() -> dict[str, Any]:
    import ray
    import torch

    return {"nproc": os.cpu_count(), "cpu_model": _cpu_model(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "platform": platform.platform(),
            "loadavg_at_start": list(os.getloadavg())}


def _report_clock(path: Path):
    """Controller-side callback: wall time of every report (a local class, so cloudpickle
    ships it by value to the controller process)."""
    from ray.train import UserCallback

    class ReportClock(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(json.dumps({"t": time.time(), "stage": metrics[0].get("stage"), "epoch": metrics[0].get("epoch"),
                                    "images_per_second": metrics[0].get("images_per_second")}) + "\n")

    return ReportClock()


def run_one(tree: dict[str, Any], workers: int, cpus_per_worker: int, global_batch: int, storage: str,
            tag: str) -> dict[str, Any]:
    """One fresh run (a new run name, so nothing resumes) and its per-epoch times."""
    from passray.config import validate
    from passray.data import load_dataset
    from passray.train import fit

    per_worker = global_batch // workers
    cfg = validate({**tree, "data": {**tree["data"], "batch_size": per_worker},
                    "train": {"num_workers": workers, "cpus_per_worker": cpus_per_worker, "storage_path": storage,
                              "name": f"scaling-{tag}"}})
    n_train = len(load_dataset(cfg.data).train)
    images_per_epoch = (n_train // global_batch) * global_batch  # drop_last on every rank
    clock = Path(storage) / f"clock-{tag}.jsonl"
    start = time.time()
    metrics, _ = fit(cfg, callbacks=[_report_clock(clock)])
    wall = time.time() - start
    epochs, last = [], start
    for e in (json.loads(line) for line in clock.read_text().splitlines()):
        epochs.append({"stage": e["stage"], "epoch": e["epoch"], "seconds": round(e["t"] - last, 3)})
        last = e["t"]
    steady = [e["seconds"] for e in epochs[1:] if e["stage"] == "search"]  # the first holds start-up
    return {"fit_wall_seconds": round(wall, 2), "steady_search_epoch_seconds": steady, "epochs": epochs,
            "train_images_per_epoch": images_per_epoch, "val_accuracy": metrics.get("val_accuracy"),
            "macs_ratio": metrics.get("macs_ratio"), "loadavg_1min_after": round(os.getloadavg()[0], 2)}


def summarise(layout: str, workers: int, cpus_per_worker: int, global_batch: int, reps: list[dict]) -> dict:
    steady = [s for r in reps for s in r["steady_search_epoch_seconds"]]
    search_s = statistics.median(steady) if steady else None
    images = reps[0]["train_images_per_epoch"]
    return {"layout": layout, "workers": workers, "cpus_per_worker": cpus_per_worker,
            "batch_per_worker": global_batch // workers, "global_batch": global_batch,
            "median_fit_wall_seconds": statistics.median(r["fit_wall_seconds"] for r in reps),
            "median_steady_search_epoch_seconds": search_s,
            "search_images_per_second": round(images / search_s, 1) if search_s else None,
            "repeats": reps}


def _steady(epochs: list[dict[str, Any]], stage: str) -> float | None:
    """Median images/s of a stage's epochs after its first (cuDNN autotuning, worker start-up)."""
    rates = [e["images_per_second"] for e in epochs if e["stage"] == stage and e.get("images_per_second")]
    return statistics.median(rates[1:] or rates) if rates else None


def ddp_row(base, workers: int, global_batch: int, use_gpu: bool, work: Path) -> dict[str, Any]:
    """One fresh ``passray.train`` fit of ``base`` on ``workers`` workers at ``global_batch`` images per step."""
    from passray.train import fit

    cfg = base.derive({"train.num_workers": workers, "train.use_gpu": use_gpu, "data.batch_size": global_batch // workers,
                       "train.storage_path": str(work / "ray_results"),
                       "train.name": f"ddp-{workers}-{time.strftime('%Y%m%d-%H%M%S')}"})  # fresh: nothing resumes
    clock = work / f"clock-{cfg.train.name}.jsonl"
    start = time.time()
    metrics, _ = fit(cfg, callbacks=[_report_clock(clock)])
    wall = time.time() - start
    epochs = [json.loads(line) for line in clock.read_text().splitlines()]
    return {"gpus": workers, "global_batch": global_batch, "batch_per_worker": global_batch // workers,
            "search_images_per_second": _steady(epochs, "search"),
            "finetune_images_per_second": _steady(epochs, "finetune"), "wall_seconds": round(wall, 2),
            "test_accuracy": metrics.get("test_accuracy"), "val_accuracy": metrics.get("val_accuracy"),
            "macs_ratio": metrics.get("macs_ratio"), "epochs": epochs, "config_used": cfg.to_dict()}


def ddp_main(args: argparse.Namespace) -> dict[str, Any]:
    """``--gpus N``: rows of part ``ddp`` (1 and N workers) into the scaling results, skipping those there."""
    import ray

    from passray.config import load_config, validate

    base = validate(SMOKE) if args.smoke else load_config(args.config, args.set).derive(recipe(args))
    label = "convnet synthetic (smoke)" if args.smoke else config_label(
        args.config, {**recipe(args), **dict(s.split("=", 1) for s in args.set)})
    global_batch = args.global_batch or (16 if args.smoke else base.data.batch_size)
    path = args.results or (Path(tempfile.mkdtemp(prefix="passray-scaling-")) / "scaling.json" if args.smoke
                            else RESULTS)
    results = results_file(path)
    results.start_invocation()
    device = results.data["environment"]["device"]
    todo = [w for w in sorted({1, args.gpus}) if not results.has(("ddp", label, device, w, None, None))]
    print(f"[train_scaling] {len(todo)} ddp rows to run", flush=True)
    if todo:
        work = Path(path).parent / "work" if args.smoke else REPO / "benchmarks" / "results" / "work" / "scaling"
        work.mkdir(parents=True, exist_ok=True)
        ray.init(address="local", num_cpus=(args.gpus + 1) if args.smoke else None, include_dashboard=False,
                 log_to_driver=False)
        try:
            if base.pretrain.epochs > 0 and not base.model.weights:
                backbone, _ = dense_backbone(base.derive({"train.use_gpu": not args.smoke}), work)
                base = base.derive({"model.weights": str(backbone), "pretrain.epochs": 0})
            for workers in todo:
                row = ddp_row(base, workers, global_batch, not args.smoke, work)
                results.add({"part": "ddp", "config": label, "device": device, **row, "trials_per_gpu": None,
                             "trials": None, "command": results.data["command"], "smoke": args.smoke})
                print(f"[train_scaling] {workers} worker(s): search {row['search_images_per_second']} img/s, "
                      f"fine-tune {row['finetune_images_per_second']} img/s, {row['wall_seconds']:.0f} s", flush=True)
        finally:
            ray.shutdown()
    print(write_summary(results).read_text(), flush=True)
    return results.data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic run (seconds of compute)")
    parser.add_argument("--gpus", type=int, help="ddp rows: 1 and this many GPU workers (--smoke: CPU workers)")
    parser.add_argument("--results", help="ddp rows: results JSON [benchmarks/results/scaling.json; --smoke: a temp dir]")
    add_recipe_flags(parser)
    parser.add_argument("--layouts", default=None,
                        help="comma-separated WORKERSxCPUS_PER_WORKER; the first is the speed-up baseline "
                             "[1xN,2x(N/2) for N cores]")
    parser.add_argument("--repeats", type=int, default=1, help="runs per layout, interleaved (load drifts)")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="images per step over all workers [128; smoke 16; --gpus: the config's data.batch_size]")
    parser.add_argument("--out", default=None, help=f"result JSON [{RESULT}; smoke: a temp file]")
    args = parser.parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else argv
    if args.gpus:
        if not (args.smoke or args.data):
            parser.error("--gpus needs --data (the CIFAR-10 ImageFolder tarball), unless --smoke")
        return ddp_main(args)

    os.environ.setdefault(POLL_ENV, "0.5")  # controller poll; each epoch waits for its commit
    import ray

    cpus = os.cpu_count() or 1
    layouts = [tuple(int(v) for v in item.split("x")) for item in
               (args.layouts or f"1x{cpus},2x{max(cpus // 2, 1)}").split(",")]
    tree = SMOKE if args.smoke else FULL
    global_batch = args.global_batch or (16 if args.smoke else 128)
    machine = _machine()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    reps: dict[tuple[int, int], list[dict]] = {layout: [] for layout in layouts}
    try:
        with tempfile.TemporaryDirectory(prefix="passray-scaling-") as storage:
            for rep in range(args.repeats):
                for workers, cpw in layouts:
                    run = run_one(tree, workers, cpw, global_batch, storage, f"{workers}x{cpw}-{rep}")
                    reps[(workers, cpw)].append(run)
                    print(json.dumps({"layout": f"{workers}x{cpw}", "repeat": rep,
                                      **{k: v for k, v in run.items() if k != "epochs"}}), flush=True)
    finally:
        ray.shutdown()
    summary = [summarise(f"{w}x{c}", w, c, global_batch, reps[(w, c)]) for w, c in layouts]
    base = summary[0]
    for row in summary:
        row["speedup_fit_wall"] = round(base["median_fit_wall_seconds"] / row["median_fit_wall_seconds"], 3)
        if row["median_steady_search_epoch_seconds"] and base["median_steady_search_epoch_seconds"]:
            row["speedup_steady_search_epoch"] = round(
                base["median_steady_search_epoch_seconds"] / row["median_steady_search_epoch_seconds"], 3)
    machine["loadavg_at_end"] = list(os.getloadavg())
    result = {"command": shlex.join(["python", "benchmarks/train_scaling.py", *argv_used]),
              "smoke": args.smoke, "config": tree, "controller_poll_seconds": float(os.environ[POLL_ENV]),
              "machine": machine, "layouts": summary}
    default = Path(tempfile.mkdtemp()) / "train_scaling_smoke.json" if args.smoke else RESULT
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for row in summary:
        print(f"{row['layout']:>5}  fit {row['median_fit_wall_seconds']:7.1f} s  steady search epoch "
              f"{row['median_steady_search_epoch_seconds'] or float('nan'):6.2f} s  "
              f"{row['search_images_per_second'] or float('nan'):7.1f} img/s  "
              f"speed-up {row.get('speedup_steady_search_epoch', float('nan')):.2f}x "
              f"(fit {row['speedup_fit_wall']:.2f}x)")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
