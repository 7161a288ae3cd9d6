"""``python -m passray.train``: one pruning run as a Ray Train job (DDP over N workers).

Every worker runs the same ``passray.pipeline`` (pretrain -> search -> prune -> fine-tune
-> export) with torch.distributed set up by Ray (gloo on CPU, NCCL on GPU); each epoch
ends in ``ray.train.report``, rank 0 attaching a checkpoint of the resumable state. A
worker failure restarts the group from the last checkpoint (``train.max_failures``), and
re-running the same ``(train.storage_path, run name)`` resumes a stopped run. The final
checkpoint also holds the export (structure.json, weights.safetensors, hypernet/). A dense
backbone trained before with the same data, model and recipe comes from rank 0's cache
(``pretrain.cache``; rank 0 broadcasts it to the other ranks).

Refused in one line before any worker starts: a ``RAY_ADDRESS`` nothing answers at, a run the
cluster cannot hold, an unwritable ``output_dir``, and a run name whose folder records another
config (``passray_config.json``: its checkpoints hold another model). Checkpoints reach the
storage whole (copied under a hidden name, then renamed), so a full disk leaves none half-written.

Ray Train V2 API only: it is the default (``RAY_TRAIN_V2_ENABLED`` unset or 1); with
``RAY_TRAIN_V2_ENABLED=0`` importing this module fails with a one-line explanation.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import ray
import ray.train
import ray.train.torch
import torch
import torch.nn as nn
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from passray._cli import (TABLE_COLUMNS, config_record, format_table, load_from_args, make_parser, refuse_other_config,
                          run_cli)
from passray._state_io import atomic_directory, check_writable, load_state
from passray.config import Config, ConfigError, validate
from passray.pipeline import Runtime, run
from passray.step_graph import capture_stream
from passray.tracking import scalar_metrics

if not hasattr(ray.train, "get_all_reported_checkpoints"):  # exported by Train V2 only
    raise ImportError("passray.train needs Ray Train V2; unset RAY_TRAIN_V2_ENABLED=0")

__all__ = ["EXPORT_FILES", "RUN_CONFIG_FILE", "RayReporter", "assigned_gpu", "build_trainer", "check_cluster_fits",
           "connect_ray", "copy_export", "fit", "main", "run_name", "storage_uri", "train_fn_per_worker",
           "worker_resources"]

EXPORT_FILES = ("structure.json", "weights.safetensors", "hypernet")
RUN_CONFIG_FILE = "passray_config.json"  # in the run folder: what its checkpoints were computed from
_NOT_IN_NAME = ("train", "tune", "tracking", "output_dir", "device")  # how/where, not what is computed
PROBE_TIMEOUT_S = 5.0  # connecting to $RAY_ADDRESS: a live GCS answers in milliseconds
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # how often Ray Train's controller collects reports
# Every epoch's checkpoint waits for that collection: at Ray's 2 s a tiny 11-report run took 41.6 s
# on 2 CPU cores, at 0.5 s 26.5 s (at 0.1 s 25.9 s: the poll is no longer what costs).
REPORT_POLL_S = "0.5"


# ---------------------------------------------------------------- worker side
class RayReporter:
    """The pipeline's reporter under Ray Train: one ``ray.train.report`` per call on every rank.

    ``report`` is a collective, so every rank calls it the same number of times; only
    rank 0 (``writes_checkpoints``) writes the state into a fresh temp dir and attaches
    it. The upload is synchronous (the default mode), so the temp dir may vanish after.

    A report only counts once the controller has polled it off the worker's queue (every
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``: ``REPORT_POLL_S`` under ``fit``, Ray's default is 2 s);
    a worker that dies before that loses it. Rank 0 therefore waits for the commit, so a crash
    costs at most the epoch in progress (the other ranks wait for rank 0 at their next collective).
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
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_upload_fn=_upload_whole)
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def _upload_whole(checkpoint: Checkpoint, name: str) -> Checkpoint:
    """Ray's own checkpoint upload, made all or nothing: a full disk (or a crash) mid-copy must not
    leave a checkpoint folder that looks finished.

    On a file system (local, NFS) the copy goes to a hidden ``.NAME.partial`` and is renamed to
    ``NAME`` once whole; object stores (no directory rename) get the copy under its own name. A
    failed copy is removed and the error names the storage."""
    import pyarrow.fs

    storage = ray.train.get_context().get_storage()
    fs, final = storage.storage_filesystem, storage.build_checkpoint_path_from_name(name)
    renames = isinstance(fs, pyarrow.fs.LocalFileSystem)
    staged = f".{name}.partial" if renames else name
    try:
        uploaded = storage.persist_current_checkpoint(checkpoint, staged)
        if renames:
            fs.move(uploaded.path, final)
    except OSError as err:
        with contextlib.suppress(OSError):
            fs.delete_dir(storage.build_checkpoint_path_from_name(staged))
        cause = "disk full" if err.errno == errno.ENOSPC else str(err).splitlines()[0]
        raise OSError(err.errno, f"checkpoint {name} not saved to {storage.experiment_fs_path}: {cause}") from None
    return Checkpoint(path=final, filesystem=fs)


