"""passray.tune: search-space errors before Ray starts, `ray job submit` on a real two-node
local cluster with a real MLflow server, and --resume of an interrupted experiment."""

from __future__ import annotations

import json
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
    results = json.loads((tmp_path / "ray_results" / "tiny" / "results.json").read_text())
    trials = results["trials"]
    assert len(trials) == 4 and all(t["status"] == "done" for t in trials)
    assert len({t["node_id"] for t in trials}) == 2, "trials did not use both nodes"
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
            finished = [p for p in exp.glob("run_trial_*/result.json") if '"stage": "done"' in p.read_text()]
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
