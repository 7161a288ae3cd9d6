"""The benchmark scripts' smoke modes, as a user runs them: subprocesses on the CPU.

Each script runs twice on the same results file: the first run writes every row, the
second must find them all and run none (resumability is what lets the GPU benchmark
span several 10-minute commands).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

from _common import ResultsFile, TimeBudget, estimate, mean_std  # noqa: E402
from _mps import mps_daemon  # noqa: E402
from conftest import Together  # noqa: E402

QUALITY_FIELDS = ("setting", "arch", "row", "budget_kind", "finetune_epochs", "method", "allocation", "prompt",
                  "recurrent", "target", "seed", "head_epochs",
                  "macs_ratio", "params_ratio", "test_before_ft", "val_before_ft", "test_after_ft1",
                  "test_after_ft_final", "val_after_ft_final", "initial_masked_val_accuracy", "search_seconds",
                  "finetune_seconds_per_epoch", "wall_seconds", "kept_per_group", "config")
SPEED_FIELDS = ("part", "net", "device", "batch", "dtype", "images_per_s", "ms_per_step", "macs_ratio", "seconds")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return _run_together([script, *args])[0]


def _smoke(*invocations: list[str]) -> Together:
    """Each ``[script, *args]`` in smoke mode, all started at once."""
    return Together(*([sys.executable, str(BENCH / script), "--smoke", *args] for script, *args in invocations),
                    cwd=REPO)


def _succeeded(invocations: tuple[list[str], ...], runs: Together) -> list[subprocess.CompletedProcess]:
    procs = runs.wait(timeout=300)
    for (script, *_), proc in zip(invocations, procs):
        assert proc.returncode == 0, \
            f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return procs


def _run_together(*invocations: list[str]) -> list[subprocess.CompletedProcess]:
    """Each ``[script, *args]`` in smoke mode, all started at once; each must succeed."""
    return _succeeded(invocations, _smoke(*invocations))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """quality.py, speed.py and transfer.py, each run twice on its results file: the first runs side by
    side, then side by side the runs that must resume them (quality's without its checkpoints, beside
    --remeasure-speedup on a copy of its results). A smoke run mostly keeps one core busy, so three at
    once take about the time of the longest. What the tests read of a run is read before the next starts."""
    root = tmp_path_factory.mktemp("smoke")
    out = {name: {"results": root / name / f"{name}.json"} for name in ("quality", "speed", "transfer")}
    for runs in out.values():
        runs["results"].parent.mkdir()
    firsts = _run_together(*([f"{name}.py", "--results", str(runs["results"])] for name, runs in out.items()))
    for runs, first in zip(out.values(), firsts):
        runs.update(first=first, data=json.loads(runs["results"].read_text()))
    quality, transfer = out["quality"], out["transfer"]
    for runs in (quality, transfer):
        runs["summary"] = runs["results"].with_suffix(".md").read_text()
    quality["png_bytes"] = quality["results"].with_suffix(".png").stat().st_size
    transfer["hypernet_saved"] = (root / "transfer" / "work" / "transfer-source-seed0-keep0.5" / "hypernet" /
                                  "model.safetensors").is_file()

    # --remeasure-speedup re-times a latency row alone, from its kept widths (here a MACs row made one)
    timed = json.loads(json.dumps(quality["data"]))
    timed["rows"][0].update(budget_kind="latency", speedup_measured=99.0)
    timed["rows"][0]["config"]["budget"]["latency_batch_size"] = 4
    quality["timed"] = root / "quality" / "timed.json"
    quality["timed"].write_text(json.dumps(timed))
    # A fresh GPU machine has lost the checkpoints: the backbone is re-trained, must come out
    # bit-identical (sha256 checked against the rows), and only the new row runs.
    shutil.rmtree(root / "quality" / "work")
    seconds = _run_together(["quality.py", "--remeasure-speedup", str(quality["timed"])],
                            ["quality.py", "--results", str(quality["results"]), "--setting", "all", "--methods", "pass",
                             "uniform_l1", "uniform_random"],
                            *([f"{name}.py", "--results", str(out[name]["results"])] for name in ("speed", "transfer")))
    for runs, second in zip(out.values(), seconds[1:]):
        runs.update(second=second, again=json.loads(runs["results"].read_text()))
    quality["timed_row"] = json.loads(quality["timed"].read_text())["rows"][0]
    return out


def test_quality_smoke_writes_rows_and_resumes(smoke: dict[str, dict[str, Any]]) -> None:
    quality = smoke["quality"]
    first, data = quality["first"], quality["data"]
    keys = {(r["setting"], r["row"], r["target"], r["seed"]) for r in data["rows"]}
    assert keys == {(s, r, 0.5, 0) for s in ("all", "shifted") for r in ("pass", "uniform_l1")}, first.stdout
    for row in data["rows"]:
        missing = [f for f in QUALITY_FIELDS if f not in row]
        assert not missing, f"row {row['setting']}/{row['row']} lacks {missing}"
        assert 0.3 < row["macs_ratio"] <= 0.5 + 1e-9
        for f in ("test_before_ft", "test_after_ft1", "test_after_ft_final", "val_before_ft"):
            assert 0.0 <= row[f] <= 1.0
        assert row["test_after_ft1"] == row["test_after_ft_final"]  # one fine-tune epoch in smoke mode
        assert row["equivalence_max_abs_diff"] < 1e-3
        assert row["config"]["model"]["weights"] == data["backbones"][f"{row['setting']}/convnet"]["path"]
        is_pass = row["method"] == "pass"
        assert (row["initial_masked_val_accuracy"] is not None) == is_pass
        # baselines get head training equal to PASS's search epochs only where the head is new
        assert row["head_epochs"] == (0 if is_pass else 1)  # baselines: the head epochs PASS's search gives its head
    assert data["backbones"]["shifted/convnet"]["classes"] == [0, 1, 2, 3, 4]
    assert data["backbones"]["shifted/convnet"]["head_removed"] is True
    assert {"command", "environment", "protocol", "summary"} <= set(data)
    assert "--smoke" in data["command"] and data["environment"]["torch"]
    assert len(data["summary"]) == 4 and all(s["test_after_ft_final"]["n"] == 1 for s in data["summary"])
    assert quality["summary"].count("| all | convnet |") == 2
    assert quality["png_bytes"] > 0

    row = quality["timed_row"]  # re-timed by --remeasure-speedup
    assert row["speedup_measured_in_run"] == 99.0 and 0 < row["speedup_measured"] < 99.0
    assert row["latency_pruned_ms"] > 0 and "alone" in row["speedup_timing"]

    second, again = quality["second"], quality["again"]  # resumed without the checkpoints
    assert "2 of 3 rows already" in second.stdout and "pretraining the 'all' backbone" in second.stdout
    assert again["rows"][:4] == data["rows"]
    assert [(r["setting"], r["row"]) for r in again["rows"][4:]] == [("all", "uniform_random")]
    assert again["rows"][4]["backbone_sha256"] == data["backbones"]["all/convnet"]["sha256"]
    assert len(again["invocations"]) == 2


def test_speed_smoke_writes_rows_and_resumes(smoke: dict[str, dict[str, Any]]) -> None:
    data = smoke["speed"]["data"]
    keys = {(r["part"], r["net"]) for r in data["rows"]}
    nets = {"dense", "uniform_l1@0.5", "global_l2@0.5"}
    assert keys == ({("train", n) for n in nets} | {("search", "pass@0.5")} | {("infer", n) for n in nets})
    assert len(data["rows"]) == 10  # infer at batch 16 and batch 1
    for row in data["rows"]:
        assert not [f for f in SPEED_FIELDS if f not in row]
        assert row["images_per_s"] > 0 and row["device"] == "cpu"
        if row["net"] != "dense" and row["part"] != "search":
            assert 0.3 < row["macs_ratio"] <= 0.5 + 1e-9
    search = data["derived"]["search"]
    assert len(search) == 1 and search[0]["search_epoch_in_finetune_epochs_uniform_l1"] > 0
    assert {"command", "environment", "protocol"} <= set(data)

    assert "10 of 10 measurements already" in smoke["speed"]["second"].stdout
    assert smoke["speed"]["again"]["rows"] == data["rows"]


def test_results_file_refuses_another_protocol(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    results = ResultsFile(path, "quality", ["a"], {"epochs": 1})
    results.add({"a": 1, "seconds": 10.0})
    assert ResultsFile(path, "quality", ["a"], {"epochs": 1}).has((1,))
    with pytest.raises(ValueError, match="another protocol"):
        ResultsFile(path, "quality", ["a"], {"epochs": 2})
    with pytest.raises(ValueError, match="not 'speed'"):
        ResultsFile(path, "speed", ["a"])


def test_time_budget_and_estimates() -> None:
    rows = [{"kind": "x", "seconds": 10.0}, {"kind": "x", "seconds": 20.0}, {"kind": "y", "seconds": 1.0}]
    guess = estimate(rows, "seconds", [lambda r: r["kind"] == "z", lambda r: r["kind"] == "x"], margin=1.0, extra=0.0)
    assert guess == 20.0
    assert estimate(rows, "seconds", [lambda r: False]) is None
    budget = TimeBudget(30.0)
    assert budget.allows(None) and budget.allows(20.0) and not budget.allows(40.0)
    assert TimeBudget(None).allows(1e9)
    assert mean_std([0.5, 0.7, None]) == (pytest.approx(0.6), pytest.approx(0.1414, abs=1e-4), 2)


def test_results_file_keeps_every_writers_rows(tmp_path: Path) -> None:
    """Two processes sharing one file (one per setting on one GPU): neither loses the other's rows."""
    path = tmp_path / "r.json"
    first, second = (ResultsFile(path, "quality", ["a"], {"epochs": 1}) for _ in range(2))
    first.add({"a": 1})
    second.add({"a": 2})
    first.data.setdefault("backbones", {})["all"] = {"sha256": "x"}
    first.add({"a": 3})
    second.data.setdefault("backbones", {})["shifted"] = {"sha256": "y"}
    second.save()
    data = json.loads(path.read_text())
    assert [r["a"] for r in data["rows"]] == [1, 2, 3]
    assert set(data["backbones"]) == {"all", "shifted"}


