"""Interrupted or bad runs never leave a false record (issue #19, "Faults").

- ``passray.tune`` killed (-9), then Ctrl-C in its resumed run: exit 130, partial results marked
  partial, MLflow runs KILLED, ``--resume`` finishes the experiment without re-running a finished
  trial (and refuses a changed config in one line).
- Two processes opening a new sqlite store at once both succeed; a half-created store is one
  line at the registry CLI.
- ``--resume`` with another config: refused in one line (a reused Ray Train run name: test_train.py's
  resume test, on the run it has finished).
- ``RAY_ADDRESS`` with nothing behind it and more workers than the cluster: one line, at once.
- An unwritable ``output_dir``: refused before any compute.
- A full disk: no truncated checkpoint or state file, a one-line error.

Full disks and read-only folders are real tmpfs mounts (root with CAP_SYS_ADMIN, as in the
project's containers); where mounting is not allowed those cases are skipped, saying why.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from conftest import free_port, run_together
from test_train import _cfg, ray_cluster  # noqa: F401  (a module-scoped real local Ray cluster)
from test_tune import _write

from passray._state_io import save_state
from passray.config import ConfigError

ONE_MINUTE = 60


def _tmpfs(path: Path, *options: str) -> Path:
    """A tmpfs mounted at ``path`` (unmounted by ``_unmount``), or a skip where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip()}): needs root with CAP_SYS_ADMIN")
    return path


def _unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 40 KiB file system: room for small files, not for a checkpoint of the tiny models."""
    yield _tmpfs(tmp_path / "full", "size=40k")
    _unmount(tmp_path / "full")


@pytest.fixture
def read_only(tmp_path: Path):
    yield _tmpfs(tmp_path / "ro", "ro", "size=1m")
    _unmount(tmp_path / "ro")


def _one_error_line(stderr: str, prog: str) -> str:
    """The CLI's error: the last line, the only one of ours, with no traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-3000:]
    ours = [line for line in stderr.splitlines() if line.startswith(f"{prog}: ")]
    assert len(ours) == 1 and stderr.strip().splitlines()[-1] == ours[0], stderr[-3000:]
    return ours[0]


# ---------------------------------------------------------------- MLflow store
def test_processes_opening_a_new_sqlite_store_together_all_succeed(tmp_path: Path) -> None:
    """Without the store lock one of two fails (``duplicate column name: step`` and the like) and
    the schema can be left half-migrated."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    gate = tmp_path / "go"
    code = ("import sys, time; from pathlib import Path; from passray.tracking import Tracker; "
            "Path(sys.argv[1]).touch(); "
            "[time.sleep(0.01) for _ in iter(lambda: Path(sys.argv[2]).exists(), True)]; "
            "print(Tracker(sys.argv[3]).experiment_id('race'))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"ready-{i}"), str(gate), uri],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):  # both imported, then go together
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.1)
        gate.touch()
        outcomes = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [rc for rc, _, _ in outcomes] == [0, 0], [err[-2000:] for _, _, err in outcomes]
    assert len({out.strip() for _, out, _ in outcomes}) == 1  # one experiment, created once


def test_a_made_store_is_opened_alongside_other_readers_but_not_alongside_its_creator(tmp_path: Path) -> None:
    """Trial processes open one existing store at once (each open reads the schema for about a second;
    one at a time, four packed trials waited for each other); a store being created excludes them."""
    import fcntl

    from passray.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri).experiment_id("made")

    def opens_beside(how: int) -> bool:
        """Whether a Tracker opens within a while that this test holds the store's lock ``how``."""
        opener = threading.Thread(target=Tracker, args=(uri,), daemon=True)
        with open(tmp_path / "mlflow.db.lock", "a") as held:
            fcntl.flock(held, how)
            opener.start()
            opener.join(timeout=60 if how == fcntl.LOCK_SH else 3)
            opened = not opener.is_alive()
        opener.join(timeout=60)  # the lock let go: it opens now
        assert not opener.is_alive()
        return opened

    assert opens_beside(fcntl.LOCK_SH)
    assert not opens_beside(fcntl.LOCK_EX)


