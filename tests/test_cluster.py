"""The cluster/ folder: launcher and KubeRay YAMLs, runtime_env, Dockerfile, local.sh.

The YAMLs are checked against what the *installed* Ray accepts (the autoscaler's JSON
schema and its own ``validate_config``, ``RuntimeEnv``'s fields, the excludes matcher
``ray job submit`` uses), and every pinned Ray version must equal ``ray.__version__``,
so bumping Ray in pyproject.toml fails here until cluster/ follows. The ``ray``-marked
tests start the real two-node cluster of ``cluster/local.sh`` (with its MLflow server) once,
run ``passray.tune`` on it through ``ray job submit``, and tear it down.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ray = pytest.importorskip("ray")
jsonschema = pytest.importorskip("jsonschema")

autoscaler = pytest.importorskip("ray.autoscaler")
from conftest import CACHE_ENV, run_together  # noqa: E402
from ray.runtime_env import RuntimeEnv  # noqa: E402
from test_tune import CONSOLE_LINES_4_TRIALS, _mlflow_runs, _write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_YAMLS = ["aws.yaml", "gcp.yaml"]
KUBERAY_YAMLS = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "kuberay-mlflow.yaml"]
RAY_VERSION = ray.__version__
# An image of Ray itself or of passray built on it (cluster/Dockerfile); both carry the
# Ray version in their tag. Other images (mlflow) are not Ray pins.
RAY_IMAGE = re.compile(r"(?:rayproject/ray|/passray):(?P<tag>[\w.\-]+)")


def load(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text())


def load_all(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((CLUSTER / name).read_text()) if doc]


def ray_version_pins(text: str) -> list[str]:
    """Every Ray version a file pins: image tags of Ray images and ``rayVersion`` fields."""
    pins = [m.group("tag") for m in RAY_IMAGE.finditer(text)]
    pins += re.findall(r"""rayVersion:\s*["']?([\w.\-]+)""", text)
    return pins


# --- cluster launcher (aws, gcp) -------------------------------------------------------


@pytest.fixture(scope="module")
def autoscaler_schema() -> dict[str, Any]:
    path = Path(autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_matches_installed_autoscaler_schema(name: str, autoscaler_schema: dict) -> None:
    jsonschema.validate(load(name), autoscaler_schema)


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_passes_rays_own_validation(name: str) -> None:
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # private API; the schema test above still runs
        pytest.skip("ray.autoscaler._private.util.validate_config not available")
    config = load(name)
    validate_config(config)  # as written
    validate_config(prepare_config(config))  # after Ray merges its provider defaults


@pytest.mark.parametrize("name, bucket_scheme", [("aws.yaml", "s3://"), ("gcp.yaml", "gs://")])
def test_launcher_yaml_layout(name: str, bucket_scheme: str) -> None:
    config = load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}

    assert head["resources"].get("CPU") == 0, "the head must not take trials"
    assert workers, "no worker node types"
    for worker_name, worker in workers.items():
        assert 0 <= worker["min_workers"] <= worker["max_workers"] <= config["max_workers"], worker_name
    if config["provider"]["type"] == "gcp":  # GCE resources are declared, not detected
        assert all(w["resources"].get("GPU", 0) >= 1 for w in workers.values())
    else:
        assert all(re.match(r"(g|p)\d", w["node_config"]["InstanceType"]) for w in workers.values())

    # The working copy is synced and installed on every node.
    assert config["file_mounts"]["~/passray"] == "."
    assert any("pip install" in cmd and "~/passray" in cmd for cmd in config["setup_commands"])

    # Every node exports the tracking URI and token mode before `ray start`.
    setup = " ".join(config["setup_commands"])
    assert "MLFLOW_TRACKING_URI=http://${RAY_HEAD_IP" in setup and ":5000" in setup
    assert "RAY_AUTH_MODE=token" in setup
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [cmd for cmd in config[key] if "ray start" in cmd]
        assert starts and all("source ~/.passray.env" in cmd for cmd in starts), key
    assert any("$RAY_HEAD_IP:6379" in cmd for cmd in config["worker_start_ray_commands"])

    # The head runs the MLflow server with proxied artifacts on the provider's buckets.
    mlflow = [cmd for cmd in config["head_start_ray_commands"] if "mlflow server" in cmd]
    assert len(mlflow) == 1
    for flag in ("--backend-store-uri", "--artifacts-destination", "--serve-artifacts", "--port 5000"):
        assert flag in mlflow[0], flag
    assert f"MLFLOW_ARTIFACTS_DESTINATION={bucket_scheme}" in " ".join(config["head_setup_commands"])