def test_transfer_smoke_runs_every_mode_and_resumes(smoke: dict[str, dict[str, Any]]) -> None:
    transfer = smoke["transfer"]
    rows = {r["mode"]: r for r in transfer["data"]["rows"]}
    assert list(rows) == ["source", "fresh", "warm-start", "zero-shot", "mask"]
    assert rows["source"]["classes"] == [0, 1, 2, 3, 4] and rows["fresh"]["classes"] == [5, 6, 7, 8, 9]
    for row in rows.values():
        assert 0.3 < row["macs_ratio"] <= 0.5 + 1e-9 and 0.0 <= row["test_after_ft_final"] <= 1.0
    assert not rows["zero-shot"]["hypernet_trained"] and rows["warm-start"]["hypernet_trained"]
    assert transfer["hypernet_saved"]  # work/transfer-source-seed0-keep0.5/hypernet/model.safetensors
    assert rows["mask"]["macs_ratio"] == pytest.approx(rows["source"]["macs_ratio"])
    assert "| zero-shot |" in transfer["summary"]
    assert "5 of 5 rows done" in transfer["second"].stdout


def _scaling(root: Path) -> tuple[list[str], ...]:
    results = str(root / "scaling.json")
    return ["tune_scaling.py", "--results", results], ["train_scaling.py", "--gpus", "2", "--results", results]