def test_a_half_created_store_is_one_line_at_the_registry_cli(tmp_path: Path) -> None:
    """What a process that died while creating the schema leaves: some tables, not all."""
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        con.execute("create table experiments (experiment_id integer primary key, name varchar(256))")
    proc = subprocess.run([sys.executable, "-m", "passray.registry", "--tracking-uri", f"sqlite:///{db}", "list"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr, "passray.registry")
    assert proc.stderr.strip() == line, proc.stderr  # MLflow's own traceback log is not shown either
    assert str(db) in line and "cannot be opened" in line


# ---------------------------------------------------------------- resume with another config
def test_tune_resume_with_another_config_is_refused_before_ray_starts(tmp_path: Path) -> None:
    from passray._cli import config_record
    from passray._state_io import write_atomically
    from passray.config import load_config
    from passray.tune import EXPERIMENT_FILE, experiment_config, main

    path = _write(tmp_path)
    exp = tmp_path / "ray_results" / "tiny"  # as a first run leaves it, before its first trial
    exp.mkdir(parents=True)
    write_atomically(exp / EXPERIMENT_FILE, json.dumps(config_record(experiment_config(load_config(str(path))))))
    for change, key in ((["tune.num_samples=3"], "tune.num_samples"), (["model.width=0.5"], "model.width"),
                        ([f"tracking.uri=sqlite:///{tmp_path / 'other.db'}"], "tracking.uri")):
        with pytest.raises(ConfigError, match=f"config key '{key}': experiment .*tiny was started with") as err:
            main(["--config", str(path), "--resume", str(exp), *[a for c in change for a in ("--set", c)]])
        assert "\n" not in str(err.value)
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "other.db").exists()


# ---------------------------------------------------------------- Ray cluster
def test_ray_address_with_nothing_listening_fails_at_once(tmp_path: Path) -> None:
    """Ray itself retries such an address for many minutes (the guard below would end the test).
    Both CLIs at once: each spends its seconds importing, on a core of its own."""
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "RAY_ADDRESS": address}
    progs = ["passray.train", "passray.tune"]
    for prog in progs:  # a folder (config, MLflow store, storage) each, as two separate runs have
        (tmp_path / prog).mkdir()
    procs = run_together(*([sys.executable, "-m", prog, "--config", str(_write(tmp_path / prog))] for prog in progs),
                         env=env, cwd=tmp_path, timeout=5 * ONE_MINUTE)
    for prog, proc in zip(progs, procs):
        assert proc.returncode == 2, (prog, proc.stderr[-3000:])
        line = _one_error_line(proc.stderr, prog)
        assert f"RAY_ADDRESS={address}: no Ray cluster answers" in line


