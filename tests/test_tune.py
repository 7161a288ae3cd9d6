"""passray.tune: search-space errors before Ray starts, the console and the results a person
reads, `ray job submit` on a real two-node local cluster with a real MLflow server, and
--resume of an interrupted experiment."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from passray.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

TINY = {
    "method": "pass",
    "data": {"name": "digits", "batch_size": 32, "limit_train": 128, "eval_batch_size": 256},
    "model": {"arch": "convnet", "width": 0.25},
    "bn_recalibration_batches": 2,
    "pretrain": {"epochs": 1, "lr": 0.05},
    "search": {"epochs": 1},
    "finetune": {"epochs": 1},
    "train": {"num_workers": 0},
    "tracking": {"experiment": "tiny"},
    "tune": {"name": "tiny", "num_samples": 2, "objective": "multi", "space": {
        "prompt.size": {"type": "int", "low": 2, "high": 4},
        "budget.keep_ratio": {"type": "uniform", "low": 0.3, "high": 0.7}}},
}


QUICKSTART_KEYS = ["prompt.size", "hypernet.hidden_size", "budget.keep_ratio"]
CONSOLE_LINES_4_TRIALS = 150  # the quickstart's console (4 trials) must fit; Ray's default printed ~1,000 lines


def _write(tmp_path: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["train"]["storage_path"] = str(tmp_path / "ray_results")
    cfg["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("space,needle", [
    ({"budget.nonsense": {"type": "uniform", "low": 0.1, "high": 0.2}}, "tune.space.budget.nonsense"),
    ({"prompt.size": {"type": "int", "low": 4, "high": 4}}, "empty range"),
    ({"prompt.size": {"type": "normal", "low": 1, "high": 4}}, "unknown distribution"),
    ({"budget.keep_ratio": {"type": "uniform", "low": 0.5, "high": 1.5}}, "tune.space.budget.keep_ratio"),
    ({"hypernet.hidden_size": {"type": "choice", "values": []}}, "non-empty list"),
    ({"search.lr": {"type": "loguniform", "low": 0.0, "high": 0.1}}, "low > 0"),
    ({"search.lr": {"type": "loguniform", "low": 1e-4, "high": float("inf")}}, "must be finite"),
    ({"search.lr": {"type": "uniform", "low": float("nan"), "high": 0.1}}, "must be finite"),
])
def test_search_space_errors_fail_before_ray_starts(tmp_path: Path, space: dict, needle: str) -> None:
    import ray

    from passray.tune import main

    path = _write(tmp_path, tune__space=space)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")) as err:
        main(["--config", str(path)])
    assert "\n" not in str(err.value)
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_file_tracking_store_is_refused_on_a_multi_host_cluster() -> None:
    from passray.tune import check_tracking_reaches_trials

    for uri in ("sqlite:////data/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns"):
        check_tracking_reaches_trials(uri, {"10.0.0.1"})  # one host (local nodes share it): fine
        with pytest.raises(ConfigError, match="tracking.uri.*2 hosts"):
            check_tracking_reaches_trials(uri, {"10.0.0.1", "10.0.0.2"})
    check_tracking_reaches_trials("http://mlflow:5000", {"10.0.0.1", "10.0.0.2"})
    check_tracking_reaches_trials("databricks", {"10.0.0.1", "10.0.0.2"})


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, tune__space={"prompt.size": {"type": "int", "low": 5, "high": 1}})
    proc = subprocess.run([sys.executable, "-m", "passray.tune", "--config", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "tune.space.prompt.size" in proc.stderr


def _trial(trial_id: str, values: dict, status: str = "PENDING", **result):
    from ray.tune.experiment import Trial

    trial = Trial("run_trial", config=values, trial_id=trial_id, stub=True)
    trial.set_status(status)
    if result:
        trial.update_last_result(result)
    return trial


def _quickstart_trials() -> list:
    return [_trial("0bc42b7e", {"prompt.size": 4, "hypernet.hidden_size": 16, "budget.keep_ratio": 0.46946191973556184},
                   "TERMINATED", training_iteration=5, stage="done", val_accuracy=0.9514, macs_ratio=0.4683),
            _trial("48496223", {"prompt.size": 5, "hypernet.hidden_size": 64, "budget.keep_ratio": 0.32841442327915477},
                   "RUNNING", training_iteration=2, stage="search", val_accuracy=0.875, macs_ratio=0.3236),
            _trial("a187e7f2", {"prompt.size": 2, "hypernet.hidden_size": 32, "budget.keep_ratio": 0.6480048592987276})]


def test_trial_names_and_folders_carry_the_sampled_values() -> None:
    from ray.tune.experiment import Trial

    from passray._tune_report import trial_name

    trial = _quickstart_trials()[1]
    assert trial_name(trial) == "48496223_size=5,hidden_size=64,keep_ratio=0.3284"
    clash = _trial("1", {"prompt.size": 4, "data.size": 32, "data.root": "/data/x y"})
    assert trial_name(clash) == "1_prompt.size=4,data.size=32,root=_data_x_y"  # a folder name: no '/', no spaces
    named = Trial("run_trial", config={"budget.keep_ratio": 0.3284}, trial_id="ab", stub=True,
                  trial_name_creator=trial_name, trial_dirname_creator=trial_name)
    assert str(named) == "ab_keep_ratio=0.3284"


def test_live_table_shows_sampled_values_and_prints_on_status_changes() -> None:
    from passray._tune_report import TrialTable

    trials = _quickstart_trials()
    table = TrialTable(QUICKSTART_KEYS, heartbeat_s=math.inf, settle_s=0)
    assert table.should_report(trials) and not table.should_report(trials)
    trials[1].update_last_result({"training_iteration": 3, "stage": "finetune"})
    assert not table.should_report(trials)  # progress alone waits for the heartbeat
    trials[2].set_status("RUNNING")
    assert table.should_report(trials)
    eager = TrialTable(QUICKSTART_KEYS, heartbeat_s=0, settle_s=0)
    assert eager.should_report(trials) and not eager.should_report(trials)  # no new result: nothing to show
    trials[1].update_last_result({"training_iteration": 4, "stage": "finetune"})
    assert eager.should_report(trials)
    settling = TrialTable(QUICKSTART_KEYS, heartbeat_s=math.inf, settle_s=math.inf)
    assert not settling.should_report(trials)  # changes that come together wait to make one table...
    assert settling.should_report(trials, done=True)  # ...and the last one is always shown
    lines = table.render(trials).splitlines()
    assert len(lines) == 3 + len(trials) and max(map(len, lines)) <= 100
    assert lines[1].split() == ["trial", "size", "hidden_size", "keep_ratio", "status", "iter", "stage", "val", "%",
                                "MACs", "%"]
    assert lines[3].split() == ["0bc42b7e", "4", "16", "0.4695", "TERMINATED", "5", "done", "95.1", "46.8"]


def _quickstart_rows() -> list[dict]:
    rows = []
    for trial in _quickstart_trials()[:2]:
        last = trial.last_result
        rows.append({"trial": trial.trial_id, "prompt.kind": "pad", **trial.config, "macs_ratio": last["macs_ratio"],
                     "val_accuracy": last["val_accuracy"], "test_accuracy": 0.95265, "status": "done",
                     "dense_val_accuracy": 0.9722, "mlflow_run_id": "aac4e9341e824e71b32c52891f508ca8",
                     "node_id": "73482682ae196ca3fe9364776a21d52a8de90ce6d5ba6642a67c4981"})
    return rows


def test_results_table_starts_with_the_dense_reference_and_fits_100_columns() -> None:
    from passray._tune_report import dense_row, pareto_front, results_table

    rows = _quickstart_rows()
    dense = dense_row({"val_accuracy": 0.97222, "test_accuracy": 0.96936, "wall_seconds": 52.1}, rows)
    assert dense == {"trial": "dense", "macs_ratio": 1.0, "val_accuracy": 0.97222, "test_accuracy": 0.96936,
                     "status": "reference"}
    for shown in (rows, pareto_front(rows)):
        table = results_table(shown, QUICKSTART_KEYS, dense)
        lines = table.splitlines()
        assert max(map(len, lines)) <= 100, table
        assert lines[2].split() == ["dense", "-", "-", "-", "100.0", "97.2", "96.9", "reference"]
        assert len(lines) == 3 + len(shown)
    # a backbone given by model.weights: no dense training here, the trials measured it
    assert dense_row(None, rows)["val_accuracy"] == 0.9722 and dense_row(None, rows)["test_accuracy"] is None
    assert dense_row(None, [{**r, "dense_val_accuracy": None} for r in rows]) is None


def test_results_json_and_pareto_plot_carry_the_dense_reference(tmp_path: Path) -> None:
    from passray._tune_report import dense_row, pareto_figure, pareto_front, write_results

    rows = _quickstart_rows()
    front, dense = pareto_front(rows), dense_row({"val_accuracy": 0.97222, "test_accuracy": 0.96936}, rows)
    write_results(tmp_path, rows, front, dense, QUICKSTART_KEYS, "quickstart")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["dense"] == dense and saved["trials"] == rows  # every field stays in the JSON
    assert (tmp_path / "pareto.png").stat().st_size > 0 and "dense" in (tmp_path / "results.txt").read_text()
    ax = pareto_figure(rows, front, dense, "quickstart: 2 trials").axes[0]
    assert ax.get_title() == "quickstart: 2 trials"
    assert "%" in ax.get_xlabel() and "%" in ax.get_ylabel()
    assert sorted(t.get_text() for t in ax.texts) == sorted(r["trial"] for r in rows)
    dense_lines = [line for line in ax.lines if line.get_label().startswith("dense")]
    assert len(dense_lines) == 1 and dense_lines[0].get_ydata()[0] == pytest.approx(97.222)
    dots, rings = ax.collections
    front_line = next(line for line in ax.lines if line.get_label() == "Pareto front")
    assert dots.get_zorder() > front_line.get_zorder()  # the front is drawn under the trial dots
    assert len(rings.get_offsets()) == len(front) and len(rings.get_facecolors()) == 0  # rings: the dots show through
    assert len(rings.get_edgecolors()) > 0


def _mlflow_runs(uri: str, experiment: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """cluster/local.sh: Ray head + second node + mlflow server, on non-default ports (outside Ray's worker port range 10002-19999)."""
    state = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "PASSRAY_LOCAL_DIR": str(state), "PASSRAY_RAY_PORT": "26379", "PASSRAY_DASHBOARD_PORT": "28265",
           "PASSRAY_MLFLOW_PORT": "25000", "PASSRAY_RAY_CLIENT_PORT": "30001", "PASSRAY_AGENT_PORT": "52465",
           "PASSRAY_RAY_TMPDIR": "/tmp/prt-26379", "PASSRAY_HEAD_CPUS": "2", "PASSRAY_NODE2_CPUS": "2", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    try:
        up = subprocess.run(["bash", str(REPO / "cluster/local.sh"), "up"], env=env, capture_output=True, text=True,
                            timeout=300)
        assert up.returncode == 0, up.stderr[-2000:]
        exports = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines()
                       if line.startswith("export "))
        yield {**env, **exports}
    finally:
        subprocess.run(["bash", str(REPO / "cluster/local.sh"), "down"], env=env, capture_output=True, timeout=300)