@dataclass(frozen=True)
class Started:
    root: Path
    runs: Together

    def stop(self) -> None:
        self.runs.stop()


def start_scaling(root: Path) -> Started:
    """The scaling smoke's two runs, started with the session (conftest's ``start_early``): ~70 s of Ray
    processes, in the core the first in-process tests leave idle."""
    return Started(root, _smoke(*_scaling(root)))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.start_early("start_scaling")
def test_scaling_smoke_writes_tune_and_ddp_rows_and_resumes(started_early: Started) -> None:
    """tune_scaling.py (trials packed on 1 logical GPU) and train_scaling.py --gpus (CPU workers) share one file,
    written by both at once (it merges under a lock; together they take ~50 s on 2 cores, one after the other ~70 s)."""
    tmp_path = started_early.root
    results = tmp_path / "scaling.json"
    _succeeded(_scaling(tmp_path), started_early.runs)
    data = json.loads(results.read_text())
    tune = sorted((r for r in data["rows"] if r["part"] == "tune"), key=lambda r: r["trials_per_gpu"])
    assert [r["trials_per_gpu"] for r in tune] == [1, 2]
    for row in tune:
        assert row["gpus"] == 1 and row["trials"] == 2 and row["failed_trials"] == 0
        assert row["concurrent_trials"] == row["trials_per_gpu"]  # derived by passray.tune from the GPU share
        assert row["trials_per_hour"] > 0 and 0.0 <= row["best_val_accuracy"] <= 1.0
        assert "--smoke" in row["command"] and row["device"].startswith("cpu")
        assert row["config_used"]["train"]["gpus_per_worker"] == pytest.approx(1 / row["trials_per_gpu"])
        # the timeline from the trials' MLflow runs: inside the search's wall time, each trial within its own run
        assert len(row["trial_seconds"]) == 2 and row["seconds_before_first_trial"] > 0
        assert row["seconds_before_first_trial"] + max(row["trial_seconds"]) <= row["wall_seconds"]
        assert all(t >= w for t, w in zip(sorted(row["trial_seconds"]), sorted(row["trial_wall_seconds"])))
    # packing changes when trials run, not what they compute (same seeds and sampled values)
    assert sorted(tune[0]["val_accuracies"]) == pytest.approx(sorted(tune[1]["val_accuracies"]))
    # one at a time, the second trial ran in the first one's process (tune.reuse_actors, the default)
    results_k1 = list((tmp_path / "work" / "ray_results" / "scaling-k1-w0").glob("*/result.json"))
    pids = {json.loads(line)["pid"] for result in results_k1 for line in result.read_text().splitlines() if line.strip()}
    assert len(results_k1) == 2 and len(pids) == 1, pids
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")  # each reused trial: its own run
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    [parent] = [r for r in runs if r.info.run_name == "scaling-k1-w0"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]
    ddp = sorted((r for r in data["rows"] if r["part"] == "ddp"), key=lambda r: r["gpus"])
    assert [r["gpus"] for r in ddp] == [1, 2] and all(r["global_batch"] == 16 for r in ddp)
    for row in ddp:
        assert row["search_images_per_second"] > 0 and 0.0 <= row["test_accuracy"] <= 1.0 and row["wall_seconds"] > 0
    summary = results.with_suffix(".md").read_text()
    assert summary.count("(smoke) | cpu") == 4 and "trials/h" in summary and "search img/s" in summary
    again = _run("tune_scaling.py", "--results", str(results))
    assert "2 of 2 rows already" in again.stdout
    assert json.loads(results.read_text())["rows"] == data["rows"]


def test_mps_without_its_control_binary_is_one_line_and_leaves_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-cuda-mps-control here
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    with pytest.raises(RuntimeError, match="nvidia-cuda-mps-control is not on PATH"):
        with mps_daemon():
            pass
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