@pytest.mark.ray
def test_more_workers_than_the_cluster_is_refused_before_any_starts(ray_cluster, tmp_path: Path) -> None:  # noqa: F811
    """The CLI joins the running 4-CPU cluster; Ray Train would wait for 64 workers forever."""
    cfg = _cfg(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cases = {"train.num_workers=64": "64 x {'CPU': 1.0} need 64 CPU in all, but the Ray cluster has 4",
             "train.use_gpu=true": "need 2 GPU in all, but the Ray cluster has 0"}
    procs = run_together(*([sys.executable, "-m", "passray.train", "--config", str(path), "--set", change]
                           for change in cases), env=env, timeout=5 * ONE_MINUTE)
    for proc, needle in zip(procs, cases.values()):
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = _one_error_line(proc.stderr, "passray.train")
        assert "config key 'train.num_workers'" in line and needle in line, line
    assert not (tmp_path / "ray_results").exists()  # refused before the run folder is made


# ---------------------------------------------------------------- output_dir
def _blocked(tmp_path: Path, how: str, read_only: Path | None) -> Path:
    if how == "file in the way":
        (tmp_path / "a-file").write_text("")
        return tmp_path / "a-file" / "out"
    return read_only / "out"


@pytest.mark.parametrize("how", ["file in the way", "read-only mount"])
def test_unwritable_output_dir_is_refused_before_any_compute(how: str, tmp_path: Path, request, capsys) -> None:
    from passray import prune, train
    from passray._cli import run_cli

    out = _blocked(tmp_path, how, request.getfixturevalue("read_only") if how == "read-only mount" else None)
    settings = ["model.arch=convnet", "model.width=0.25", "data.limit_train=64", "pretrain.epochs=0", "search.epochs=1",
                "finetune.epochs=0", f"output_dir={out}", f"train.storage_path={tmp_path / 'ray_results'}"]
    for module, prog in ((prune, "passray.prune"), (train, "passray.train")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(module.main, prog, [a for s in settings for a in ("--set", s)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"{prog}: error: config key 'output_dir': {out}") and "\n" not in err, err
    assert not (tmp_path / "ray_results").exists()  # no Ray Train run was started


# ---------------------------------------------------------------- full disk
def test_state_on_a_full_disk_is_one_oserror_and_no_partial_file(full_disk: Path) -> None:
    import torch

    with pytest.raises(OSError) as err:
        save_state(full_disk / "ckpt", {"weights": torch.zeros(100_000), "meta": {"stage": "search"}})
    assert err.value.errno == errno.ENOSPC and "state.safetensors" in str(err.value) and "\n" not in str(err.value)
    assert list((full_disk / "ckpt").iterdir()) == []  # neither a torn tensor file nor a state.json naming it


@pytest.mark.ray
def test_full_storage_leaves_no_truncated_checkpoint(ray_cluster, full_disk: Path, tmp_path: Path) -> None:  # noqa: F811
    from passray.train import fit

    cfg = _cfg(tmp_path, finetune={"epochs": 0}, train={"name": "full", "num_workers": 1, "storage_path": str(full_disk)})
    with pytest.raises(RuntimeError, match="disk full") as err:
        fit(cfg)
    assert "\n" not in str(err.value) and str(full_disk) in str(err.value)
    left = sorted(p.name for p in (full_disk / "full").iterdir())
    assert not [name for name in left if "checkpoint_" in name and not name.endswith(".json")], left


# ---------------------------------------------------------------- kill -9, Ctrl-C
def _runs(uri: str, experiment: str) -> tuple[object, list]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, runs
    return parents[0], [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]


DONE = '"stage": "done"'


def _reported(exp: Path) -> int:
    """Reports the experiment's trials have written so far (one result.json line each)."""
    return sum(p.read_text().count("\n") for p in exp.glob("*/result.json"))


def _finished(exp: Path) -> dict[Path, int]:
    """Result files of the trials that have finished, with their number of final reports."""
    return {p: p.read_text().count(DONE) for p in exp.glob("*/result.json") if DONE in p.read_text()}


def _start_tune(command: list[str], env: dict, console: Path) -> subprocess.Popen:
    """``command`` in its own session (a signal to its group reaches all of it), output in console.out/.err."""
    with open(console.with_suffix(".out"), "w") as out, open(console.with_suffix(".err"), "w") as err:
        return subprocess.Popen(command, env=env, cwd=console.parent, stdout=out, stderr=err, start_new_session=True)


def _wait_for(proc: subprocess.Popen, ready) -> None:
    deadline = time.monotonic() + 10 * ONE_MINUTE
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, proc.poll()
        time.sleep(0.5)


KILL_TEST = "test_killed_then_ctrl_c_tune_is_a_partial_killed_record_that_resumes_without_rerunning"


class InterruptedSweep:
    """The first two faults of ``KILL_TEST``, run by a thread from the start of this module: a tune start
    mostly waits (on Ray, Tune, trial processes), and the tests in between use the core it leaves.
    What the test checks of a step is read before the next step changes it."""

    def __init__(self, root: Path) -> None:
        # A new process per trial (no reuse_actors): a reused process runs these tiny trials in about a second
        # each, and all three would end within the 3 s the kill waits for Tune's experiment state.
        config = _write(root, tune__num_samples=3, tune__max_concurrent_trials=1, tune__objective="single",
                        tune__grace_period=1000, finetune__epochs=2, tune__reuse_actors=False)
        self.root, self.exp, self.uri = root, root / "ray_results" / "tiny", f"sqlite:///{root / 'mlflow.db'}"
        self.env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_ADDRESS": "local"}  # a fresh Ray, never another
        self.command = [sys.executable, "-m", "passray.tune", "--config", str(config)]
        self.procs: list[subprocess.Popen] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def start(self, *args: str, console: str) -> subprocess.Popen:
        self.procs.append(_start_tune([*self.command, *args], self.env, self.root / console))
        return self.procs[-1]

    def _run(self) -> None:
        try:
            self._kill_then_interrupt()
        except BaseException as err:  # noqa: BLE001  (raised in the test, by result())
            self.error = err

    def _kill_then_interrupt(self) -> None:
        exp = self.exp
        # killed: nothing gets to clean up; Tune's periodic experiment state is all --resume has
        proc = self.start(console="killed")
        try:
            _wait_for(proc, lambda: _finished(exp))
            time.sleep(3)  # let Tune write its experiment state
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.finished = _finished(exp)

        # Ctrl-C in the resumed run, once it has reported something new
        reported = _reported(exp)
        proc = self.start("--resume", str(exp), console="interrupted")
        try:
            _wait_for(proc, lambda: _reported(exp) > reported)
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
            proc.wait(timeout=5 * ONE_MINUTE)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        self.interrupted = proc.returncode, (self.root / "interrupted.err").read_text()
        self.partial = json.loads((exp / "results.json").read_text()), (exp / "results.txt").read_text()
        parent, children = _runs(self.uri, "tiny")
        self.partial_statuses = parent.info.status, [c.info.status for c in children]

    def result(self) -> InterruptedSweep:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        """Whatever it started and is still running, killed (a test that failed first, or was not reached)."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.thread.join()


@pytest.fixture(scope="module", autouse=True)
def interrupted_sweep(request, tmp_path_factory: pytest.TempPathFactory):
    """The sweep of ``KILL_TEST``, started with the module when that test is to run."""
    if not any(getattr(item, "module", None) is request.module and item.name == KILL_TEST
               for item in request.session.items):
        yield None
        return
    sweep = InterruptedSweep(tmp_path_factory.mktemp("sweep"))
    try:
        yield sweep
    finally:
        sweep.stop()


@pytest.mark.ray
@pytest.mark.slow
def test_killed_then_ctrl_c_tune_is_a_partial_killed_record_that_resumes_without_rerunning(
        interrupted_sweep: InterruptedSweep) -> None:
    """One experiment through both faults (one sweep serves both; each tune start costs Ray, MLflow
    and a dense training): killed (-9) once a trial has finished, resumed, Ctrl-C in the resumed run,
    resumed again to the end. ASHA may not stop a trial (grace period), so every trial must end done."""
    sweep = interrupted_sweep.result()
    root, exp, uri, env, command = sweep.root, sweep.exp, sweep.uri, sweep.env, sweep.command

    returncode, stderr = sweep.interrupted  # Ctrl-C
    assert returncode == 130, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]  # Tune logs its stop above it
    assert line.startswith("passray.tune: interrupted:") and f"--resume {exp}" in line, stderr[-3000:]
    results, text = sweep.partial
    assert results["partial"] is True and "unfinished" in [t["status"] for t in results["trials"]], results
    assert text.startswith("PARTIAL")
    parent, children = sweep.partial_statuses
    assert parent == "KILLED"
    assert children and set(children) <= {"KILLED", "FINISHED"}, children

    # another config is refused before anything starts; it only reads the experiment, so it runs beside the resume
    changed = sweep.start("--resume", str(exp), "--set", "budget.keep_ratio=0.2", console="changed")
    resumed = subprocess.run([*command, "--resume", "ray_results/tiny"], env=env, cwd=root, capture_output=True,
                             text=True, timeout=15 * ONE_MINUTE)  # relative, as README shows
    changed.wait(timeout=5 * ONE_MINUTE)
    assert changed.returncode == 2
    assert "config key 'budget.keep_ratio'" in _one_error_line((root / "changed.err").read_text(), "passray.tune")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    finished = sweep.finished
    assert {p: p.read_text().count(DONE) for p in finished} == finished  # neither resume re-ran a finished trial
    results = json.loads((exp / "results.json").read_text())
    assert results["partial"] is False and [t["status"] for t in results["trials"]] == ["done"] * 3, results
    parent, children = _runs(uri, "tiny")
    assert parent.info.status == "FINISHED"
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}  # killed runs were resumed