@pytest.mark.ray
@pytest.mark.mlflow_server
@pytest.mark.slow
def test_ray_job_submit_runs_trials_on_both_nodes(local_cluster: dict, tmp_path: Path) -> None:
    env = local_cluster
    uri = env["MLFLOW_TRACKING_URI"]
    path = _write(tmp_path, tune__num_samples=4, tune__max_concurrent_trials=4, tracking__uri=uri,
                  tracking__experiment="job-submit")
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", env["RAY_API_SERVER_ADDRESS"], "--working-dir", str(REPO),
         "--", "python", "-m", "passray.tune", "--config", str(path)],
        env=env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0 and "succeeded" in job.stdout, (job.stdout[-3000:], job.stderr[-2000:])
    console = job.stdout + job.stderr
    assert console.count("\n") < CONSOLE_LINES_4_TRIALS, console  # the live table, not a config dump per trial
    assert "tensorboard" not in console.lower() and "base/" not in console
    exp = tmp_path / "ray_results" / "tiny"
    results = json.loads((exp / "results.json").read_text())
    trials = results["trials"]
    assert len(trials) == 4 and all(t["status"] == "done" for t in trials)
    assert len({t["node_id"] for t in trials}) == 2, "trials did not use both nodes"
    folders = dict(p.name.split("_", 1) for p in exp.iterdir() if p.is_dir())  # trial id -> sampled values
    for t in trials:  # the sampled values, not the base config's
        sampled = {f"size={t['prompt.size']}", f"keep_ratio={t['budget.keep_ratio']:.4g}"}
        assert set(folders[t["trial"]].split(",")) == sampled
    dense = results["dense"]  # the driver's dense training; the trials re-measured it (a sample may flip)
    assert dense["macs_ratio"] == 1.0
    assert dense["val_accuracy"] == pytest.approx(trials[0]["dense_val_accuracy"], abs=0.02)
    runs = _mlflow_runs(uri, "job-submit")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 4
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"val_accuracy", "macs_ratio", "test_accuracy"} <= set(child.data.metrics)
        assert len(client.get_metric_history(child.info.run_id, "val_accuracy")) >= 2  # per epoch
        logged = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert any("export" in p for p in logged) and "config.yaml" in logged, logged
    parent_artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"pareto.png", "results.json"} <= parent_artifacts


