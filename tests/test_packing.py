"""Trial packing (``train.gpus_per_worker``) on a real local Ray that declares 2 logical GPUs.

Ray schedules by logical resources, so a CPU-only machine shows what a GPU cluster would do:
which share of which GPU each trial gets, and how many trials the driver lets run at once.
Torch sees no CUDA here (a trial given a GPU runs on the CPU), so which torch device a trial
takes is checked on ``CUDA_VISIBLE_DEVICES`` values.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from passray.config import Config, ConfigError, validate

pytestmark = pytest.mark.ray

GPUS, CPUS = 2, 8  # logical: Ray only counts them


@pytest.fixture(scope="module")
def ray_gpus():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=CPUS, num_gpus=GPUS, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _cfg(tmp_path: Path, **train: Any) -> Config:
    return validate({"train": {"use_gpu": True, "storage_path": str(tmp_path / "ray_results"), **train},
                     "tune": {"cpus_per_trial": 0.5}})


@pytest.mark.parametrize("per_gpu", [1, 2, 4])
def test_driver_runs_as_many_trials_as_the_gpus_hold(ray_gpus, tmp_path: Path, per_gpu: int) -> None:
    from passray.tune import concurrent_trials, trial_resources

    cfg = _cfg(tmp_path, gpus_per_worker=1 / per_gpu)
    assert trial_resources(cfg) == [{"CPU": 0.5, "GPU": pytest.approx(1 / per_gpu)}]
    assert concurrent_trials(cfg) == GPUS * per_gpu
    assert concurrent_trials(cfg.derive({"tune.max_concurrent_trials": 3})) == 3  # the user's word wins


def test_cpus_bound_concurrency_too(ray_gpus, tmp_path: Path) -> None:
    from passray.train import build_trainer
    from passray.tune import concurrent_trials, trial_resources

    assert concurrent_trials(_cfg(tmp_path, gpus_per_worker=0.25).derive({"tune.cpus_per_trial": 3})) == CPUS // 3
    # a Ray Train trial: its own process (0.5 CPU) and one worker on a quarter GPU
    trainer_trial = _cfg(tmp_path, num_workers=1, cpus_per_worker=1, gpus_per_worker=0.25)
    assert trial_resources(trainer_trial) == [{"CPU": 0.5}, {"CPU": 1.0, "GPU": 0.25}]
    assert concurrent_trials(trainer_trial) == int(CPUS / 1.5)  # 5 by CPUs, 8 by GPUs
    scaling = build_trainer(trainer_trial).scaling_config
    assert scaling.use_gpu and scaling.num_gpus_per_worker == 0.25 and scaling.num_cpus_per_worker == 1.0
    assert trial_resources(_cfg(tmp_path, num_workers=1)) == [{"CPU": 0.5}, {"CPU": 1.0, "GPU": 1.0}]  # no share: whole


def _settled_fixed_size(ray) -> None:
    """Wait (at most 30 s) until the cluster's autoscaler status says it cannot grow: the refusal is
    withheld while a status reads otherwise, and a busy machine's monitor reports late."""
    import time

    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    from passray.train import _cluster_may_grow

    deadline = time.monotonic() + 30
    while _cluster_may_grow():
        status = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        assert time.monotonic() < deadline, f"a local ray.init cluster still reads as growable: {status!r}"[:500]
        time.sleep(0.5)


def test_trial_the_cluster_cannot_hold_is_refused_naming_the_key(ray_gpus, tmp_path: Path) -> None:
    from passray.tune import check_trial_fits

    _settled_fixed_size(ray_gpus)
    check_trial_fits(_cfg(tmp_path, gpus_per_worker=0.25))
    for cfg, key in ((_cfg(tmp_path, gpus_per_worker=0.25).derive({"tune.cpus_per_trial": CPUS + 1}),
                      "tune.cpus_per_trial"),
                     (_cfg(tmp_path, num_workers=GPUS + 1), "train.num_workers")):
        with pytest.raises(ConfigError, match=f"config key '{key}'") as err:
            check_trial_fits(cfg)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("train,needle", [
    ({"gpus_per_worker": 0.5}, "needs train.use_gpu: true"),
    ({"use_gpu": True, "gpus_per_worker": 0.5, "num_workers": 2}, "NCCL refuses two ranks on one GPU"),
    ({"use_gpu": True, "gpus_per_worker": 2}, "less than or equal to 1"),
])
def test_unusable_gpu_shares_are_refused(train: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match="config key 'train.gpus_per_worker'") as err:
        validate({"train": train})
    assert needle in str(err.value)


@pytest.mark.parametrize("gpu_id,visible,index", [("3", "", 3), ("3", "3", 0), ("3", "2,3", 1), ("0", "1,0", 1)])
def test_a_trial_uses_the_gpu_ray_assigned_not_the_hosts_first(gpu_id: str, visible: str, index: int) -> None:
    from passray.train import _cuda_index

    assert _cuda_index(gpu_id, visible) == index
    with pytest.raises(RuntimeError, match="hides it"):
        _cuda_index("3", "0,1")


def _recorder(barrier: Path, trials: int):
    """A trial that reports what Ray gave it once every trial has started (so they all ran at once).
    Made here so that cloudpickle ships it by value (trial processes cannot import this module)."""

    def record(config: dict) -> None:
        import ray
        from ray import tune

        (barrier / tune.get_context().get_trial_id()).touch()
        deadline = time.monotonic() + 120
        while len(list(barrier.iterdir())) < trials:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(list(barrier.iterdir()))} of {trials} trials ever ran at once")
            time.sleep(0.1)
        assigned = ray.get_runtime_context().get_assigned_resources()
        tune.report({"gpu_ids": json.dumps([str(g) for g in ray.get_gpu_ids()]), "gpu": assigned.get("GPU", 0.0),
                     "cpu": assigned.get("CPU", 0.0), "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "")})

    return record


def test_gpu_shares_reach_the_trials_and_pack_them(ray_gpus, tmp_path: Path) -> None:
    """Two trials per GPU: four trials run at once, two on each logical GPU, each holding half of it."""
    from ray import tune

    from passray.tune import concurrent_trials, trainable

    cfg = _cfg(tmp_path, gpus_per_worker=0.5)
    trials = concurrent_trials(cfg)
    barrier = tmp_path / "started"
    barrier.mkdir()
    tuner = tune.Tuner(trainable(cfg, _recorder(barrier, trials)), param_space={"x": tune.grid_search(list(range(trials)))},
                       tune_config=tune.TuneConfig(max_concurrent_trials=trials),
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0))
    results = tuner.fit()
    assert not results.errors, results.errors
    rows = [r.metrics for r in results]
    assert len(rows) == trials == 4
    assert all(r["gpu"] == 0.5 and r["cpu"] == 0.5 for r in rows)
    gpus = [json.loads(r["gpu_ids"]) for r in rows]
    assert all(len(g) == 1 for g in gpus)
    assert sorted(g[0] for g in gpus) == ["0", "0", "1", "1"]  # two trials on each GPU, at the same time
    assert all(r["visible"] == g[0] for r, g in zip(rows, gpus))  # Ray narrowed each trial to its GPU: cuda:0