def _die(message: str) -> None:
    """Fault injection under Ray: kill this worker process for real (Ray sees an actor death)."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def _wrapper(world_size: int, device: torch.device, graphed: bool) -> Callable[[nn.Module, bool], nn.Module]:
    """DDP via ``prepare_model`` when distributed, else only a move to the device.

    A stage whose trained parameters all reach the loss the same way every step (pretrain, search
    without warm-up, fine-tune) runs with ``static_graph``: DDP records the used set once instead of
    searching the autograd graph for unused parameters after every forward. PASS's warm-up leaves
    the hypernet out of the loss for its first epochs (``varying``): ``find_unused_parameters`` then.
    Gradients are views into DDP's buckets (no copy in and out), and BN running statistics are not
    broadcast from rank 0 before every forward: each rank keeps its own, and ``RunContext.fit``
    averages them at the end of each epoch, before evaluation (as timm's ``distribute_bn``). On a
    small network, every step is launch-bound and these per-step extras are what DDP costs. With
    ``graphed`` (``train.ddp_cuda_graph``), DDP is built on ``step_graph.capture_stream``, so that whole
    steps, all-reduce included, can be captured.
    """
    if world_size == 1:
        return lambda module, varying: module.to(device)

    def wrap(module: nn.Module, varying: bool) -> nn.Module:
        # on the stream step graphs capture on: DDP keeps the gradient accumulators, which remember their stream
        on_capture_stream = graphed and device.type == "cuda"
        with torch.cuda.stream(capture_stream(device)) if on_capture_stream else contextlib.nullcontext():
            return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={
                "find_unused_parameters": varying, "static_graph": not varying, "gradient_as_bucket_view": True,
                "broadcast_buffers": False})

    return wrap


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
    wrap = _wrapper(world_size, device, cfg.cuda_graph and cfg.train.ddp_cuda_graph)
    run(cfg, Runtime(rank=rank, world_size=world_size, device=device, wrap=wrap,
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
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "mlflow_run": list(mlflow_run) if mlflow_run else None},
        scaling_config=ScalingConfig(num_workers=max(cfg.train.num_workers, 1), use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=worker_resources(cfg)[0]),
        run_config=RunConfig(name=name or run_name(cfg), storage_path=storage_uri(cfg.train.storage_path),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
                             callbacks=callbacks),
    )


def _claim_run(cfg: Config, name: str) -> None:
    """Record what run ``name`` computes (the keys ``run_name`` digests) in its folder, or refuse (one
    line, the first differing key) to resume it with a config that computes something else: its
    checkpoints hold another model, which would fail to load deep inside a worker."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage_uri(cfg.train.storage_path))
    path = f"{root}/{name}/{RUN_CONFIG_FILE}"
    flat = {k: v for k, v in cfg.flat().items() if k.split(".")[0] not in _NOT_IN_NAME and k != "pretrain.cache"}
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        with fs.open_input_stream(path) as f:
            refuse_other_config(json.loads(f.read()), flat, f"Ray Train run {name!r} ({root}/{name})")
        return
    fs.create_dir(f"{root}/{name}")
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(config_record(flat), indent=1).encode())


def _cluster_may_grow() -> bool:
    """Whether an autoscaler may add nodes to the cluster (``ray up``, KubeRay): then a run larger than
    the cluster is a reason to wait, not to refuse.

    Ray's autoscaler (v1) publishes its status in the GCS; a cluster without one (``ray.init``,
    ``ray start``) is watched by a read-only autoscaler that names each node ``node_<id>``, a real
    one by its node type (``ray up`` clusters report from their start, long before a job runs).
    Autoscaler v2 says so itself. A status that reads otherwise counts as "may grow": a refusal
    must never be wrong."""
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get

        if is_autoscaler_v2(fetch_from_server=True):
            return True
        status = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        if status is None:  # a cluster started moments ago: its monitor has not reported yet
            return False
        return not all(t.startswith("node_") for t in json.loads(status)["autoscaler_report"]["active_nodes"])
    except Exception:  # noqa: BLE001  (a Ray that moved these: do not refuse)
        return True


