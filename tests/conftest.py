"""Shared fixtures: a real ``mlflow server`` process and small real PASS exports.

- ``mlflow_server``: module-scoped, so every test module that uses it gets an empty
  registry (aliases and version numbers are per model name, and tests compare them).
  Tests using it carry ``@pytest.mark.mlflow_server``.
- ``pass_exports``: two tiny PASS exports (resnet8 width 0.5 on digits, 1 epoch per
  stage), built once per session: keep_ratio 0.5 / seed 0 and keep_ratio 0.3 / seed 1.
- ``session_caches``: passray's caches of dense backbones and registered models live in
  the session's tmp dir (never ~/.cache) for session and module fixtures and the Ray
  clusters they start; each test gets empty ones of its own (``_own_caches``).
- ``run_together`` / ``Together``: independent subprocesses started at once; a test marked
  ``start_early(starter)`` has its subprocess work started with the session (``started_early``).
- ``imported_after``: what importing the core pulls in, read in one fresh interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# Before torch loads OpenMP, which reads it once: an idle OpenMP thread sleeps instead of spinning.
# On 2 cores shared with Ray, MLflow and subprocesses (which inherit it), spinning threads made
# in-process tests 3-7x slower (test_hypernet.py: 89 s spinning, 18 s passive, 15 s on one thread).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in test logs
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # tests never phone home

CACHE_ENV = {"dense": "PASSRAY_DENSE_CACHE", "models": "PASSRAY_MODEL_CACHE", "data": "PASSRAY_DATA_CACHE"}
SERVER_START_TIMEOUT_S = 120  # first start migrates a new sqlite DB: ~10-20 s on 2 CPU cores


def _point_caches(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    for name, variable in CACHE_ENV.items():
        monkeypatch.setenv(variable, str(root / name))
    return root


@pytest.fixture(scope="session", autouse=True)
def session_caches(tmp_path_factory: pytest.TempPathFactory):
    """Root of the caches that session/module fixtures (and Ray workers, which keep the environment
    their cluster started with) read and write."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _point_caches(monkeypatch, tmp_path_factory.mktemp("caches"))


@pytest.fixture(autouse=True)
def _own_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A backbone cached by one test must not change what another one trains (or whether it trains)."""
    return _point_caches(monkeypatch, tmp_path_factory.mktemp("caches"))


def free_port() -> int:
    """A TCP port nobody listens on right now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Together:
    """Independent CLI runs, started at once: each spends its first seconds importing torch (and Ray),
    one core each, so two take about the time of one. Output goes to files, not pipes: a full pipe
    would stall a process (maybe holding a lock the others wait for) until its turn to be read."""

    def __init__(self, *commands: list[str], **popen) -> None:
        self.logs = [[tempfile.TemporaryFile("w+") for _stream in ("out", "err")] for _ in commands]
        self.procs = [subprocess.Popen(command, stdout=out, stderr=err, text=True, **popen)
                      for command, (out, err) in zip(commands, self.logs)]

    def wait(self, timeout: float) -> list[subprocess.CompletedProcess]:
        """Each run's outcome, once all have ended; those still running after ``timeout`` are killed."""
        try:
            deadline = time.monotonic() + timeout
            for proc in self.procs:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            self.stop()
        for log in (f for pair in self.logs for f in pair):
            log.seek(0)
        done = [subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
                for proc, (out, err) in zip(self.procs, self.logs)]
        for log in (f for pair in self.logs for f in pair):
            log.close()
        return done

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_together(*commands: list[str], timeout: float, **popen) -> list[subprocess.CompletedProcess]:
    """``Together(*commands, **popen).wait(timeout)``."""
    return Together(*commands, **popen).wait(timeout)


# ---------------------------------------------------------------- work started with the session
STARTED_EARLY = pytest.StashKey[dict]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "start_early(starter): the test's work starts with the session (_start_early)")