def test_launcher_setup_command_writes_node_env(tmp_path: Path) -> None:
    """Run aws.yaml's env-writing setup command in a scratch HOME, as a worker and twice."""
    config = load("aws.yaml")
    command = next(cmd for cmd in config["setup_commands"] if ".passray.env" in cmd)
    (tmp_path / ".bashrc").write_text("")
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"], "RAY_HEAD_IP": "10.1.2.3"}
    for _ in range(2):
        subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
    exported = (tmp_path / ".passray.env").read_text()
    assert "export MLFLOW_TRACKING_URI=http://10.1.2.3:5000" in exported
    assert "export RAY_AUTH_MODE=token" in exported
    assert (tmp_path / ".bashrc").read_text().count("source ~/.passray.env") == 1


# --- Ray version pins --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [*LAUNCHER_YAMLS, "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "Dockerfile"]
)
def test_every_ray_pin_equals_installed_ray(name: str) -> None:
    pins = ray_version_pins((CLUSTER / name).read_text())
    assert pins, f"{name} pins no Ray version"
    for pin in pins:
        assert pin.split("-")[0] == RAY_VERSION, f"{name} pins Ray {pin!r}, installed is {RAY_VERSION}"


def test_dockerfile_builds_on_the_pinned_ray_image() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert bases == [f"rayproject/ray:{RAY_VERSION}-py311-gpu"]
    assert "/home/ray/passray" in text  # kuberay-rayjob.yaml's working_dir


# --- KubeRay ------------------------------------------------------------------------------


def containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def mlflow_service_uri() -> str:
    service = next(d for d in load_all("kuberay-mlflow.yaml") if d["kind"] == "Service")
    return f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def check_ray_cluster_spec(spec: dict[str, Any]) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"]["mode"] == "token"

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    groups = [head, *spec["workerGroupSpecs"]]
    for group in groups:  # KubeRay's rayStartParams is map[string]string
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        for container in containers(group["template"]):
            assert RAY_VERSION in container["image"]
            assert env_of(container)["MLFLOW_TRACKING_URI"] == mlflow_service_uri()

    gpu_groups = [
        group
        for group in spec["workerGroupSpecs"]
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers(group["template"]))
    ]
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_kuberay_raycluster() -> None:
    doc = load("kuberay-raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    check_ray_cluster_spec(doc["spec"])


def test_kuberay_rayjob() -> None:
    doc = load("kuberay-rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("python -m passray.tune --config tune_configs/")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    check_ray_cluster_spec(spec["rayClusterSpec"])

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= RuntimeEnv.known_fields
    # working_dir is a path inside the image (cluster/Dockerfile's WORKDIR), resolved in
    # the submitter pod; RuntimeEnv would insist that it exists here.
    workdir = runtime_env.pop("working_dir")
    assert f"WORKDIR {workdir}" in (CLUSTER / "Dockerfile").read_text()
    RuntimeEnv(**runtime_env)
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == mlflow_service_uri()


def test_kuberay_mlflow_server_accepts_its_service_name() -> None:
    docs = {d["kind"]: d for d in load_all("kuberay-mlflow.yaml")}
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "Service"}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(container["args"])
    assert "--serve-artifacts" in args and "--host=0.0.0.0" in args
    service = docs["Service"]["metadata"]["name"]
    allowed = re.search(r"--allowed-hosts=(\S+)", args).group(1).split(",")
    assert f"{service}:*" in allowed  # Host header of in-cluster clients: name:port
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]