@pytest.mark.ray
@pytest.mark.slow
def test_failed_job_reports_failure_and_cluster_stays_clean(local_cluster: dict, tmp_path: Path) -> None:
    env = local_cluster
    path = _write(tmp_path, data__root=str(tmp_path / "missing"), data__name="imagefolder", tracking__uri=env["MLFLOW_TRACKING_URI"])
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", env["RAY_API_SERVER_ADDRESS"], "--working-dir", str(REPO),
         "--", "python", "-m", "passray.tune", "--config", str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode != 0
    assert "missing" in job.stdout + job.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_resume_finishes_without_rerunning_finished_trials(tmp_path: Path) -> None:
    path = _write(tmp_path, tune__num_samples=3, tune__max_concurrent_trials=1, tune__objective="single",
                  tune__grace_period=1000, finetune__epochs=2)  # ASHA may not stop a trial: every one must end "done"
    exp = tmp_path / "ray_results" / "tiny"
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_ADDRESS": "local"}  # a fresh Ray, never another one
    proc = subprocess.Popen([sys.executable, "-m", "passray.tune", "--config", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        finished: list[Path] = []
        while time.time() < deadline and not finished:
            time.sleep(2)
            finished = [p for p in exp.glob("*/result.json") if '"stage": "done"' in p.read_text()]
        assert finished, "no trial finished before the deadline"
        time.sleep(3)  # let Tune write its experiment state
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = finished[0]
    done_lines_before = first.read_text().count('"stage": "done"')
    resumed = subprocess.run([sys.executable, "-m", "passray.tune", "--config", str(path), "--resume", "ray_results/tiny"],
                             env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)  # relative, as README shows
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert first.read_text().count('"stage": "done"') == done_lines_before  # not re-run
    rows = json.loads((exp / "results.json").read_text())["trials"]
    assert len(rows) == 3 and all(r["status"] == "done" for r in rows), [r["status"] for r in rows]


@pytest.mark.ray
@pytest.mark.slow
def test_trials_as_ray_train_trainers_log_every_epoch(tmp_path: Path) -> None:
    """train.num_workers >= 1: each trial is a TorchTrainer; rank 0 logs each epoch to the trial's run."""
    import mlflow

    path = _write(tmp_path, tune__num_samples=1, train__num_workers=1, train__cpus_per_worker=1)
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.run([sys.executable, "-m", "passray.tune", "--config", str(path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("\n") < CONSOLE_LINES_4_TRIALS / 2, proc.stdout  # 1 trial
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    child = [r for r in _mlflow_runs(uri, "tiny") if "mlflow.parentRunId" in r.data.tags]
    assert len(child) == 1 and child[0].info.status == "FINISHED"
    history = client.get_metric_history(child[0].info.run_id, "val_accuracy")
    assert len(history) >= 3  # search, finetune, done
    assert any(a.path == "export" for a in client.list_artifacts(child[0].info.run_id))


def test_shared_dense_training_runs_on_a_gpu_worker_when_trials_use_gpus(tmp_path: Path) -> None:
    """A GPU cluster's head node often has no GPU: the dense training must not run there.

    Ray schedules by logical resources, so a local Ray with one declared GPU shows where
    the task lands (torch still sees no CUDA here and trains on the CPU)."""
    import ray

    from passray.config import load_config
    from passray.tune import pretrain_on_cluster

    cfg = load_config(str(_write(tmp_path)), ["train.use_gpu=true", "train.cpus_per_worker=1"])
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        out = pretrain_on_cluster(cfg, tmp_path / "backbone.safetensors")
    finally:
        ray.shutdown()
    assert out["gpus"] == ["0"] and out["node"]
    assert (tmp_path / "backbone.safetensors").is_file() and 0.0 <= out["test_accuracy"] <= 1.0
