"""passray.transfer: a hypernet searched on digits 0-4, registered, reused on digits 5-9."""

from __future__ import annotations

from pathlib import Path

import pytest

from passray.config import load_config
from passray.pipeline import Runtime, pretrain, run

COMMON = ["model.arch=convnet", "model.width=0.25", "data.limit_train=160", "data.batch_size=32",
          "bn_recalibration_batches=2", "search.epochs=1", "finetune.epochs=1", "hypernet.hidden_size=8"]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    from passray.registry import register_export

    root = tmp_path_factory.mktemp("transfer")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    weights = root / "backbone.safetensors"
    pretrain(load_config(None, COMMON + ["data.classes=[0,1,2,3,4]", "pretrain.epochs=2"]), weights, Runtime(progress=False))
    source = load_config(None, COMMON + ["data.classes=[0,1,2,3,4]", f"model.weights={weights}"])
    run(source, Runtime(export_dir=str(root / "export"), progress=False))
    info = register_export(root / "export", tracking_uri=uri, experiment="source")
    return {"uri": uri, "weights": weights, "root": root, "info": info}


def _target(registered, *extra: str):
    return load_config(None, COMMON + ["data.classes=[5,6,7,8,9]", f"model.weights={registered['weights']}",
                                       f"tracking.uri={registered['uri']}", "tracking.experiment=transfer",
                                       f"output_dir={registered['root'] / 'out'}", *extra])


def test_all_modes_run_and_log_lineage(registered) -> None:
    import mlflow

    from passray.transfer import MODES, transfer

    rows = transfer(_target(registered), "models:/passray-hypernet-convnet@champion", list(MODES))
    assert [r["mode"] for r in rows] == list(MODES)
    for row in rows:
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["macs_ratio"] <= 0.5 + 1e-9
    client = mlflow.MlflowClient(tracking_uri=registered["uri"])
    exp = client.get_experiment_by_name("transfer")
    runs = client.search_runs([exp.experiment_id])
    version = str(registered["info"]["hypernet"]["version"])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags["passray.transfer_mode"] for r in children) == sorted(MODES)
    assert all(r.data.tags["passray.source_version"] == version for r in runs)
    assert all(r.info.status == "FINISHED" for r in runs)


def test_zero_shot_keeps_the_hypernet_frozen(registered) -> None:
    import torch

    from passray.registry import load_registered_hypernet
    from passray.transfer import transfer

    before, _ = load_registered_hypernet("models:/passray-hypernet-convnet@champion", tracking_uri=registered["uri"])
    transfer(_target(registered, "finetune.epochs=0"), "models:/passray-hypernet-convnet@champion", ["zero-shot"])
    out = Path(registered["root"])  # the export of the run is logged; reload the hypernet it carries
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=registered["uri"])
    exp = client.get_experiment_by_name("transfer")
    latest = client.search_runs([exp.experiment_id], "tags.`passray.transfer_mode` = 'zero-shot'",
                                order_by=["attributes.start_time DESC"])[0]
    local = client.download_artifacts(latest.info.run_id, "export/hypernet", str(out / "zs"))
    from passray.hypernet import load_hypernet

    after, _ = load_hypernet(local)
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("override,source,needle", [
    (["model.width=0.5"], "models:/passray-hypernet-convnet@champion", "channel groups do not match"),  # mask mode
    ([], "models:/passray-hypernet-convnet@nonexistent", "no alias 'nonexistent'"),
    ([], "models:/passray-hypernet-nonexistent@champion", "unknown registered model"),
])
def test_incompatible_or_unknown_source_fails_before_training(registered, override, source, needle) -> None:
    import mlflow

    from passray.transfer import MODES, transfer

    client = mlflow.MlflowClient(tracking_uri=registered["uri"])
    before = client.get_experiment_by_name("transfer")
    count = len(client.search_runs([before.experiment_id])) if before else 0
    with pytest.raises(ValueError, match=needle):
        transfer(_target(registered, *override), source, list(MODES))
    after = client.get_experiment_by_name("transfer")
    assert (len(client.search_runs([after.experiment_id])) if after else 0) == count