def test_referenced_tune_configs_exist() -> None:
    configs = sorted((REPO / "tune_configs").glob("*.yaml"))
    if not configs:
        pytest.skip("tune_configs/ has no configs yet")
    texts = [(CLUSTER / name).read_text() for name in [*LAUNCHER_YAMLS, *KUBERAY_YAMLS]]
    texts.append((CLUSTER / "README.md").read_text())
    referenced = set(re.findall(r"tune_configs/[\w.\-]+\.yaml", " ".join(texts)))
    missing = sorted(ref for ref in referenced if not (REPO / ref).is_file())
    assert not missing, f"cluster/ refers to missing configs: {missing}"


# --- runtime_env.yaml ----------------------------------------------------------------------


def test_runtime_env_fields_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    data = load("runtime_env.yaml")
    assert set(data) <= RuntimeEnv.known_fields, set(data) - RuntimeEnv.known_fields
    assert data["working_dir"] == "."
    monkeypatch.chdir(REPO)  # "." is meant as the repository root
    RuntimeEnv(**data)
    assert all(isinstance(v, str) for v in data["env_vars"].values())
    assert {"MLFLOW_TRACKING_URI", "PYTHONUNBUFFERED"} <= set(data["env_vars"])
    assert "pip" not in data and "conda" not in data  # heavy deps belong in the image


def test_runtime_env_excludes_ship_code_not_state() -> None:
    try:
        from ray._private.runtime_env.packaging import _get_excludes
    except ImportError:
        pytest.skip("ray's excludes matcher moved")
    excluded = _get_excludes(REPO, load("runtime_env.yaml")["excludes"])
    for path in [".venv", ".git", "mlruns", "mlflow.db", "ray_results", "outputs", "data",
                 ".local-cluster", "passray/__pycache__"]:
        assert excluded(REPO / path), path
    for path in ["passray/config.py", "passray/data.py", "tune_configs/quickstart.yaml",
                 "pyproject.toml", "cluster/local.sh"]:
        assert not excluded(REPO / path), path


# --- cluster/local.sh (real processes) -------------------------------------------------