@pytest.fixture(scope="session", autouse=True)
def _start_early(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Long work of a test that runs in processes of its own (benchmark scripts with their own Ray) starts
    with the session when that test is selected: ``starter``, a function of the test's module named by the
    test's ``start_early`` mark, gets an empty folder and returns a handle with ``stop()``; the test reads
    the handle as ``started_early``. The first in-process tests run one OpenMP thread each (by design,
    see ``one_thread``) and leave a core idle, which this work uses. What still runs at the end is stopped."""
    started = {}
    for item in request.session.items:
        marker = item.get_closest_marker("start_early")
        if marker is not None:
            starter = marker.args[0]
            started[item.nodeid] = getattr(item.module, starter)(tmp_path_factory.mktemp(starter))
    request.config.stash[STARTED_EARLY] = started
    yield
    for handle in started.values():
        handle.stop()


@pytest.fixture
def started_early(request: pytest.FixtureRequest):
    """The handle the test's ``start_early`` starter returned at the session's start."""
    return request.config.stash[STARTED_EARLY][request.node.nodeid]


# What test_data, test_models and test_train import in a fresh interpreter, in this order (see imported_after).
IMPORT_STEPS = ("passray.data", "passray.models", "passray, passray.pipeline, passray.prune")
WATCHED = ("ray", "mlflow")


@pytest.fixture(scope="session")
def imported_after() -> dict[str, list[str]]:
    """For each of IMPORT_STEPS: which of WATCHED one fresh interpreter holds once it has imported that
    step's modules after the earlier steps' (one interpreter, not one per test: each imports torch).
    Cumulative, so a step's answer holds at least what its own modules pull in: an assertion that a
    module is absent is never weaker than in an interpreter of its own."""
    code = ("import importlib, json, sys\n"
            "out = {}\n"
            f"for step in {IMPORT_STEPS!r}:\n"
            "    for name in step.split(', '):\n"
            "        importlib.import_module(name)\n"
            f"    out[step] = sorted(m for m in {WATCHED!r} if m in sys.modules)\n"
            "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server_process(tmp_path_factory: pytest.TempPathFactory):
    """A fresh ``mlflow server`` (sqlite backend, proxied artifacts) on a free local port, started but not
    waited for (``mlflow_server`` waits): a module may start it early, to boot while its other tests run."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server",
               "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
               "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        # a new session = a new process group, so teardown also stops the server's workers
        # job execution would start 7 huey consumers per server; the tests need none
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        yield proc, f"http://127.0.0.1:{port}", log_path
    finally:
        _stop_group(proc)


@pytest.fixture(scope="module")
def mlflow_server(mlflow_server_process) -> str:
    """URI of the module's ``mlflow server``, once it answers."""
    proc, uri, log_path = mlflow_server_process
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not _healthy(uri):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-2000:]
            pytest.fail(f"mlflow server did not start (exit {proc.poll()}):\n{tail}")
        time.sleep(0.5)
    return uri


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


TINY = ["model.arch=resnet8", "model.width=0.5", "data.name=digits", "data.limit_train=128", "pretrain.epochs=1",
        "search.epochs=1", "finetune.epochs=1", "bn_recalibration_batches=2", "method=pass", "device=cpu"]


@pytest.fixture(scope="session")
def pass_exports(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real PASS export dirs: [keep 0.5 / seed 0, keep 0.3 / seed 1] (~10 s each on 2 cores)."""
    from passray.config import load_config
    from passray.pipeline import Runtime, run

    root = tmp_path_factory.mktemp("exports")
    exports = []
    for name, extra in (("k50", ["budget.keep_ratio=0.5", "seed=0"]), ("k30", ["budget.keep_ratio=0.3", "seed=1"])):
        cfg = load_config(None, [*TINY, *extra, f"output_dir={root / name}"])
        run(cfg, Runtime(export_dir=str(root / name), progress=False))
        exports.append(root / name)
    return exports


@pytest.fixture(scope="module")
def one_thread():
    """Small batches on 2 shared cores: a second OpenMP thread costs far more than it gives (~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