def test_mode_setup_gives_mask_mode_the_search_head_epochs() -> None:
    from passray.transfer import mode_setup

    cfg = load_config(None, COMMON + ["search.epochs=3"])
    mask_cfg, runtime = mode_setup(cfg, "mask", structure={"groups": []})
    assert mask_cfg.head_epochs == 3 and runtime.structure == {"groups": []} and runtime.hypernet is None
    import torch

    zero_cfg, runtime = mode_setup(cfg, "zero-shot", hypernet=torch.nn.Linear(1, 1), prompt_epochs=2)
    assert zero_cfg.search.epochs == 2 and runtime.freeze_hypernet
    with pytest.raises(ValueError, match="transfer mode"):
        mode_setup(cfg, "sideways")


def test_modes_share_one_dense_backbone_report_progress_and_leave_no_temp_dirs(registered, tmp_path, monkeypatch,
                                                                                 capsys) -> None:
    """With pretraining configured, the first mode trains the dense backbone and the next one reuses it."""
    import tempfile

    from passray.transfer import transfer

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cfg = load_config(None, COMMON + ["data.classes=[5,6,7,8,9]", "pretrain.epochs=1", "finetune.epochs=0",
                                      f"tracking.uri={registered['uri']}", "tracking.experiment=transfer-dense",
                                      f"output_dir={tmp_path / 'out'}"])
    rows = transfer(cfg, "models:/passray-hypernet-convnet@champion", ["zero-shot", "fresh"])
    assert [r["dense_reused"] for r in rows] == [False, True]
    assert rows[0]["dense_val_accuracy"] == rows[1]["dense_val_accuracy"]
    printed = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("reusing dense backbone ") for line in printed) == 1
    progress = [line for line in printed if line.startswith("[transfer]")]
    assert [line.split(":")[0] for line in progress] == ["[transfer] zero-shot (1/2) started", "[transfer] zero-shot (1/2) done",
                                                         "[transfer] fresh (2/2) started", "[transfer] fresh (2/2) done"]
    assert all(" val " in line and " test " in line and "search " in line for line in progress[1::2])
    assert list(scratch.iterdir()) == []  # no passray-model-* (nor any other) temp dir left behind


def test_search_seconds_start_when_the_dense_backbone_is_ready(registered) -> None:
    from passray.tracking import Tracker
    from passray.transfer import _Reporter

    tracker = Tracker(registered["uri"])
    run_id = tracker.start_parent("transfer-clock", "clock")
    clock = iter([1000.0, 1130.0])  # created at 1000; the search epoch reports at 1130
    reporter = _Reporter(tracker, run_id, clock=lambda: next(clock))
    reporter.report({"stage": "pretrain", "epoch": 0, "step": 0}, None)
    reporter.report({"stage": "search", "epoch": 0, "step": 1, "pretrain_seconds": 100.0}, None)
    assert reporter.search_seconds == 30.0


def test_resolve_keeps_a_version_in_the_model_cache(registered, tmp_path, monkeypatch) -> None:
    """No temp dir per call: a version is downloaded once, into $PASSRAY_MODEL_CACHE, and found there again."""
    import os
    import tempfile

    from passray.registry import resolve

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    uri = "models:/passray-hypernet-convnet@champion"
    first = resolve(uri, tracking_uri=registered["uri"])
    assert first.is_relative_to(os.environ["PASSRAY_MODEL_CACHE"]) and (first / "MLmodel").is_file()
    (first / "seen").touch()  # the second call returns this very directory, it does not download again
    again = resolve(uri, tracking_uri=registered["uri"])
    assert again == first and (again / "seen").is_file()
    assert list(scratch.iterdir()) == [] and [p.name for p in first.parent.iterdir()] == [first.name]