def worker_resources(cfg: Config) -> list[dict[str, float]]:
    """What each Ray Train worker of ``cfg`` reserves, one entry per worker: its CPUs and, with
    ``train.use_gpu``, its GPU share (``train.gpus_per_worker``, else a whole GPU)."""
    gpus = (cfg.train.gpus_per_worker or 1.0) if cfg.train.use_gpu else 0.0
    one = {"CPU": cfg.train.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    return [one] * max(cfg.train.num_workers, 1)


def assigned_gpu() -> torch.device | None:
    """The GPU Ray assigned to this process (a share of it, for packed trials), as a torch device.

    Ray narrows ``CUDA_VISIBLE_DEVICES`` to the GPU it assigned, so the device is that GPU's place in
    the list (``cuda:0`` then), not the host's GPU of that number. None when Ray assigned no GPU, or
    declared ones the machine lacks (logical GPUs of a CPU-only cluster): ``device`` decides then."""
    ids = [str(i) for i in ray.get_gpu_ids()]
    if not ids or not torch.cuda.is_available():
        return None
    return torch.device("cuda", _cuda_index(ids[0], os.environ.get("CUDA_VISIBLE_DEVICES", "")))


def _cuda_index(gpu_id: str, visible: str) -> int:
    """Torch's index of the host's GPU ``gpu_id`` when ``visible`` is ``CUDA_VISIBLE_DEVICES`` (unset: all)."""
    if not visible:
        return int(gpu_id)
    order = [v.strip() for v in visible.split(",")]
    if gpu_id not in order:
        raise RuntimeError(f"Ray assigned GPU {gpu_id}, but CUDA_VISIBLE_DEVICES={visible} hides it")
    return order.index(gpu_id)


def check_cluster_fits(bundles: list[dict[str, float]], key: str | Mapping[str, str]) -> None:
    """Refuse (one-line ``ConfigError`` naming config ``key``, or ``key[resource]`` for the resource that
    is short) resources that must be placed together, one dict per process, when the cluster cannot
    hold them all at once or no node holds one: Ray would wait forever, logging a traceback a minute.
    A cluster an autoscaler may grow is given the benefit of the doubt."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    total = ray.cluster_resources()
    asked = f"{len(bundles)} x {bundles[0]}" if all(b == bundles[0] for b in bundles) else str(bundles)
    need = {r: sum(b.get(r, 0.0) for b in bundles) for r in sorted({r for b in bundles for r in b})}
    short = next((r for r in need if need[r] > total.get(r, 0.0)), None)
    problem = None
    if short is not None:
        problem = f"{asked} need {need[short]:g} {short} in all, but the Ray cluster has {total.get(short, 0.0):g}"
    elif (lone := next((b for b in bundles if not any(all(n.get(r, 0.0) >= v for r, v in b.items()) for n in nodes)),
                       None)) is not None:
        short = next((r for r in sorted(lone) if not any(n.get(r, 0.0) >= lone[r] for n in nodes)), "CPU")
        problem = f"one process needs {lone}, but no Ray node has that much"
    if problem is not None and not _cluster_may_grow():
        name = key if isinstance(key, str) else key[short]
        raise ConfigError(f"config key '{name}': {problem}; lower it or add nodes")


def connect_ray(**init_kwargs: Any) -> None:
    """``ray.init`` on ``$RAY_ADDRESS`` (unset or ``local``: a cluster on this machine), failing in
    seconds if nothing answers there: Ray itself retries an unreachable address for many minutes.

    ``host:port`` and ``ray://host:port`` are probed with one TCP connection first; ``auto`` is
    left to Ray (it fails fast when no cluster was started on this machine)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    target = address.removeprefix("ray://") if address else ""
    host, _, port = target.rpartition(":")
    if host and port.isdigit():
        try:
            socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
        except OSError as err:
            raise RuntimeError(f"RAY_ADDRESS={address}: no Ray cluster answers at {host}:{port} "
                               f"({err.strerror or err}); start one (ray start --head) or unset RAY_ADDRESS "
                               f"to run on a local one") from None
    ray.init(address=address, **init_kwargs)


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


@contextlib.contextmanager
def _report_poll():
    """``REPORT_POLL_S`` as the controller's poll interval of the runs started inside, unless the user
    set one (Ray Train ships the driver's value to its controller and workers when ``fit`` starts)."""
    if POLL_ENV in os.environ:
        yield
        return
    os.environ[POLL_ENV] = REPORT_POLL_S
    try:
        yield
    finally:
        os.environ.pop(POLL_ENV, None)


def fit(cfg: Config, name: str | None = None, callbacks: list | None = None,
        mlflow_run: tuple[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """Run (or resume) ``cfg`` on Ray Train; returns the final metrics and the final
    checkpoint's path (a URI for remote storage), which holds the export."""
    trainer = build_trainer(cfg, name=name, callbacks=callbacks, mlflow_run=mlflow_run)
    name = trainer.run_config.name
    check_cluster_fits(worker_resources(cfg), "train.num_workers")
    _claim_run(cfg, name)
    try:
        with _report_poll():
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
    check_writable(cfg.output_dir, "output_dir")  # where the export goes: known before hours of training
    if "://" not in cfg.train.storage_path:
        check_writable(storage_uri(cfg.train.storage_path), "train.storage_path")
    connect_ray()  # RAY_ADDRESS: join that cluster; unset: start a local one
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
