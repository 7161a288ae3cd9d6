"""``python -m passray.train``: one pruning run as a Ray Train job (DDP over N workers).

Every worker runs the same ``passray.pipeline`` (pretrain -> search -> prune -> fine-tune
-> export) with torch.distributed set up by Ray (gloo on CPU, NCCL on GPU); each epoch
ends in ``ray.train.report``, rank 0 attaching a checkpoint of the resumable state. A
worker failure restarts the group from the last checkpoint (``train.max_failures``), and
re-running the same ``(train.storage_path, run name)`` resumes a stopped run. The final
checkpoint also holds the export (structure.json, weights.safetensors, hypernet/). A dense
backbone trained before with the same data, model and recipe comes from rank 0's cache
(``pretrain.cache``; rank 0 broadcasts it to the other ranks).

Ray Train V2 API only: it is the default (``RAY_TRAIN_V2_ENABLED`` unset or 1); with
``RAY_TRAIN_V2_ENABLED=0`` importing this module fails with a one-line explanation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
import ray.train.torch
import torch
import torch.nn as nn
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from passray._cli import format_table, load_from_args, make_parser, run_cli
from passray._state_io import load_state
from passray.config import Config, validate
from passray.export import atomic_directory
from passray.pipeline import Runtime, run
from passray.prune import TABLE_COLUMNS

if not hasattr(ray.train, "get_all_reported_checkpoints"):  # exported by Train V2 only
    raise ImportError("passray.train needs Ray Train V2; unset RAY_TRAIN_V2_ENABLED=0")

__all__ = ["EXPORT_FILES", "RayReporter", "build_trainer", "copy_export", "fit", "main", "run_name",
           "scalar_metrics", "storage_uri", "train_fn_per_worker"]

EXPORT_FILES = ("structure.json", "weights.safetensors", "hypernet")
_NOT_IN_NAME = ("train", "tune", "tracking", "output_dir", "device")  # how/where, not what is computed


# ---------------------------------------------------------------- worker side
def scalar_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """What Ray may carry: bool/int/str and finite floats; nested dicts become dotted keys.

    Tensors are refused by ``ray.train.report`` and the controller's snapshot is JSON, so
    one-element tensors and numpy scalars become Python numbers; None, NaN/inf and
    anything else are dropped. Strings (``stage``) are kept: the V2 controller stores
    metrics as JSON and Tune accepts them.
    """
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalar_metrics(value, f"{name}."))
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        elif hasattr(value, "item") and getattr(value, "shape", None) == ():
            value = value.item()  # numpy scalar
        if isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
            out[name] = value
    return out


class RayReporter:
    """The pipeline's reporter under Ray Train: one ``ray.train.report`` per call on every rank.

    ``report`` is a collective, so every rank calls it the same number of times; only
    rank 0 (``writes_checkpoints``) writes the state into a fresh temp dir and attaches
    it. The upload is synchronous (the default mode), so the temp dir may vanish after.

    A report only counts once the controller has polled it off the worker's queue (every
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default); a worker that dies before that
    loses it. Rank 0 therefore waits for the commit, so a crash costs at most the epoch
    in progress (the other ranks wait for rank 0 at their next collective).
    """

    def __init__(self, writes_checkpoints: bool, mlflow_run: tuple[str, str] | None = None) -> None:
        self.writes_checkpoints = writes_checkpoints
        self.tracker, self.run_id = None, None
        if mlflow_run is not None and writes_checkpoints:  # rank 0 also logs every epoch to MLflow
            from passray.tracking import Tracker

            self.tracker, self.run_id = Tracker(mlflow_run[0], check=False), mlflow_run[1]

    def report(self, metrics: dict[str, Any], save_state: Callable[[Path], None] | None) -> None:
        metrics = scalar_metrics(metrics)
        if self.tracker is not None:
            self.tracker.log_metrics(self.run_id, metrics)
            metrics["mlflow_run_id"] = self.run_id
        if not self.writes_checkpoints or save_state is None:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="passray-ckpt-") as tmp:
            save_state(Path(tmp))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def _die(message: str) -> None:
    """Fault injection under Ray: kill this worker process for real (Ray sees an actor death)."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def _wrapper(world_size: int, device: torch.device) -> Callable[[nn.Module], nn.Module]:
    """DDP via ``prepare_model`` when distributed, else only a move to the device.

    ``find_unused_parameters``: the hypernet/prompt parameters do not reach the loss in
    every step, and the frozen backbone holds requires_grad=False parameters.
    """
    if world_size == 1:
        return lambda module: module.to(device)
    return lambda module: ray.train.torch.prepare_model(
        module, parallel_strategy_kwargs={"find_unused_parameters": True})


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: the whole pipeline on this rank's shard of the data.

    No ``prepare_data_loader``: the loaders (``passray.data.TensorLoader``) are in-memory
    device tensors, already sharded exactly as ``DistributedSampler(rank, world_size)``
    would shard them, so there is no DataLoader to wrap and nothing to copy per step.
    """
    cfg = validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # as many threads as CPUs Ray reserved for this worker
        torch.set_num_threads(max(int(cfg.train.cpus_per_worker), 1))
    restored = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restored = load_state(directory)
    run(cfg, Runtime(rank=rank, world_size=world_size, device=device, wrap=_wrapper(world_size, device),
                     reporter=RayReporter(rank == 0, config.get("mlflow_run")), restored=restored,
                     progress=rank == 0, export_dir=None, fault=_die))


# ---------------------------------------------------------------- driver side
def run_name(cfg: Config) -> str:
    """``train.name``, else a stable name from what the config computes (never a timestamp,
    so re-running the same config resumes it)."""
    if cfg.train.name:
        return cfg.train.name
    tree = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IN_NAME}
    del tree["pretrain"]["cache"]  # cached or trained, the dense backbone is the same
    digest = hashlib.sha1(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:10]
    arch = re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.model.arch)
    return f"passray-{cfg.method}-{arch}-{digest}"


def storage_uri(path: str) -> str:
    """URIs (s3://, gs://, ...) pass through; local paths become absolute (pyarrow needs it)."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def build_trainer(cfg: Config, *, name: str | None = None, callbacks: list | None = None,
                  mlflow_run: tuple[str, str] | None = None) -> TorchTrainer:
    """A ``TorchTrainer`` for ``cfg``; the backend is gloo on CPU, NCCL with GPUs (TorchConfig default).

    ``mlflow_run=(tracking_uri, run_id)``: rank 0 logs each epoch's metrics to that run."""
    resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})}
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "mlflow_run": list(mlflow_run) if mlflow_run else None},
        scaling_config=ScalingConfig(num_workers=max(cfg.train.num_workers, 1), use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name or run_name(cfg), storage_path=storage_uri(cfg.train.storage_path),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
                             callbacks=callbacks),
    )


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _one_line(err: Exception) -> str:
    """A ``TrainingFailedError`` as one line: each distinct worker error once, with its ranks."""
    by_cause: dict[str, list[int]] = {}
    for rank, failure in sorted((getattr(err, "worker_failures", None) or {}).items()):
        by_cause.setdefault(_first_line(failure), []).append(rank)
    causes = [f"rank {','.join(map(str, ranks))}: {cause}" for cause, ranks in by_cause.items()]
    return "; ".join(causes) or _first_line(getattr(err, "controller_failure", None) or err)


