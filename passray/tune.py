"""``python -m passray.tune``: Ray Tune + Optuna over prompt size, hidden size, FLOPs target, ...

The entry point users submit to a cluster:
``ray job submit --address http://HEAD:8265 --working-dir . -- python -m passray.tune --config FILE``.

Order of work, so that mistakes cost seconds: validate config and search space -> check
MLflow is reachable -> dense-train the backbone once (reused by every trial) -> Tune.
Each trial runs the pipeline in-process (``train.num_workers: 0``) or as a Ray Train
``TorchTrainer`` whose rank-0 metrics reach Tune through ``TuneReportCallback``; each
trial is an MLflow child run of one parent run per experiment.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune

from passray._cli import load_from_args, make_parser, next_free, run_cli
from passray._tune_report import TrialTable, dense_row, pareto_front, trial_name, trial_rows, write_results
from passray.config import Config, ConfigError, apply_overrides, validate
from passray.pipeline import Runtime, pretrain, run
from passray.tracking import Tracker, resolve_uri
from passray.train import copy_export, fit, scalar_metrics, storage_uri

__all__ = ["build_space", "check_tracking_reaches_trials", "main", "pareto_front", "pretrain_on_cluster"]

SPACE_TYPES = ("int", "uniform", "loguniform", "choice")
# Ray's new console engine ignores a progress_reporter and prints each trial's config and results;
# TBX (TensorBoard) logging is on by default and prints a hint for a tool passray does not use.
# Both are switched off by Ray's documented variables, unless the user set them.
CONSOLE_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


# ---------------------------------------------------------------- search space
def _domain(key: str, spec: dict[str, Any]):
    where = f"config key 'tune.space.{key}'"
    kind = spec.get("type")
    if kind not in SPACE_TYPES:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; choose one of {', '.join(SPACE_TYPES)}")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: 'choice' needs a non-empty list 'values'")
        return tune.choice(values), values
    low, high = spec.get("low"), spec.get("high")
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)):
        raise ConfigError(f"{where}: '{kind}' needs numeric 'low' and 'high'")
    if not low < high:
        raise ConfigError(f"{where}: empty range, low={low} must be < high={high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: 'loguniform' needs low > 0, got {low}")
    if kind == "int":
        return tune.randint(int(low), int(high) + 1), [int(low), int(high)]
    return (tune.loguniform if kind == "loguniform" else tune.uniform)(low, high), [low, high]


def build_space(cfg: Config) -> dict[str, Any]:
    """YAML space -> Tune domains; every key and the extremes of every range are validated now."""
    base = cfg.to_dict()
    space = {}
    for key, spec in cfg.tune.space.items():
        if key.split(".")[0] == "tune":
            raise ConfigError(f"config key 'tune.space.{key}': the tune section itself cannot be searched")
        if not isinstance(spec, dict):
            raise ConfigError(f"config key 'tune.space.{key}': expected a mapping like {{type: uniform, low: 0.1, high: 0.9}}")
        domain, extremes = _domain(key, spec)
        for value in extremes:
            try:
                validate(apply_overrides(base, [f"{key}={json.dumps(value)}"]))
            except ConfigError as err:
                raise ConfigError(f"config key 'tune.space.{key}': value {value!r} is invalid ({err})") from None
        space[key] = domain
    return space


def trial_config(base: dict[str, Any], values: dict[str, Any]) -> Config:
    return validate(apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in values.items()]))


# ---------------------------------------------------------------- one trial
class _TuneReporter:
    """In-process trials: ``tune.report`` each epoch (+ checkpoint) and the same metrics to MLflow.

    The final report (stage ``done``) carries the export: it is logged to MLflow and the
    child run closed *before* Tune hears of it, because Tune counts the trial finished
    from that report on and a resumed experiment will not run it again.
    """

    def __init__(self, tracker: Tracker, run_id: str, cfg: Config) -> None:
        self.tracker, self.run_id, self.cfg = tracker, run_id, cfg

    def report(self, metrics: dict[str, Any], save_state) -> None:
        metrics = scalar_metrics(metrics)
        self.tracker.log_metrics(self.run_id, metrics)
        with tempfile.TemporaryDirectory(prefix="passray-trial-") as tmp:
            checkpoint = None
            if save_state is not None:
                save_state(Path(tmp))
                checkpoint = tune.Checkpoint.from_directory(tmp)
            if metrics.get("stage") == "done":
                self.tracker.log_export(self.run_id, tmp)
                self.tracker.log_config(self.run_id, self.cfg)
                self.tracker.end(self.run_id, "FINISHED")
            tune.report({**metrics, "mlflow_run_id": self.run_id, "node_id": ray.get_runtime_context().get_node_id()},
                        checkpoint=checkpoint)


def _restored() -> dict[str, Any] | None:
    from passray._state_io import load_state

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return load_state(directory)


def run_trial(values: dict[str, Any], *, job: dict[str, Any]) -> None:
    """Tune's trainable: one pruning job for one point of the search space.

    ``values`` (the trial's config) holds only the sampled values, so that Tune's trial config is
    what was searched; the base config and the MLflow parent come in ``job`` (``tune.with_parameters``)."""
    cfg = trial_config(job["base"], values)
    context = tune.get_context()
    tracker = Tracker(job["tracking_uri"], check=False)
    child = tracker.start_child(job["parent_run_id"], context.get_trial_name(), params={**cfg.flat(), **values})
    try:
        if cfg.train.num_workers == 0:
            run(cfg, Runtime(reporter=_TuneReporter(tracker, child, cfg), restored=_restored(), progress=False))
        else:
            from ray.tune.integration.ray_train import TuneReportCallback

            _, checkpoint = fit(cfg, name=f"{job['experiment']}-{context.get_trial_id()}",
                                callbacks=[TuneReportCallback()], mlflow_run=(job["tracking_uri"], child))
            with tempfile.TemporaryDirectory(prefix="passray-export-") as export:
                tracker.log_export(child, copy_export(checkpoint, export))
            tracker.log_config(child, cfg)
            tracker.end(child, "FINISHED")
    except BaseException:
        tracker.end(child, "FAILED")
        raise


# ---------------------------------------------------------------- driver
def _tune_config(cfg: Config, slots: int):
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    if cfg.tune.objective == "multi":
        searcher = OptunaSearch(metric=["val_accuracy", "macs_ratio"], mode=["max", "min"], seed=cfg.seed)
        return tune.TuneConfig(search_alg=searcher, num_samples=cfg.tune.num_samples, max_concurrent_trials=slots,
                               trial_name_creator=trial_name, trial_dirname_creator=trial_name)
    # max_t well above any trial's number of reports (epochs are searchable): ASHA only stops at
    # its rungs, and a trial that finishes reports its final, exported result.
    scheduler = ASHAScheduler(max_t=10_000, grace_period=cfg.tune.grace_period,
                              reduction_factor=cfg.tune.reduction_factor)
    return tune.TuneConfig(metric="val_accuracy", mode="max", search_alg=OptunaSearch(seed=cfg.seed),
                           scheduler=scheduler, num_samples=cfg.tune.num_samples, max_concurrent_trials=slots,
                           trial_name_creator=trial_name, trial_dirname_creator=trial_name)


def _slots(cfg: Config, driver_cpus: float) -> int:
    """Trials that fit at once: the driver's CPUs plus, with Ray Train, its workers' CPUs/GPUs."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    workers = cfg.train.num_workers
    cluster = ray.cluster_resources()
    fits = cluster.get("CPU", 1) // (driver_cpus + workers * cfg.train.cpus_per_worker)
    if workers and cfg.train.use_gpu:
        fits = min(fits, cluster.get("GPU", 0) // workers)
    return max(1, int(fits))


@contextlib.contextmanager
def _console_env():
    """``CONSOLE_ENV`` while Tune runs; a variable the user set keeps its value."""
    added = {k: v for k, v in CONSOLE_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _report(cfg: Config, rows: list[dict[str, Any]], front: list[dict[str, Any]], dense: dict[str, Any] | None,
            out: Path, tracker: Tracker, parent: str) -> None:
    title = f"{cfg.tune.name}: {cfg.method} on {cfg.data.name}, {cfg.model.arch} ({len(rows)} trials)"
    table, front_table = write_results(out, rows, front, dense, list(cfg.tune.space), title)
    for name in ("pareto.png", "results.json", "results.txt"):
        tracker.client.log_artifact(parent, str(out / name))
    finished = [r["val_accuracy"] for r in rows if r["status"] == "done" and r["val_accuracy"] is not None]
    if finished:
        tracker.log_metrics(parent, {"best_val_accuracy": max(finished), "pareto_size": len(front)})
    print(f"\n{table}\n\nPareto front (val accuracy vs MACs kept):\n{front_table}")
    print(f"\nsaved {out}/results.json, results.txt, pareto.png")


def _register(cfg: Config, rows: list[dict[str, Any]], front: list[dict[str, Any]], uri: str) -> None:
    from passray.registry import register_run

    done = [r for r in rows if r["status"] == "done"]
    chosen = pareto_front(done) if cfg.tune.objective == "multi" else sorted(done, key=lambda r: -r["val_accuracy"])[:1]
    for row in chosen:
        if row.get("mlflow_run_id"):
            info = register_run(row["mlflow_run_id"], tracking_uri=uri)
            names = [f"{v['name']} v{v['version']}" for k, v in info.items() if isinstance(v, dict) and "version" in v]
            print(f"registered trial {row['trial']}: {', '.join(names)}")


def _pretrain_task(cfg_dict: dict[str, Any], path: str) -> dict[str, Any]:
    out = pretrain(validate(cfg_dict), path, Runtime(progress=False))
    return {**out, "node": ray.get_runtime_context().get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]}


def pretrain_on_cluster(cfg: Config, path: Path) -> dict[str, Any]:
    """The shared dense training: on a GPU worker when trials use GPUs (a cluster's head node
    often has none, and CPU training would take hours), else here on the driver."""
    if not cfg.train.use_gpu:
        return pretrain(cfg, path, Runtime(progress=True))
    task = ray.remote(num_gpus=1, num_cpus=cfg.train.cpus_per_worker)(_pretrain_task)
    return ray.get(task.remote(cfg.to_dict(), str(path)))


def check_tracking_reaches_trials(uri: str, hosts: set[str]) -> None:
    """Refuse a file-based MLflow store when trials may run on other hosts: each would log to
    its own copy of the file and the parent run would never see them."""
    if len(hosts) > 1 and uri.startswith(("sqlite:", "file:", "/", ".")):
        raise ConfigError(f"config key 'tracking.uri': {uri!r} is a file on this host, but the cluster spans "
                          f"{len(hosts)} hosts whose trials cannot log to it; use an MLflow server (http://...)")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = make_parser("passray.tune", __doc__.split("\n\n")[0])
    parser.add_argument("--resume", metavar="PATH", help="experiment dir of an interrupted run (Tuner.restore)")
    args = parser.parse_args(argv)
    cfg = load_from_args(args)
    space = build_space(cfg)
    if "://" in cfg.train.storage_path:  # the shared backbone and results are files the driver writes
        raise ConfigError(f"config key 'train.storage_path': passray.tune needs a directory every node mounts "
                          f"(local or NFS), got {cfg.train.storage_path!r}")
    resume = Path(args.resume).expanduser().resolve() if args.resume else None  # Tuner.restore needs an absolute path
    if resume is not None and not (resume / "passray_tune.json").is_file():  # before Ray starts: no wait for a typo
        raise ConfigError(f"--resume {args.resume}: not a passray.tune experiment directory ({resume})")
    uri = resolve_uri(cfg.tracking.uri)
    tracker = Tracker(uri)  # fails here, before any training, if MLflow is unreachable
    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=False)
    check_tracking_reaches_trials(uri, {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})
    storage = storage_uri(cfg.train.storage_path)
    exp_dir = resume or next_free(Path(storage) / cfg.tune.name)  # a new run never touches an old one
    if resume is None and exp_dir.name != cfg.tune.name:
        taken = exp_dir.with_name(cfg.tune.name)
        cfg = validate(apply_overrides(cfg.to_dict(), [f"tune.name={exp_dir.name}"]))
        print(f"{taken} exists (continue it with --resume {taken}); this run is {exp_dir.name}")
    exp_dir.mkdir(parents=True, exist_ok=True)
    state_file = exp_dir / "passray_tune.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    base = cfg.to_dict()
    if cfg.pretrain.epochs > 0 and not cfg.model.weights:
        weights = exp_dir / "backbone.safetensors"
        if not weights.exists():
            print(f"dense training of {cfg.model.arch} once, shared by every trial -> {weights}")
            dense = pretrain_on_cluster(cfg, weights)
            state["dense"] = {k: v for k, v in dense.items() if k != "path"}
        base = apply_overrides(base, [f"model.weights={weights}", "pretrain.epochs=0"])
    if "parent_run_id" not in state:
        state["parent_run_id"] = tracker.start_parent(cfg.tracking.experiment, cfg.tune.name, params=cfg.flat())
        tracker.log_config(state["parent_run_id"], cfg)
    state_file.write_text(json.dumps(state, indent=1))
    per_trial = cfg.tune.cpus_per_trial if cfg.train.num_workers == 0 else 0.5
    job = {"base": base, "tracking_uri": uri, "parent_run_id": state["parent_run_id"], "experiment": cfg.tune.name}
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), {"CPU": per_trial})
    if args.resume:
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

        tuner = tune.Tuner(trainable, param_space=space, tune_config=_tune_config(cfg, _slots(cfg, per_trial)),
                           run_config=tune.RunConfig(name=cfg.tune.name, storage_path=storage,
                                                     failure_config=tune.FailureConfig(max_failures=cfg.tune.max_trial_failures),
                                                     verbose=1, progress_reporter=TrialTable(list(space)),
                                                     callbacks=[CSVLoggerCallback(), JsonLoggerCallback()]))
    with _console_env():
        results = tuner.fit()
    rows = trial_rows(results, cfg.flat())
    front = pareto_front(rows)
    _report(cfg, rows, front, dense_row(state.get("dense"), rows), exp_dir, tracker, state["parent_run_id"])
    if cfg.tracking.register_best:
        _register(cfg, rows, front, uri)
    failed = sum(1 for r in rows if r["status"] == "ERROR")
    tracker.end(state["parent_run_id"], "FAILED" if failed == len(rows) else "FINISHED")
    if failed == len(rows):
        raise RuntimeError(f"all {failed} trials failed; see {exp_dir}")
    return rows


if __name__ == "__main__":
    run_cli(main, "passray.tune")
