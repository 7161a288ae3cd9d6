"""Ray Train layer (passray.train) on a real local Ray cluster, gloo on CPU.

Each test runs tiny jobs (convnet width 0.25 on 16x16 synthetic images, a handful of
steps); what dominates is Ray starting worker groups, so the file keeps the number of
``fit`` calls small. Evidence of what ran comes from the controller (a ``UserCallback``
that logs every report and worker exception to a file) and from the checkpoints, never
from timing.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import run_together
from safetensors.torch import load_file

from passray._state_io import load_state
from passray.config import Config, ConfigError, validate

pytestmark = pytest.mark.ray

POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # The controller polls workers for reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s);
    # passray waits for each checkpoint's commit, so a shorter poll makes tiny runs faster
    # (a fit of 4 checkpointed reports: ~13.5 s at 0.5 s, ~11 s at 0.1 s on 2 cores).
    saved = os.environ.get(POLL_ENV)
    os.environ[POLL_ENV] = "0.1"
    ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()
    if saved is None:
        os.environ.pop(POLL_ENV, None)
    else:
        os.environ[POLL_ENV] = saved


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _cfg(tmp_path: Path, **over: Any) -> Config:
    base = {
        "model": {"arch": "convnet", "width": 0.25},
        "data": {"name": "synthetic", "num_samples": 64, "image_size": 16, "batch_size": 8,
                 "eval_batch_size": 64, "augment": False, "limit_train": 32},
        "pretrain": {"epochs": 0}, "search": {"epochs": 1}, "finetune": {"epochs": 1},
        "bn_recalibration_batches": 2, "output_dir": str(tmp_path / "out"),
        "train": {"num_workers": 2, "cpus_per_worker": 1, "storage_path": str(tmp_path / "ray_results")},
    }
    return validate(_merge(base, over))


def _run_log(path: Path):
    """A controller-side callback appending every report (with the controller's report poll) / worker
    exception to ``path``.

    Defined inside a function so cloudpickle ships the class by value (the controller
    process cannot import this test module).
    """
    from ray.train import UserCallback

    class RunLog(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(json.dumps({"event": "report", "stage": metrics[0].get("stage"),
                                    "epoch": metrics[0].get("epoch"), "step": metrics[0].get("step"),
                                    "checkpoint": checkpoint is not None, "ranks": len(metrics),
                                    "poll": os.environ.get(POLL_ENV)}) + "\n")

        def after_exception(self, run_context, worker_exceptions):
            with open(path, "a") as f:
                f.write(json.dumps({"event": "exception", "ranks": sorted(worker_exceptions)}) + "\n")

    return RunLog()


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _reports(events: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(e["stage"], e["epoch"]) for e in events if e["event"] == "report"]


def _history(checkpoint: str) -> list[tuple[str, int]]:
    return [(h["stage"], h["epoch"]) for h in load_state(checkpoint)["meta"]["history"]]


# ---------------------------------------------------------------- without Ray running
def test_run_name_is_stable_and_ignores_how_it_runs(tmp_path):
    from passray.train import run_name, storage_uri

    a = _cfg(tmp_path)
    b = _cfg(tmp_path / "elsewhere", train={"num_workers": 1, "max_failures": 3})
    assert run_name(a) == run_name(b) == run_name(validate(a.to_dict()))
    assert run_name(a).startswith("passray-pass-convnet-")
    assert run_name(_cfg(tmp_path, budget={"keep_ratio": 0.25})) != run_name(a)
    assert run_name(_cfg(tmp_path, train={"name": "mine"})) == "mine"
    assert run_name(_cfg(tmp_path, pretrain={"cache": False})) == run_name(a)  # cached or trained: the same backbone
    assert storage_uri("rel/dir") == str((Path.cwd() / "rel/dir").resolve())
    assert storage_uri("s3://bucket/x") == "s3://bucket/x"


def test_scalar_metrics_keeps_what_ray_can_carry():
    import numpy as np

    from passray.tracking import scalar_metrics

    out = scalar_metrics({"stage": "search", "epoch": 1, "acc": torch.tensor(0.5), "n": np.int64(3),
                          "bad": float("nan"), "none": None, "vec": torch.zeros(2), "lat": {"ms": 1.5}})
    assert out == {"stage": "search", "epoch": 1, "acc": 0.5, "n": 3, "lat.ms": 1.5}
    assert all(type(v) in (str, int, float, bool) for v in out.values())


def test_core_does_not_import_ray(imported_after):
    assert "ray" not in imported_after["passray, passray.pipeline, passray.prune"]


def test_cli_help_and_bad_key_do_not_start_ray(tmp_path):
    helped, bad = run_together([sys.executable, "-m", "passray.train", "--help"],
                               [sys.executable, "-m", "passray.train", "--set", "train.nmu_workers=2"],
                               cwd=tmp_path, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert "train.num_workers" in helped.stdout and "--set" in helped.stdout
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.nmu_workers" in lines[0], bad.stderr
    assert "Ray" not in bad.stdout + bad.stderr  # failed before ray.init
    assert not (tmp_path / "ray_results").exists()


# ---------------------------------------------------------------- on a local Ray cluster
def test_two_workers_match_one_worker_with_double_batch(ray_cluster, tmp_path):
    """After ONE search step, 2 workers x batch b == 1 worker x batch 2b (hypernet, prompt, head).

    What makes it exact rather than lucky:
    - the train split is exactly 2b images and drop_last holds, so the search is one step
      and the union of the two ranks' batches (DistributedSampler gives rank r the
      indices r::2 of the same seeded permutation) is the single worker's batch; the mean
      loss and DDP's gradient average then agree up to float summation order;
    - ``hypernet.batch_norm: frozen``: train-mode BN statistics depend on the per-worker
      batch, and SyncBatchNorm is CUDA-only, so it cannot make gloo/CPU runs agree;
    - ``bn_recalibration_batches: 0``: recalibration reads each rank's own shard (and DDP
      then broadcasts rank 0's buffers), which would differ from one worker's statistics;
    - no augmentation (seeded per rank), no pretraining, the same seed, no dropout in the
      model; SGD, whose update is linear in the gradient (Adam's first step is ~lr*sign(g),
      which amplifies rounding wherever g is near zero);
    - ``finetune.epochs: 0`` and ``hypernet.keep: last``, so the exported prompt and head are
      the post-search values (``best`` could pick the initial ones);
    - ``hypernet.prior: l1``: a Taylor prior reads rank 0's first batches, which are half of
      one worker's batch (every rank then uses rank 0's prior, so ranks agree with each other).
    """
    b = 8
    common = dict(data={"batch_size": b, "limit_train": 2 * b},
                  hypernet={"batch_norm": "frozen", "keep": "last", "prior": "l1"},
                  search={"epochs": 1, "optimizer": "sgd", "lr": 0.5, "weight_decay": 0.0},
                  finetune={"epochs": 0}, bn_recalibration_batches=0)
    from passray.train import fit

    one = _cfg(tmp_path, **_merge(common, {"data": {"batch_size": 2 * b}, "train": {"num_workers": 1}}))
    two = _cfg(tmp_path, **_merge(common, {"train": {"num_workers": 2}}))
    with ThreadPoolExecutor(2) as pool:  # two independent runs (3 of the cluster's 4 CPUs): their start-ups overlap
        (m1, c1), (m2, c2) = pool.map(fit, (one, two), ("equiv-1", "equiv-2"))
    for ckpt in (c1, c2):
        assert [h for h in _history(ckpt) if h[0] == "search"] == [("search", 0)]

    h1, h2 = load_file(f"{c1}/hypernet/model.safetensors"), load_file(f"{c2}/hypernet/model.safetensors")
    assert h1.keys() == h2.keys()
    for key in h1:
        torch.testing.assert_close(h2[key], h1[key], atol=1e-5, rtol=0, msg=f"hypernet {key}")
    assert json.loads(Path(c1, "structure.json").read_text())["groups"] == \
        json.loads(Path(c2, "structure.json").read_text())["groups"]
    w1, w2 = load_file(f"{c1}/weights.safetensors"), load_file(f"{c2}/weights.safetensors")
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-5, rtol=0, msg=f"weights {key}")
    # The step really moved things (the prompt starts at zero), so 1e-5 is a real test;
    # without DDP syncing the hypernet, its mapper biases differed by ~1e-3 here.
    assert w1["prompt.values"].abs().max() > 1e-4
    # Not compared: val metrics. DistributedSampler pads an odd val split (13 images here)
    # to a multiple of the world size, so 2 workers score 14 samples, one of them twice.
    assert m1["stage"] == m2["stage"] == "done"


def test_worker_death_restarts_from_last_checkpoint(ray_cluster, tmp_path):
    """A real worker crash (os._exit) mid-epoch: Ray restarts the group from the last
    checkpoint; only the epoch that crashed is run again, no earlier one."""
    from passray.train import fit

    # 48 images / (2 workers x 8) = 3 steps per epoch: search e0 = steps 0-2, e1 = 3-5.
    cfg = _cfg(tmp_path, data={"limit_train": 48}, search={"epochs": 2}, finetune={"epochs": 1},
               train={"fail_at_step": 4, "max_failures": 1})
    log = tmp_path / "run.jsonl"
    metrics, ckpt = fit(cfg, name="fault", callbacks=[_run_log(log)])

    events = _events(log)
    kinds = [e["event"] for e in events]
    assert kinds.count("exception") >= 1, events  # the crash was seen by the controller
    first_crash = kinds.index("exception")
    assert _reports(events[:first_crash]) == [("search", 0)]  # died inside search epoch 1
    assert _reports(events) == [("search", 0), ("search", 1), ("finetune", 0), ("done", None)]
    # the restarted worker continues the report index (MLflow's step), it does not restart at 0
    assert [e["step"] for e in events if e["event"] == "report"] == [0, 1, 2, 3]
    assert all(e["ranks"] == 2 for e in events if e["event"] == "report")
    assert _history(ckpt) == [("search", 0), ("search", 1), ("finetune", 0)]
    assert metrics["stage"] == "done" and 0.0 <= metrics["val_accuracy"] <= 1.0
    assert Path(ckpt, "structure.json").is_file() and Path(ckpt, "hypernet", "model.safetensors").is_file()


def test_rerun_with_same_name_resumes(ray_cluster, tmp_path, capsys):
    """A run that dies (max_failures=0) is resumed by re-running the same (storage_path, name), also with
    other train.* settings (how it runs); the same name with another model is refused and leaves it alone."""
    from passray.train import copy_export, fit

    crash = _cfg(tmp_path, search={"epochs": 2}, finetune={"epochs": 1},
                 train={"name": "resume-me", "fail_at_step": 5, "max_failures": 0})  # 2 steps/epoch: fine-tune e0
    with pytest.raises(RuntimeError, match="resume-me"):
        fit(crash)
    snapshot = json.loads(Path(tmp_path, "ray_results", "resume-me", "checkpoint_manager_snapshot.json").read_text())
    assert snapshot["latest_checkpoint_result"]["metrics"]["stage"] == "search"

    log = tmp_path / "run.jsonl"
    again = _cfg(tmp_path, search={"epochs": 2}, finetune={"epochs": 1}, train={"name": "resume-me"})
    metrics, ckpt = fit(again, callbacks=[_run_log(log)])
    assert _reports(_events(log)) == [("finetune", 0), ("done", None)]  # search was not run again
    assert _history(ckpt) == [("search", 0), ("search", 1), ("finetune", 0)]
    assert metrics["stage"] == "done"

    out = copy_export(ckpt, tmp_path / "export")
    assert {p.name for p in out.iterdir()} == {"structure.json", "weights.safetensors", "hypernet"}

    # The CLI on the finished run (Ray already up, so it is reused): it resumes from the
    # final checkpoint, only re-evaluates, prints the table and writes output_dir.
    from passray.train import main

    config = tmp_path / "again.yaml"
    config.write_text(yaml.safe_dump(again.to_dict()))
    metrics2 = main(["--config", str(config)])
    printed = capsys.readouterr().out
    assert any(line.split()[:2] == ["method", "keep_ratio"] for line in printed.splitlines()), printed
    assert metrics2["val_accuracy"] == pytest.approx(metrics["val_accuracy"])
    out = Path(again.output_dir)
    assert {p.name for p in out.iterdir()} == {"structure.json", "weights.safetensors", "hypernet", "results.json"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["train"]["name"] == "resume-me" and saved["result"]["stage"] == "done"
    assert Path(saved["checkpoint"]).parent == Path(ckpt).parent  # same run directory
    assert _history(saved["checkpoint"]) == [("search", 0), ("search", 1), ("finetune", 0)]  # nothing re-trained

    # Without the refusal a second run loads the first one's checkpoint and dies in a worker with
    # state-dict tracebacks.
    snapshot = Path(tmp_path, "ray_results", "resume-me", "checkpoint_manager_snapshot.json")
    before = snapshot.read_text()
    other = _cfg(tmp_path, model={"width": 0.5}, search={"epochs": 2}, finetune={"epochs": 1},
                 train={"name": "resume-me"})
    with pytest.raises(ConfigError, match="config key 'model.width': Ray Train run 'resume-me' .* started with 0.25, "
                                          "not 0.5") as err:
        fit(other)
    assert "\n" not in str(err.value)
    assert snapshot.read_text() == before and Path(ckpt).is_dir()  # the finished run is untouched


@pytest.fixture(scope="module")
def dense_reuse_run(ray_cluster, session_caches, tmp_path_factory) -> dict[str, Any]:
    """One run of 2 workers whose dense backbone is in rank 0's cache, at the report poll ``fit`` sets
    itself (this module's cluster started at 0.1 s; the driver leaves it unset): the two tests below read it."""
    from passray import dense_cache
    from passray.models import create_backbone
    from passray.train import fit

    tmp_path = tmp_path_factory.mktemp("dense_reuse")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv(dense_cache.ENV, str(session_caches / "dense"))  # where this cluster's workers look
        monkeypatch.delenv(POLL_ENV)
        cfg = _cfg(tmp_path, pretrain={"epochs": 1}, finetune={"epochs": 0}, seed=7)
        key = dense_cache.dense_key(cfg, torch.device("cpu"), world_size=2)
        dense_cache.store(key, create_backbone(cfg.model, 10).state_dict(), {"val_accuracy": 0.1, "test_accuracy": 0.1})
        log = tmp_path / "run.jsonl"
        metrics, _ = fit(cfg, name="dense-reuse", callbacks=[_run_log(log)])
        return {"metrics": metrics, "events": _events(log), "driver_poll_after": os.environ.get(POLL_ENV)}


def test_workers_take_rank_0s_cached_dense_backbone(dense_reuse_run):
    """Rank 0 finds the dense backbone in its cache and broadcasts it: no rank pretrains, and the
    ranks stay in step (a rank training alone would hang the others at the next collective)."""
    metrics, events = dense_reuse_run["metrics"], dense_reuse_run["events"]
    assert metrics["dense_reused"] is True and metrics["stage"] == "done"
    assert _reports(events) == [("search", 0), ("done", None)]  # no pretrain epoch was reported
    assert all(e["ranks"] == 2 for e in events if e["event"] == "report")


def test_ray_train_collects_each_epochs_report_within_half_a_second(dense_reuse_run, monkeypatch):
    """Every epoch's checkpoint waits until the controller collects it: at Ray's default (every 2 s) a
    run of short epochs mostly waits. ``fit`` runs its controller at ``REPORT_POLL_S`` instead."""
    from passray.train import REPORT_POLL_S, _report_poll

    reports = [e for e in dense_reuse_run["events"] if e["event"] == "report"]
    assert [r["stage"] for r in reports] == ["search", "done"]
    assert {r["poll"] for r in reports} == {REPORT_POLL_S}
    assert dense_reuse_run["driver_poll_after"] is None  # the driver's environment is left as it was
    monkeypatch.setenv(POLL_ENV, "3")
    with _report_poll():
        assert os.environ[POLL_ENV] == "3"  # a value the user set is theirs
