"""MLflow layer: runs, metrics and artifacts via ``Tracker``; registry register -> find ->
load round trips; aliases; tag queries; one-line errors; no pickle. Every store test runs
against a real ``mlflow server`` and against a plain ``sqlite:///`` URI."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from passray import registry
from passray.export import load_pruned
from passray.hypernet import load_hypernet
from passray.tracking import Tracker, check_reachable, resolve_uri

ARCH = "resnet8"
HYPERNET, STRUCTURE = registry.model_name("hypernet", ARCH), registry.model_name("structure", ARCH)


@pytest.fixture(scope="module", autouse=True)
def _server_boots_meanwhile(request) -> None:
    """This module's mlflow server starts with the module when a selected test needs it: a new store's
    migrations take seconds, spent while the sqlite-store tests (first, by the order of ``store``) run."""
    if any(getattr(item, "module", None) is request.module and item.get_closest_marker("mlflow_server")
           for item in request.session.items):
        request.getfixturevalue("mlflow_server_process")


@pytest.fixture(scope="module", params=["sqlite", pytest.param("server", marks=pytest.mark.mlflow_server)])
def store(request, tmp_path_factory) -> str:
    if request.param == "server":
        return request.getfixturevalue("mlflow_server")
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite_store') / 'mlflow.db'}"


def _with_val_accuracy(src: Path, dst: Path, value: float) -> Path:
    """A copy of an export whose recorded val_accuracy is ``value`` (to drive alias decisions)."""
    shutil.copytree(src, dst)
    structure = json.loads((dst / "structure.json").read_text())
    structure["results"]["val_accuracy"] = value
    (dst / "structure.json").write_text(json.dumps(structure))
    return dst


@pytest.fixture(scope="module")
def scenario(store, pass_exports, tmp_path_factory) -> dict:
    """Registrations in a fixed order: A (k50, val .30), B (k30, val .20), then C = A with val .60
    registered from the run it was logged to (``register_run``)."""
    root = tmp_path_factory.mktemp("scenario")
    a = _with_val_accuracy(pass_exports[0], root / "a", 0.30)
    b = _with_val_accuracy(pass_exports[1], root / "b", 0.20)
    c = _with_val_accuracy(pass_exports[0], root / "c", 0.60)
    out = {"exports": {"a": a, "b": b, "c": c}, "timings": {}}
    t0 = time.perf_counter()
    out["a"] = registry.register_export(a, tracking_uri=store)
    out["timings"]["register"] = time.perf_counter() - t0
    out["aliases_after_a"] = registry.find(kind="hypernet", tracking_uri=store)[0]["aliases"]
    out["b"] = registry.register_export(b, tracking_uri=store)
    tracker = Tracker(store)
    run_id = tracker.start_parent("passray-test", "trial-c")
    tracker.log_export(run_id, c)
    tracker.end(run_id)
    out["c"] = registry.register_run(run_id, tracking_uri=store)
    return out


# ------------------------------------------------------------------ runs
def test_parent_child_runs_metrics_and_artifacts(store, pass_exports, tmp_path):
    from passray.config import load_config

    tracker = Tracker(store)
    cfg = load_config(None, ["budget.keep_ratio=0.4"])
    parent = tracker.start_parent("passray-test", "sweep-1", params={"long": "x" * 7000}, tags={"purpose": "test"})
    tracker.log_config(parent, cfg)
    child = tracker.start_child(parent, "trial-0001", params={"budget.keep_ratio": 0.4, "data.classes": [1, 2]})
    logged = tracker.log_metrics(child, {"val_accuracy": 0.5, "nan": math.nan, "inf": math.inf, "stage": "search",
                                         "flag": True, "t": torch.tensor(0.25)}, step=3)
    tracker.log_metrics(child, {"val_accuracy": 0.75}, step=4)
    tracker.log_metrics(child, {"val_accuracy": 0.8, "step": 9})  # the pipeline's report index is the step
    tracker.log_export(child, pass_exports[0])
    tracker.end(child)
    assert set(logged) == {"val_accuracy", "t"}
    assert tracker.start_child(parent, "trial-0001") == child  # a restarted trial resumes its run
    tracker.end(child, "FAILED")
    tracker.end(parent)

    client = tracker.client
    p, c = client.get_run(parent), client.get_run(child)
    assert p.data.tags["purpose"] == "test" and p.info.status == "FINISHED"
    assert len(p.data.params["long"]) == 6000 and p.data.params["budget.keep_ratio"] == "0.4"
    assert c.data.tags["mlflow.parentRunId"] == parent and c.info.status == "FAILED"
    assert c.data.params["data.classes"] == "[1, 2]"
    assert [(m.step, m.value) for m in client.get_metric_history(child, "val_accuracy")] == [(3, 0.5), (4, 0.75), (9, 0.8)]
    assert "step" not in c.data.metrics
    assert set(c.data.metrics) == {"val_accuracy", "t"}
    files = {a.path for a in client.list_artifacts(child, "export")}
    assert {"export/structure.json", "export/weights.safetensors", "export/hypernet", "export/masks.json"} <= files
    local = Path(client.download_artifacts(child, "export", str(tmp_path)))
    masks = json.loads((local / "masks.json").read_text())
    structure = json.loads((pass_exports[0] / "structure.json").read_text())
    assert masks == {g["name"]: {"kept": len(g["kept"]), "width": g["width"], "keep_fraction": len(g["kept"]) / g["width"]}
                     for g in structure["groups"]}
    config = yaml.safe_load(Path(client.download_artifacts(parent, "config.yaml", str(tmp_path))).read_text())
    assert config["budget"]["keep_ratio"] == 0.4


def test_an_interrupted_sweep_ends_its_open_runs_killed(store):
    """A trial process killed by Tune's stop cannot end its run: the driver ends what is still RUNNING,
    and only that; a resumed sweep reopens its parent."""
    tracker = Tracker(store)
    parent = tracker.start_parent("passray-test", "interrupted")
    running, failed, done = (tracker.start_child(parent, f"trial-{i}") for i in range(3))
    tracker.end(failed, "FAILED")
    tracker.end(done, "KILLED", if_running=True)  # a trial stopped after its last report...
    tracker.end(done, "FINISHED")
    tracker.end(done, "KILLED", if_running=True)  # ...keeps the FINISHED it logged
    other = tracker.start_parent("passray-test", "another sweep")
    bystander = tracker.start_child(other, "trial-0")
    assert tracker.end_children(parent, "KILLED") == [running]
    tracker.end(parent, "KILLED")
    status = {run_id: tracker.client.get_run(run_id).info.status for run_id in (running, failed, done, bystander)}
    assert status == {running: "KILLED", failed: "FAILED", done: "FINISHED", bystander: "RUNNING"}
    tracker.reopen(parent)
    assert tracker.client.get_run(parent).info.status == "RUNNING"


# ------------------------------------------------------------------ registry
def test_register_find_load_round_trip(store, scenario):
    a = scenario["a"]
    assert a["hypernet"]["name"] == HYPERNET and a["structure"]["name"] == STRUCTURE
    structure, directory = registry.load_registered_structure(a["structure"]["uri"], tracking_uri=store)
    exported = json.loads((scenario["exports"]["a"] / "structure.json").read_text())
    assert [g["kept"] for g in structure["groups"]] == [g["kept"] for g in exported["groups"]]
    net, _ = load_pruned(directory)
    ref, _ = load_pruned(scenario["exports"]["a"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)

    hypernet, spec = registry.load_registered_hypernet(a["hypernet"]["uri"], tracking_uri=store)
    saved = load_file(str(scenario["exports"]["a"] / "hypernet" / "model.safetensors"))
    state = hypernet.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert spec == load_hypernet(scenario["exports"]["a"] / "hypernet")[1]

    tags = next(e["tags"] for e in registry.find(arch=ARCH, tracking_uri=store) if e["version"] == a["hypernet"]["version"])
    assert tags["dataset"] == "digits" and tags["arch"] == ARCH and tags["method"] == "pass"
    assert tags["source_run"] == a["run_id"] and tags["hidden_size"] == "64" and tags["prompt_kind"] == "pad"
    assert {"backbone_id", "macs_ratio", "keep_ratio", "val_accuracy", "test_accuracy", "prompt_size"} <= tags.keys()
    print(f"\n[{store.split(':')[0]}] first register_export: {scenario['timings']['register']:.1f} s")


def test_aliases_follow_the_best_version(store, scenario):
    assert scenario["aliases_after_a"] == ["champion", "champion-k50"]
    for kind in ("hypernet", "structure"):
        a, b, c = (scenario[k][kind]["version"] for k in "abc")
        assert (a, b, c) == (1, 2, 3)
        assert scenario["c"][kind]["aliases"] == ["champion", "champion-k50"]  # .60 beats .30 at k50 and overall
        assert scenario["b"][kind]["aliases"] == ["champion-k30"]  # .20 < .30: only its own budget
        best = registry.find(kind=kind, tracking_uri=store)
        assert [e["version"] for e in best] == [c, a, b]
        assert registry.find(alias="champion-k30", kind=kind, tracking_uri=store)[0]["version"] == b
    spec = registry.load_registered_hypernet(f"models:/{HYPERNET}@champion", tracking_uri=store)[1]
    assert spec["hidden_size"] == 64
    assert scenario["c"]["run_id"] == registry.find(alias="champion", tracking_uri=store)[0]["tags"]["source_run"]
    registry.promote(HYPERNET, 1, tracking_uri=store)
    assert registry.find(alias="champion", tracking_uri=store)[0]["version"] == 1


def test_registering_a_run_again_is_a_no_op(store, scenario):
    """A resumed experiment registers its finished trials again: the versions stay as they are."""
    before = {kind: [e["version"] for e in registry.find(kind=kind, tracking_uri=store)] for kind in ("hypernet", "structure")}
    again = registry.register_run(scenario["c"]["run_id"], tracking_uri=store)
    for kind in ("hypernet", "structure"):
        assert again[kind]["version"] == scenario["c"][kind]["version"] and again[kind]["existing"]
        assert [e["version"] for e in registry.find(kind=kind, tracking_uri=store)] == before[kind]


def test_find_filters_on_tags(store, scenario):
    ratios = {k: float(scenario_tags["macs_ratio"]) for k, scenario_tags in
              ((e["version"], e["tags"]) for e in registry.find(kind="structure", tracking_uri=store))}
    assert ratios[2] < ratios[1]  # B (keep 0.3) is smaller than A (keep 0.5)
    small = registry.find(max_macs=ratios[2] + 1e-6, kind="structure", tracking_uri=store)
    assert [e["version"] for e in small] == [2]
    assert registry.find(dataset="cifar10", tracking_uri=store) == []
    assert len(registry.find(dataset="digits", tracking_uri=store)) == 3
    macs = float(small[0]["tags"]["macs"])
    assert [e["version"] for e in registry.find(max_macs=macs, kind="structure", tracking_uri=store)] == [2]
    assert registry.find(arch="timm:resnet18d", tracking_uri=store) == []


def test_models_are_logged_as_code_without_pickle(store, scenario):
    for kind in ("hypernet", "structure"):
        local = registry.resolve(scenario["a"][kind]["uri"], tracking_uri=store)
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
        assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".pth")]
        assert (local / "_pyfunc_model.py").is_file()
    # the logged structure model also serves as a plain pyfunc: images -> logits of the pruned net
    import mlflow

    model = mlflow.pyfunc.load_model(str(registry.resolve(scenario["a"]["structure"]["uri"], tracking_uri=store)))
    x = torch.randn(2, 3, 32, 32)
    net = load_pruned(scenario["exports"]["a"])[0]  # not under no_grad: Torch-Pruning traces with autograd
    with torch.no_grad():
        expected = net(x).numpy()
    assert model.predict(x.numpy()).shape == (2, 10)
    torch.testing.assert_close(torch.as_tensor(model.predict(x.numpy())), torch.as_tensor(expected))


def test_unknown_names_aliases_versions_raise_one_line(store, scenario):
    cases = {"models:/passray-hypernet-nope@champion": "unknown registered model 'passray-hypernet-nope'",
             f"models:/{HYPERNET}@no-such-alias": r"has no alias 'no-such-alias' \(its aliases: champion, champion-k30",
             f"models:/{HYPERNET}/99": r"has no version 99 \(its versions: 1, 2, 3\)",
             HYPERNET: "names no version or alias: write models:/NAME@ALIAS",
             "runs:/abc/model": "not a registered model URI"}
    for uri, message in cases.items():
        with pytest.raises(ValueError, match=message) as err:
            registry.load_registered_hypernet(uri, tracking_uri=store)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="has no version 42"):
        registry.promote(HYPERNET, 42, tracking_uri=store)
    with pytest.raises(ValueError, match="unknown kind"):
        registry.find(kind="weights", tracking_uri=store)
    with pytest.raises(ValueError):
        registry.register_run("0" * 32, tracking_uri=store)


def test_tampered_artifacts_are_refused(store, scenario, tmp_path):
    import mlflow

    bad = shutil.copytree(scenario["exports"]["a"], tmp_path / "bad")
    (bad / "hypernet" / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="model.safetensors") as err:
        registry.register_export(bad, tracking_uri=store)
    assert "\n" not in str(err.value)
    assert len(registry.find(kind="hypernet", tracking_uri=store)) == 3  # nothing was registered

    # tamper with the stored copy of a registered hypernet: overwrite its weights in the store
    entry = scenario["b"]["hypernet"]
    local = registry.resolve(entry["uri"], tracking_uri=store)
    weights = local / "artifacts" / "hypernet" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    mlflow.MlflowClient(store).log_model_artifacts(entry["model_id"], str(local))
    with pytest.raises(ValueError, match="model.safetensors") as err:
        registry.load_registered_hypernet(entry["uri"], tracking_uri=store)
    assert "\n" not in str(err.value)


def test_cli(store, scenario, capsys):
    registry.main(["--tracking-uri", store, "list"])
    out = capsys.readouterr().out
    assert HYPERNET in out and STRUCTURE in out and "champion-k30=2" in out
    registry.main(["--tracking-uri", store, "find", "--kind", "structure", "--alias", "champion-k30"])
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 3 and rows[2].split()[:2] == [STRUCTURE, "2"]
    registry.main(["--tracking-uri", store, "show", f"{STRUCTURE}@champion-k30"])
    assert "keep_ratio: 0.3" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        registry.run_cli(registry.main, "passray.registry", ["--tracking-uri", store, "show", "passray-hypernet-x/1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "passray.registry: error: unknown registered model 'passray-hypernet-x'"


# ------------------------------------------------------------------ store checks
def test_check_reachable_fails_fast_on_a_dead_server():
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
    t0 = time.perf_counter()
    for call in (lambda: Tracker(uri), lambda: registry.find(tracking_uri=uri),
                 lambda: registry.load_registered_hypernet(f"models:/{HYPERNET}@champion", tracking_uri=uri)):
        with pytest.raises(RuntimeError, match=f"MLflow tracking server at {uri} is unreachable") as err:
            call()
        assert "\n" not in str(err.value)
    assert time.perf_counter() - t0 < 10


def test_check_reachable_local_stores(tmp_path):
    check_reachable(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert (tmp_path / "new").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(RuntimeError, match="unreachable"):
        check_reachable(f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}")
    check_reachable(f"file://{tmp_path}/mlruns")


@pytest.mark.mlflow_server
def test_check_reachable_live_server(mlflow_server):
    check_reachable(mlflow_server)


def test_resolve_uri(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://x:5000")
    assert resolve_uri(None) == "http://x:5000" and resolve_uri("sqlite:///a.db") == "sqlite:///a.db"


def test_import_passray_does_not_import_mlflow():
    import subprocess
    import sys

    code = "import sys, passray, passray.tracking, passray.registry; print('mlflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
