"""``python -m passray.tune``: Ray Tune + Optuna over prompt size, hidden size, FLOPs target, ...

The entry point users submit to a cluster:
``ray job submit --address http://HEAD:8265 --working-dir . -- python -m passray.tune --config FILE``.

Order of work, so that mistakes cost seconds: validate config and search space (and, with
--resume, that the config is the one the experiment was started with) -> check the storage
is writable, MLflow and Ray are reachable and one trial fits the cluster -> dense-train the
backbone once (reused by every trial) -> Tune. Each trial runs the pipeline in-process
(``train.num_workers: 0``) or as a Ray Train ``TorchTrainer`` whose rank-0 metrics reach
Tune through ``TuneReportCallback``; each trial is an MLflow child run of one parent run
per experiment. A trial may reserve a share of a GPU (``train.gpus_per_worker: 0.25`` runs
four on one GPU); unless ``tune.max_concurrent_trials`` says otherwise, as many trials run at
once as the cluster's CPUs and GPUs hold.

Ctrl-C stops Tune, which saves the experiment: the results so far are written and marked
partial, the MLflow runs still open are marked KILLED, nothing is registered, the exit code
is 130, and --resume continues (a second Ctrl-C skips Tune's last save).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune

from passray._cli import config_record, load_from_args, make_parser, next_free, refuse_other_config, run_cli
from passray._state_io import check_writable, write_atomically
from passray._tune_report import (PARTIAL_NOTE, TrialTable, dense_row, pareto_front, trial_name, trial_rows,
                                  write_results)
from passray.config import Config, ConfigError
from passray.data import load_dataset_kept
from passray.pipeline import Runtime, pretrain, run
from passray.tracking import Tracker, check_reachable, resolve_uri, scalar_metrics
from passray.train import assigned_gpu, check_cluster_fits, connect_ray, copy_export, fit, storage_uri, worker_resources

__all__ = ["EXPERIMENT_FILE", "build_space", "check_tracking_reaches_trials", "check_trial_fits", "concurrent_trials",
           "experiment_config", "main", "pareto_front", "pretrain_on_cluster", "trainable", "trial_resources"]

EXPERIMENT_FILE = "passray_tune.json"  # in the experiment folder: its config record, dense result, MLflow parent
# Where an experiment lives, not what it computes: --resume names its folder (which may have moved,
# or be NAME-2 beside an older NAME), and Tune writes nothing to output_dir.
_WHERE_KEYS = ("tune.name", "train.storage_path", "output_dir")

SPACE_TYPES = ("int", "uniform", "loguniform", "choice")
# Ray's new console engine ignores a progress_reporter and prints each trial's config and results;
# TBX (TensorBoard) logging is on by default and prints a hint for a tool passray does not use.
# Both are switched off by Ray's documented variables, unless the user set them.
CONSOLE_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
TRAINER_TRIAL_CPUS = 0.5  # a trial whose pipeline runs on Ray Train workers only waits for its TorchTrainer


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
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{where}: 'low' and 'high' must be finite, got low={low} high={high}")
    if not low < high:
        raise ConfigError(f"{where}: empty range, low={low} must be < high={high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: 'loguniform' needs low > 0, got {low}")
    if kind == "int":
        return tune.randint(int(low), int(high) + 1), [int(low), int(high)]
    return (tune.loguniform if kind == "loguniform" else tune.uniform)(low, high), [low, high]


def build_space(cfg: Config) -> dict[str, Any]:
    """YAML space -> Tune domains; every key and the extremes of every range are validated now."""
    space = {}
    for key, spec in cfg.tune.space.items():
        if key.split(".")[0] == "tune":
            raise ConfigError(f"config key 'tune.space.{key}': the tune section itself cannot be searched")
        if not isinstance(spec, dict):
            raise ConfigError(f"config key 'tune.space.{key}': expected a mapping like {{type: uniform, low: 0.1, high: 0.9}}")
        domain, extremes = _domain(key, spec)
        for value in extremes:
            try:
                cfg.derive({key: value})
            except ConfigError as err:
                raise ConfigError(f"config key 'tune.space.{key}': value {value!r} is invalid ({err})") from None
        space[key] = domain
    return space


def trial_resources(cfg: Config) -> list[dict[str, float]]:
    """What one trial reserves, one dict per process: the trial itself (which runs the pipeline when
    ``train.num_workers`` is 0, on its GPU share, ``train.gpus_per_worker``), then its Ray Train workers."""
    if cfg.train.num_workers == 0:
        return [{**worker_resources(cfg)[0], "CPU": cfg.tune.cpus_per_trial}]
    return [{"CPU": TRAINER_TRIAL_CPUS}, *worker_resources(cfg)]


def check_trial_fits(cfg: Config) -> None:
    """Refuse a trial the cluster cannot hold in one line naming the key to lower (Tune would wait forever)."""
    if cfg.train.num_workers:
        check_cluster_fits(trial_resources(cfg), "train.num_workers")
    else:
        gpus = "train.gpus_per_worker" if cfg.train.gpus_per_worker else "train.use_gpu"
        check_cluster_fits(trial_resources(cfg), {"CPU": "tune.cpus_per_trial", "GPU": gpus})


def concurrent_trials(cfg: Config) -> int:
    """Trials run at once: ``tune.max_concurrent_trials``, else as many as the cluster holds, the fewest
    over its resources of (cluster total // one trial's need): 2 GPUs at 0.25 GPU a trial hold 8 trials,
    if the CPUs hold 8 too. At least 1 (a cluster an autoscaler may grow starts small)."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    need: dict[str, float] = {}
    for bundle in trial_resources(cfg):
        for resource, amount in bundle.items():
            need[resource] = need.get(resource, 0.0) + amount
    total = ray.cluster_resources()
    # 1e-6: shares like 0.1 do not add up exactly, and Ray counts resources in 1e-4 units anyway
    return max(1, min(int(total.get(resource, 0.0) / amount + 1e-6) for resource, amount in need.items()))


def trainable(cfg: Config, function: Callable[..., None], **parameters: Any) -> Any:
    """``function`` as Tune runs it for ``cfg``: with its ``parameters`` and a trial's resources."""
    return tune.with_resources(tune.with_parameters(function, **parameters), trial_resources(cfg)[0])


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
    what was searched; the base config and the MLflow parent come in ``job`` (``tune.with_parameters``).
    In-process trials run on the GPU (share) Ray assigned them, if any."""
    cfg = job["base"].derive(values)
    context = tune.get_context()
    tracker = Tracker(job["tracking_uri"], check=False)
    child = tracker.start_child(job["parent_run_id"], context.get_trial_name(), params={**cfg.flat(), **values})
    try:
        if cfg.train.num_workers == 0:
            run(cfg, Runtime(device=assigned_gpu(), reporter=_TuneReporter(tracker, child, cfg), restored=_restored(),
                             progress=False, load_data=load_dataset_kept))
        else:
            from ray.tune.integration.ray_train import TuneReportCallback

            _, checkpoint = fit(cfg, name=f"{job['experiment']}-{context.get_trial_id()}",
                                callbacks=[TuneReportCallback()], mlflow_run=(job["tracking_uri"], child))
            with tempfile.TemporaryDirectory(prefix="passray-export-") as export:
                tracker.log_export(child, copy_export(checkpoint, export))
            tracker.log_config(child, cfg)
            tracker.end(child, "FINISHED")
    except (SystemExit, KeyboardInterrupt):  # Tune stopped the trial (ASHA, Ctrl-C), maybe after its final report
        tracker.end(child, "KILLED", if_running=True)
        raise
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
                               reuse_actors=cfg.tune.reuse_actors, trial_name_creator=trial_name,
                               trial_dirname_creator=trial_name)
    # max_t well above any trial's number of reports (epochs are searchable): ASHA only stops at
    # its rungs, and a trial that finishes reports its final, exported result.
    scheduler = ASHAScheduler(max_t=10_000, grace_period=cfg.tune.grace_period,
                              reduction_factor=cfg.tune.reduction_factor)
    return tune.TuneConfig(metric="val_accuracy", mode="max", search_alg=OptunaSearch(seed=cfg.seed),
                           scheduler=scheduler, num_samples=cfg.tune.num_samples, max_concurrent_trials=slots,
                           reuse_actors=cfg.tune.reuse_actors, trial_name_creator=trial_name,
                           trial_dirname_creator=trial_name)


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


@contextlib.contextmanager
def _own_sigint():
    """Tune swaps in its own SIGINT handler for a run (the first Ctrl-C saves the experiment and stops
    it) and leaves it installed when the run ends without one; afterwards Ctrl-C interrupts again."""
    if threading.current_thread() is not threading.main_thread():  # where signal handlers cannot be set
        yield
        return
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


def _report(cfg: Config, rows: list[dict[str, Any]], front: list[dict[str, Any]], dense: dict[str, Any] | None,
            out: Path, tracker: Tracker, parent: str, partial: bool) -> None:
    title = f"{out.name}: {cfg.method} on {cfg.data.name}, {cfg.model.arch} ({len(rows)} trials)"
    table, front_table = write_results(out, rows, front, dense, list(cfg.tune.space), title, partial)
    for name in ("pareto.png", "results.json", "results.txt"):
        tracker.client.log_artifact(parent, str(out / name))
    finished = [r["val_accuracy"] for r in rows if r["status"] == "done" and r["val_accuracy"] is not None]
    if finished:
        tracker.log_metrics(parent, {"best_val_accuracy": max(finished), "pareto_size": len(front)})
    print(f"\n{PARTIAL_NOTE}\n" if partial else "")
    print(f"{table}\n\nPareto front (val accuracy vs MACs kept):\n{front_table}")
    print(f"\nsaved {out}/results.json, results.txt, pareto.png" + (" (partial)" if partial else ""))


def _register(cfg: Config, rows: list[dict[str, Any]], front: list[dict[str, Any]], uri: str) -> None:
    from passray.registry import register_run

    done = [r for r in rows if r["status"] == "done"]
    chosen = pareto_front(done) if cfg.tune.objective == "multi" else sorted(done, key=lambda r: -r["val_accuracy"])[:1]
    for row in chosen:
        if row.get("mlflow_run_id"):
            info = register_run(row["mlflow_run_id"], tracking_uri=uri)
            versions = [v for v in info.values() if isinstance(v, dict) and "version" in v]
            names = ", ".join(f"{v['name']} v{v['version']}" for v in versions)
            again = versions and all(v.get("existing") for v in versions)
            print(f"trial {row['trial']} {'was already registered' if again else 'registered'}: {names}")


def _pretrain_task(cfg: Config, path: str) -> dict[str, Any]:
    out = pretrain(cfg, path, Runtime(device=assigned_gpu(), progress=False))
    return {**out, "node": ray.get_runtime_context().get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]}


def pretrain_on_cluster(cfg: Config, path: Path) -> dict[str, Any]:
    """The shared dense training: on a GPU worker when trials use GPUs (a cluster's head node
    often has none, and CPU training would take hours), else here on the driver."""
    if not cfg.train.use_gpu:
        return pretrain(cfg, path, Runtime(progress=True))
    task = ray.remote(num_gpus=1, num_cpus=cfg.train.cpus_per_worker)(_pretrain_task)
    return ray.get(task.remote(cfg, str(path)))


def check_tracking_reaches_trials(uri: str, hosts: set[str]) -> None:
    """Refuse a file-based MLflow store when trials may run on other hosts: each would log to
    its own copy of the file and the parent run would never see them."""
    if len(hosts) > 1 and uri.startswith(("sqlite:", "file:", "/", ".")):
        raise ConfigError(f"config key 'tracking.uri': {uri!r} is a file on this host, but the cluster spans "
                          f"{len(hosts)} hosts whose trials cannot log to it; use an MLflow server (http://...)")


def experiment_config(cfg: Config) -> dict[str, Any]:
    """What ``--resume`` must find unchanged: the resolved config, the MLflow store included (the parent
    run lives there; Tuner.restore would silently keep the old search space, scheduler and limits)."""
    flat = {k: v for k, v in cfg.flat().items() if k not in _WHERE_KEYS}
    return {**flat, "tracking.uri": resolve_uri(cfg.tracking.uri)}


def _resumed_state(cfg: Config, given: str) -> tuple[Path, dict[str, Any]]:
    """The experiment folder ``--resume`` names and its state; refuses (before Ray starts) a folder that
    is none, or a config other than the one it was started with."""
    exp_dir = Path(given).expanduser().resolve()  # Tuner.restore needs an absolute path
    if not (exp_dir / EXPERIMENT_FILE).is_file():
        raise ConfigError(f"--resume {given}: not a passray.tune experiment directory ({exp_dir})")
    state = json.loads((exp_dir / EXPERIMENT_FILE).read_text())
    if "config_hash" in state:  # experiments of passray versions before the record cannot be checked
        refuse_other_config(state, experiment_config(cfg), f"experiment {exp_dir}")
    return exp_dir, state


def _tuner(cfg: Config, exp_dir: Path, trial, space: dict[str, Any]) -> tune.Tuner:
    """Tuner.restore when Tune saved this experiment before, else a new Tuner in ``exp_dir`` (also on
    --resume of an experiment interrupted before its first trial, e.g. in the dense training)."""
    if tune.Tuner.can_restore(str(exp_dir)):
        return tune.Tuner.restore(str(exp_dir), trial, resume_unfinished=True, resume_errored=True)
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    run_config = tune.RunConfig(name=exp_dir.name, storage_path=str(exp_dir.parent),
                                failure_config=tune.FailureConfig(max_failures=cfg.tune.max_trial_failures),
                                verbose=1, progress_reporter=TrialTable(list(space)),
                                callbacks=[CSVLoggerCallback(), JsonLoggerCallback()])
    return tune.Tuner(trial, param_space=space, tune_config=_tune_config(cfg, concurrent_trials(cfg)),
                      run_config=run_config)


def _unfinished(cfg: Config, exp_dir: Path) -> set[str]:
    """Trials the saved experiment has not finished (what --resume would run), by id, plus a placeholder
    per sample Tune has not created yet; empty when the experiment is complete. Tune saves the
    experiment before it stops the trials still running, so the saved state tells an interruption."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    trials = ExperimentAnalysis(str(exp_dir)).trials
    unfinished = {t.trial_id for t in trials if t.status not in (Trial.TERMINATED, Trial.ERROR)}
    return unfinished | {f"not started {i + 1}" for i in range(cfg.tune.num_samples - len(trials))}


def _close(tracker: Tracker, parent: str, status: str) -> None:
    """End the parent run; a child still RUNNING lost its trial process (killed by Tune's stop)."""
    tracker.end_children(parent, "KILLED")
    tracker.end(parent, status)


def _new_experiment(cfg: Config, storage: str) -> tuple[Config, Path]:
    """A new experiment folder (``tune.name``, else the next free ``NAME-2``, ...): a new run never
    touches an old one, nor one started at the same moment (creating the state file claims a folder)."""
    while True:
        exp_dir = next_free(Path(storage) / cfg.tune.name)
        exp_dir.mkdir(parents=True, exist_ok=True)
        try:
            (exp_dir / EXPERIMENT_FILE).open("x").close()
            break
        except FileExistsError:  # claimed since next_free looked: take the next one
            continue
    if exp_dir.name != cfg.tune.name:
        taken = exp_dir.with_name(cfg.tune.name)
        cfg = cfg.derive({"tune.name": exp_dir.name})
        print(f"{taken} exists (continue it with --resume {taken}); this run is {exp_dir.name}")
    return cfg, exp_dir


def _sweep(cfg: Config, exp_dir: Path, state: dict[str, Any], tracker: Tracker,
           space: dict[str, Any]) -> list[dict[str, Any]]:
    """The shared dense training (once), the MLflow parent run, Tune, the results; an interrupted
    sweep writes its partial results, then ends in ``KeyboardInterrupt``."""
    state_file = exp_dir / EXPERIMENT_FILE
    base = cfg
    if cfg.pretrain.epochs > 0 and not cfg.model.weights:
        weights = exp_dir / "backbone.safetensors"
        if not weights.exists():
            print(f"dense training of {cfg.model.arch} once, shared by every trial -> {weights}")
            dense = pretrain_on_cluster(cfg, weights)
            state["dense"] = {k: v for k, v in dense.items() if k != "path"}
        base = cfg.derive({"model.weights": str(weights), "pretrain.epochs": 0})
    if "parent_run_id" in state:
        tracker.reopen(state["parent_run_id"])
    else:
        state["parent_run_id"] = tracker.start_parent(cfg.tracking.experiment, exp_dir.name, params=cfg.flat())
        tracker.log_config(state["parent_run_id"], cfg)
    write_atomically(state_file, json.dumps(state, indent=1))
    parent = state["parent_run_id"]
    job = {"base": base, "tracking_uri": tracker.uri, "parent_run_id": parent, "experiment": exp_dir.name}
    tuner = _tuner(cfg, exp_dir, trainable(cfg, run_trial, job=job), space)
    with _console_env(), _own_sigint():
        results = tuner.fit()
    unfinished = _unfinished(cfg, exp_dir)
    rows = [{**r, "status": "unfinished"} if r["trial"] in unfinished and r["status"] != "ERROR" else r
            for r in trial_rows(results, cfg.flat())]
    front = pareto_front(rows)
    _report(cfg, rows, front, dense_row(state.get("dense"), rows), exp_dir, tracker, parent, partial=bool(unfinished))
    if unfinished:  # nothing registered from a partial sweep: its best may not be the sweep's best
        raise KeyboardInterrupt(f"{len(unfinished)} of {cfg.tune.num_samples} trials unfinished; partial results in "
                                f"{exp_dir}; continue with --resume {exp_dir}")
    if cfg.tracking.register_best:
        _register(cfg, rows, front, tracker.uri)
    failed = sum(1 for r in rows if r["status"] == "ERROR")
    _close(tracker, parent, "FAILED" if failed == len(rows) else "FINISHED")
    if failed == len(rows):
        raise RuntimeError(f"all {failed} trials failed; see {exp_dir}")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = make_parser("passray.tune", __doc__.split("\n\n")[0])
    parser.add_argument("--resume", metavar="PATH", help="experiment dir of an interrupted run (Tuner.restore); "
                                                         "with the --config/--set it was started with")
    args = parser.parse_args(argv)
    cfg = load_from_args(args)
    space = build_space(cfg)
    if "://" in cfg.train.storage_path:  # the shared backbone and results are files the driver writes
        raise ConfigError(f"config key 'train.storage_path': passray.tune needs a directory every node mounts "
                          f"(local or NFS), got {cfg.train.storage_path!r}")
    exp_dir, state = _resumed_state(cfg, args.resume) if args.resume else (None, {})
    storage = storage_uri(cfg.train.storage_path)
    check_writable(exp_dir or storage, "train.storage_path")
    uri = resolve_uri(cfg.tracking.uri)
    check_reachable(uri)  # fails here, before Ray or any training, if MLflow cannot be logged to
    # MLflow's imports and store open while Ray starts: 7.6 -> 5.5 s for both on 2 cores
    with ThreadPoolExecutor(1, thread_name_prefix="passray-mlflow") as pool:
        opening = pool.submit(Tracker, uri, check=False)
        connect_ray(log_to_driver=False)  # fails in seconds if RAY_ADDRESS names no cluster
        tracker = opening.result()
    check_tracking_reaches_trials(uri, {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})
    check_trial_fits(cfg)
    if exp_dir is None:
        cfg, exp_dir = _new_experiment(cfg, storage)
        state = config_record(experiment_config(cfg))
    # written now, so that an experiment stopped in its dense training can be resumed too
    write_atomically(exp_dir / EXPERIMENT_FILE, json.dumps(state, indent=1))
    try:
        return _sweep(cfg, exp_dir, state, tracker, space)
    except KeyboardInterrupt as err:  # a partial sweep, or Ctrl-C outside Tune's own handling (a second one, say)
        if "parent_run_id" in state:
            _close(tracker, state["parent_run_id"], "KILLED")
        raise KeyboardInterrupt(str(err) or f"continue with --resume {exp_dir}") from None


if __name__ == "__main__":
    run_cli(main, "passray.tune")