def free_port(*, also_next: bool = False) -> int:
    """A port that is free now (and, if asked, whose successor is free too)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not also_next or port >= 65535:
            return port
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def session_processes(sid: int) -> list[str]:
    """Live (non-zombie) processes of a session, as 'pid args' lines."""
    out = subprocess.run(["ps", "-eo", "sid=,stat=,pid=,args="], capture_output=True, text=True, check=True)
    rows = (line.split(None, 3) for line in out.stdout.splitlines())
    return [f"{row[2]} {row[3] if len(row) > 3 else ''}" for row in rows
            if int(row[0]) == sid and not row[1].startswith("Z")]


@dataclass(frozen=True)
class LocalCluster:
    env: dict[str, str]  # what local.sh was run with
    exports: dict[str, str]  # what `local.sh up` printed for clients
    state: Path  # its state dir (pids, session ids, logs)

    @property
    def client_env(self) -> dict[str, str]:
        return {**self.env, **self.exports}


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory: pytest.TempPathFactory, session_caches: Path) -> Iterator[LocalCluster]:
    """One ``local.sh up`` for the module (a cluster start costs tens of seconds on 2 cores): private state
    dir, non-default ports, 1 CPU per node. Its tests run in file order: ``up``'s promises, jobs on it,
    then ``down`` (which the teardown repeats, harmlessly, for a test run alone)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("local.sh is Linux-only")
    bindir = str(Path(sys.executable).parent)
    if not (shutil.which("ray", path=bindir) and shutil.which("mlflow", path=bindir)):
        pytest.skip("ray / mlflow executables not next to this python")
    ray_tmp = tempfile.mkdtemp(prefix="prt-", dir="/tmp")  # short: unix socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PASSRAY_", "MLFLOW_"))}
    env.update(
        {variable: str(session_caches / name) for name, variable in CACHE_ENV.items()},  # jobs' caches: not ~/.cache
        PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}",
        PASSRAY_LOCAL_DIR=str(tmp_path_factory.mktemp("local_sh") / "state"),
        PASSRAY_RAY_TMPDIR=ray_tmp,
        PASSRAY_RAY_PORT=str(free_port()),
        PASSRAY_DASHBOARD_PORT=str(free_port()),
        PASSRAY_MLFLOW_PORT=str(free_port()),
        PASSRAY_RAY_CLIENT_PORT=str(free_port()),
        PASSRAY_AGENT_PORT=str(free_port(also_next=True)),
        PASSRAY_HEAD_CPUS="1",
        PASSRAY_NODE2_CPUS="1",
        PASSRAY_OBJECT_STORE_MB="256",
        PASSRAY_MLFLOW_WORKERS="1",
    )
    try:
        up = subprocess.run([str(CLUSTER / "local.sh"), "up"], env=env, capture_output=True, text=True, timeout=150)
        assert up.returncode == 0, up.stderr[-3000:]
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", up.stdout, flags=re.MULTILINE))
        yield LocalCluster(env, exports, Path(env["PASSRAY_LOCAL_DIR"]))
    finally:
        subprocess.run([str(CLUSTER / "local.sh"), "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _submission(cluster: LocalCluster, working_dir: Path, *command: str) -> list[str]:
    """``ray job submit`` through the token-protected job API, as a user does after ``eval "$(local.sh up)"``."""
    return ["ray", "job", "submit", "--address", cluster.exports["RAY_API_SERVER_ADDRESS"],
            "--working-dir", str(working_dir), "--", *command]


def _submit(cluster: LocalCluster, working_dir: Path, *command: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(_submission(cluster, working_dir, *command), env=cluster.client_env, capture_output=True,
                          text=True, timeout=timeout)


@dataclass(frozen=True)
class TuneJobs:
    tune: subprocess.CompletedProcess  # 4 trials: the tests' tune job
    tune_dir: Path  # its folder (config, ray_results)
    failed: subprocess.CompletedProcess  # a job whose data is missing


@pytest.fixture(scope="module")
def tune_jobs(local_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> TuneJobs:
    """The two ``passray.tune`` jobs, submitted together: the failing one ends in its driver's dense training,
    before any trial takes a CPU, so it shares the cluster with the other only in the seconds of its start."""
    uri = local_cluster.exports["MLFLOW_TRACKING_URI"]
    tune_dir, failed_dir = tmp_path_factory.mktemp("tune_job"), tmp_path_factory.mktemp("failed_job")
    good = _write(tune_dir, tune__num_samples=4, tune__max_concurrent_trials=4, tracking__uri=uri,
                  tracking__experiment="job-submit")
    bad = _write(failed_dir, data__root=str(failed_dir / "missing"), data__name="imagefolder", tracking__uri=uri)
    tune, failed = run_together(*(_submission(local_cluster, REPO, "python", "-m", "passray.tune", "--config", str(path))
                                  for path in (good, bad)), env=local_cluster.client_env, timeout=900)
    return TuneJobs(tune, tune_dir, failed)


@pytest.mark.ray
@pytest.mark.mlflow_server
def test_local_sh_up_starts_two_nodes_and_mlflow(local_cluster: LocalCluster, tmp_path: Path) -> None:
    env, exports = local_cluster.env, local_cluster.exports
    assert exports["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{env['PASSRAY_DASHBOARD_PORT']}"
    assert exports["RAY_ADDRESS"] == f"127.0.0.1:{env['PASSRAY_RAY_PORT']}"
    assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{env['PASSRAY_MLFLOW_PORT']}"
    assert exports["RAY_AUTH_MODE"] == "token"
    assert Path(exports["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o077 == 0, "token readable by others"

    with urllib.request.urlopen(f"{exports['MLFLOW_TRACKING_URI']}/health", timeout=10) as resp:
        assert resp.status == 200

    for _ in range(15):  # `ray status` (the autoscaler's view) lags the dashboard's node list local.sh waits on
        status = subprocess.run(["ray", "status"], env=local_cluster.client_env, capture_output=True, text=True,
                                timeout=60)
        assert status.returncode == 0, status.stderr[-2000:]
        if len(re.findall(r"^\s*1 node_[0-9a-f]+", status.stdout, flags=re.MULTILINE)) == 2:
            break
        time.sleep(2)
    assert len(re.findall(r"^\s*1 node_[0-9a-f]+", status.stdout, flags=re.MULTILINE)) == 2
    assert "node2" in status.stdout  # the custom resource of the second node

    # A job lands on a 2-node cluster and inherits MLFLOW_TRACKING_URI on the second node.
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "probe.py").write_text(
        "import os, ray\n"
        "ray.init()\n"
        "@ray.remote(resources={'node2': 1})\n"
        "def uri():\n"
        "    return os.environ.get('MLFLOW_TRACKING_URI')\n"
        "print('NODES', len([n for n in ray.nodes() if n['Alive']]), 'URI', ray.get(uri.remote()))\n"
    )
    job = _submit(local_cluster, tmp_path / "job", "python", "probe.py", timeout=120)
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    assert f"NODES 2 URI {exports['MLFLOW_TRACKING_URI']}" in job.stdout

    again = subprocess.run([str(CLUSTER / "local.sh"), "up"], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already up" in again.stderr


@pytest.mark.ray
@pytest.mark.mlflow_server
@pytest.mark.slow
def test_ray_job_submit_runs_tune_trials_on_both_nodes(local_cluster: LocalCluster, tune_jobs: TuneJobs) -> None:
    import mlflow

    uri = local_cluster.exports["MLFLOW_TRACKING_URI"]
    job = tune_jobs.tune
    assert job.returncode == 0 and "succeeded" in job.stdout, (job.stdout[-3000:], job.stderr[-2000:])
    console = job.stdout + job.stderr
    assert console.count("\n") < CONSOLE_LINES_4_TRIALS, console  # the live table, not a config dump per trial
    assert "tensorboard" not in console.lower() and "base/" not in console
    exp = tune_jobs.tune_dir / "ray_results" / "tiny"
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
def test_failed_tune_job_reports_failure(tune_jobs: TuneJobs) -> None:
    job = tune_jobs.failed
    assert job.returncode != 0
    assert "missing" in job.stdout + job.stderr


@pytest.mark.ray
@pytest.mark.mlflow_server
def test_local_sh_down_stops_what_up_started(local_cluster: LocalCluster) -> None:
    """Last in this file: it ends the module's cluster."""
    script, env = str(CLUSTER / "local.sh"), local_cluster.env
    sessions = {name: int((local_cluster.state / f"{name}.sid").read_text()) for name in ("head", "node2", "mlflow")}
    assert all(session_processes(sid) for sid in sessions.values()), "local.sh up did not leave all three running"

    down = subprocess.run([script, "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr[-2000:]
    deadline = time.monotonic() + 10
    while any(session_processes(sid) for sid in sessions.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftovers = {name: session_processes(sid) for name, sid in sessions.items()}
    assert not any(leftovers.values()), leftovers

    assert subprocess.run([script, "down"], env=env, capture_output=True, timeout=60).returncode == 0
    assert subprocess.run([script, "status"], env=env, capture_output=True, timeout=60).returncode == 3