def fit(cfg: Config, name: str | None = None, callbacks: list | None = None,
        mlflow_run: tuple[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """Run (or resume) ``cfg`` on Ray Train; returns the final metrics and the final
    checkpoint's path (a URI for remote storage), which holds the export."""
    trainer = build_trainer(cfg, name=name, callbacks=callbacks, mlflow_run=mlflow_run)
    name = trainer.run_config.name
    try:
        result = trainer.fit()  # V2 raises result.error itself; the check below is belt and braces
    except ray.train.TrainingFailedError as err:
        raise RuntimeError(f"Ray Train run {name!r} failed: {_one_line(err)}") from err
    if result.error is not None:
        raise RuntimeError(f"Ray Train run {name!r} failed: {_one_line(result.error)}")
    if result.checkpoint is None or result.metrics.get("stage") != "done":
        raise RuntimeError(f"Ray Train run {name!r} ended without its final checkpoint")
    path = result.checkpoint.path
    scheme = cfg.train.storage_path.split("://", 1)[0] if "://" in cfg.train.storage_path else None
    metrics = {"method": cfg.method, "keep_ratio": cfg.budget.keep_ratio, **result.metrics}
    return metrics, f"{scheme}://{path}" if scheme else path


def copy_export(checkpoint: Checkpoint | str, directory: str | Path) -> Path:
    """Copy structure.json, weights.safetensors and hypernet/ (if any) out of a checkpoint."""
    checkpoint = Checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    with checkpoint.as_directory() as src, atomic_directory(directory) as out:  # no stale files of an older run
        src = Path(src)
        if not (src / "structure.json").is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint.path} holds no export (structure.json)")
        for item in EXPORT_FILES:
            if (src / item).is_dir():
                shutil.copytree(src / item, out / item)
            elif (src / item).is_file():
                shutil.copy2(src / item, out / item)
    return Path(directory)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = make_parser("passray.train", __doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    cfg = load_from_args(args)  # config errors end here, before Ray starts
    if not ray.is_initialized():  # RAY_ADDRESS: join that cluster; unset: start a local one
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    metrics, checkpoint = fit(cfg)
    out = copy_export(checkpoint, cfg.output_dir)
    (out / "results.json").write_text(json.dumps(
        {"config": cfg.to_dict(), "result": metrics, "checkpoint": checkpoint}, indent=1))
    print(format_table([metrics], TABLE_COLUMNS))
    print(f"exported to {out}/ (structure.json, weights.safetensors{', hypernet/' if cfg.method == 'pass' else ''});"
          f" checkpoint {checkpoint}")
    return metrics


if __name__ == "__main__":
    run_cli(main, "passray.train")
