"""passray.tune: search-space errors before Ray starts, the console and the results a person
reads, and trials as Ray Train trainers (`ray job submit` on a two-node cluster: test_cluster.py;
an interrupted experiment's --resume: test_faults.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from passray.config import ConfigError

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
def ray_with_a_gpu():
    """One local Ray for the Ray tests below (a start costs seconds): 2 CPUs and one declared GPU (Ray
    schedules by logical resources; torch still sees no CUDA and trains on the CPU). The tests above
    check that Ray is not running, so these come last."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_trials_as_ray_train_trainers_log_every_epoch(ray_with_a_gpu, tmp_path: Path) -> None:
    """train.num_workers >= 1: each trial is a TorchTrainer; rank 0 logs each epoch to the trial's run.
    The CLI joins the running cluster through RAY_ADDRESS, as on a real one."""
    import mlflow

    path = _write(tmp_path, tune__num_samples=1, train__num_workers=1, train__cpus_per_worker=1)
    env = {**os.environ, "RAY_ADDRESS": ray_with_a_gpu.get_runtime_context().gcs_address}
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


@pytest.mark.ray
def test_shared_dense_training_runs_on_a_gpu_worker_when_trials_use_gpus(ray_with_a_gpu, tmp_path: Path) -> None:
    """A GPU cluster's head node often has no GPU: the dense training must not run there.

    The declared GPU shows where the task lands (torch still sees no CUDA here and trains on the CPU)."""
    from passray.config import load_config
    from passray.tune import pretrain_on_cluster

    cfg = load_config(str(_write(tmp_path)), ["train.use_gpu=true", "train.cpus_per_worker=1"])
    out = pretrain_on_cluster(cfg, tmp_path / "backbone.safetensors")
    assert out["gpus"] == ["0"] and out["node"]
    assert (tmp_path / "backbone.safetensors").is_file() and 0.0 <= out["test_accuracy"] <= 1.0
