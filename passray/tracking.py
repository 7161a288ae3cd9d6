"""MLflow runs for passray: where to log, a fail-fast reachability check, and a ``Tracker``.

Every call names its run id and goes through one ``MlflowClient``: Tune trials log from
Ray workers in other processes, where MLflow's fluent "active run" stack does not exist.
A parent run per sweep and one child run per trial (``mlflow.parentRunId``); a child with
the same name under the same parent is reused, so a restarted trial resumes its run.

Facts this module relies on (MLflow 3.x, ``mlflow/utils/validation.py``): a param value
may hold 6000 characters, a key 250, and one ``log_batch`` 100 params / 1000 metrics.
Params are immutable: logging the same key again with another value fails.

Opening a sqlite store creates or migrates its schema, which is not safe to run twice at once:
two processes opening a new ``mlflow.db`` together fail (one or both) and can leave it
half-migrated. An exclusive ``fcntl`` lock on ``<db>.lock`` next to the database serialises
opening it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

__all__ = ["EXPORT_ARTIFACT_PATH", "Tracker", "check_reachable", "masks_summary", "resolve_uri", "scalar_metrics"]

MAX_PARAM_LENGTH = 6000  # MAX_PARAM_VAL_LENGTH in mlflow/utils/validation.py
MAX_KEY_LENGTH = 250
EXPORT_ARTIFACT_PATH = "export"  # runs:/<id>/export is itself an export directory


def resolve_uri(cfg_uri: str | None = None) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (the registry needs a DB)."""
    return cfg_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Held while a client opens the store, nothing for a server. For a sqlite file: exclusive while the
    file is new (opening creates the schema), shared once it has content (opening only reads the schema).
    Several trial processes then open one store at once, while a creator still excludes them all."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    made = db.is_file() and db.stat().st_size > 0
    with open(db.with_name(f"{db.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH if made else fcntl.LOCK_EX)  # released when the file closes
        yield


def _open_client(uri: str):
    """An ``MlflowClient`` on ``uri`` (which creates or migrates a sqlite schema), under the store lock.

    A store that cannot be opened (e.g. half-migrated) is a one-line ``RuntimeError`` naming it;
    MLflow's own log of the schema work (its tracebacks included) is silenced meanwhile, since
    that error says it all (``--debug`` shows the chained cause)."""
    import mlflow
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    schema_log = logging.getLogger("mlflow.store.db.utils")
    level = schema_log.level
    schema_log.setLevel(logging.CRITICAL)
    try:
        with _store_lock(uri):
            return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    except (mlflow.exceptions.MlflowException, SQLAlchemyError, CommandError) as err:
        detail = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        hint = ("; a database another process was creating when it failed? Move it away to start a new one"
                if _sqlite_path(uri) else "")
        raise RuntimeError(f"MLflow tracking store at {uri} cannot be opened: {detail}{hint}") from err
    finally:
        schema_log.setLevel(level)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise a one-line ``RuntimeError`` now, before any training, if ``uri`` cannot be logged to.

    http(s): one GET of ``/health`` with a short timeout (MLflow's own client would retry
    for minutes). sqlite: the database's folder must be writable. Other schemes pass.
    """
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                response.read(64)
        except urllib.error.HTTPError as err:
            if err.code >= 500:
                raise RuntimeError(f"MLflow tracking server at {uri} is unreachable: HTTP {err.code}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise RuntimeError(f"MLflow tracking server at {uri} is unreachable: {reason}") from None
        return
    db = _sqlite_path(uri)
    if db is not None:
        folder = db.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RuntimeError(f"MLflow tracking store at {uri} is unreachable: {folder}: {err.strerror}") from None
        if not os.access(folder, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise RuntimeError(f"MLflow tracking store at {uri} is unreachable: {folder} is not writable")


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM_LENGTH else text[:MAX_PARAM_LENGTH - 3] + "..."


def scalar_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """What Ray and MLflow may carry: bool/int/str and finite floats; nested dicts become dotted keys.

    Tensors are refused by ``ray.train.report`` and the controller's snapshot is JSON, so
    one-element tensors and numpy scalars become Python numbers; None, NaN/inf and
    anything else are dropped. Strings (``stage``) are kept: the V2 controller stores
    metrics as JSON and Tune accepts them.
    """
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalar_metrics(value, f"{name}."))
            continue
        if hasattr(value, "item") and (getattr(value, "shape", None) == () or getattr(value, "numel", lambda: 0)() == 1):
            value = value.item()  # a one-element tensor, a numpy scalar
        if isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
            out[name] = value
    return out


def masks_summary(structure: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Group name -> kept count, width and keep fraction, from a ``structure.json`` dict."""
    return {g["name"]: {"kept": len(g["kept"]), "width": g["width"], "keep_fraction": len(g["kept"]) / g["width"]}
            for g in structure["groups"]}


class Tracker:
    """Thin, run-id-explicit wrapper over ``mlflow.MlflowClient``.

    ``check=True`` calls ``check_reachable`` at construction. For http(s) stores it also
    lowers MLflow's client retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``/``_TIMEOUT``, only
    when unset) so a server that dies mid-run costs seconds, not minutes.
    """

    def __init__(self, uri: str | None = None, *, check: bool = True) -> None:
        self.uri = resolve_uri(uri)
        if check:
            check_reachable(self.uri)
        if self.uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.client = _open_client(self.uri)

    # ------------------------------------------------------------------ runs
    def experiment_id(self, name: str) -> str:
        """Get or create; a sqlite store keeps artifacts in ``mlartifacts/`` next to the DB, not in the cwd."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        db = _sqlite_path(self.uri)
        if db is not None:
            location = (db.parent / "mlartifacts" / re.sub(r"[^\w.-]+", "_", name)).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created concurrently by another worker
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _find_run(self, experiment_id: str, run_name: str, parent_run_id: str | None) -> str | None:
        quoted = json.dumps(run_name)  # double-quoted literal, escapes included
        where = f"attributes.run_name = {quoted}"
        if parent_run_id:
            where += f" and tags.mlflow.parentRunId = '{parent_run_id}'"
        runs = self.client.search_runs([experiment_id], where, max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def start_parent(self, experiment: str, run_name: str, params: Mapping[str, Any] | None = None,
                     tags: Mapping[str, Any] | None = None, *, resume: bool = False) -> str:
        """A top-level run (one per sweep); ``resume=True`` reuses the newest run of that name."""
        exp_id = self.experiment_id(experiment)
        run_id = self._find_run(exp_id, run_name, None) if resume else None
        if run_id is None:
            tags = {k: str(v) for k, v in (tags or {}).items()}
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.log_params(run_id, params or {})
        return run_id

    def start_child(self, parent_run_id: str, run_name: str, params: Mapping[str, Any] | None = None,
                    tags: Mapping[str, Any] | None = None) -> str:
        """A run nested under ``parent_run_id``; the same name under the same parent resumes it."""
        exp_id = self.client.get_run(parent_run_id).info.experiment_id
        run_id = self._find_run(exp_id, run_name, parent_run_id)
        if run_id is None:
            all_tags = {"mlflow.parentRunId": parent_run_id, **{k: str(v) for k, v in (tags or {}).items()}}
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.log_params(run_id, params or {})
        return run_id

    def end(self, run_id: str, status: str = "FINISHED", *, if_running: bool = False) -> None:
        """status: FINISHED | FAILED | KILLED. ``if_running``: leave a run that has already ended as it is."""
        if if_running and self.client.get_run(run_id).info.status != "RUNNING":
            return
        self.client.set_terminated(run_id, status=status)

    def reopen(self, run_id: str) -> None:
        """A run ended (e.g. KILLED by an interruption) is RUNNING again while it is resumed."""
        self.client.update_run(run_id, status="RUNNING")

    def end_children(self, parent_run_id: str, status: str = "KILLED") -> list[str]:
        """End every child of ``parent_run_id`` still RUNNING (its process was killed before it could
        end it); returns their run ids."""
        exp_id = self.client.get_run(parent_run_id).info.experiment_id
        where = f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"
        runs = self.client.search_runs([exp_id], where, max_results=10_000)
        for run in runs:
            self.end(run.info.run_id, status)
        return [run.info.run_id for run in runs]

    # ------------------------------------------------------------------ data
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Values become strings (lists/dicts as JSON), truncated to MLflow's 6000 characters."""
        from mlflow.entities import Param

        items = [Param(str(k)[:MAX_KEY_LENGTH], _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
        """Logs the finite numbers of ``metrics`` (strings, bools, NaN, inf are skipped); returns them.

        ``step`` None: the metrics' own ``step`` (the pipeline's report index, which survives
        a resume), not logged as a metric itself; 0 when there is none.
        """
        import time

        from mlflow.entities import Metric

        if step is None:
            metrics = dict(metrics)
            step = metrics.pop("step", 0)
        now = int(time.time() * 1000)
        kept = {str(k)[:MAX_KEY_LENGTH]: float(v) for k, v in scalar_metrics(metrics).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
        items = [Metric(k, v, now, int(step)) for k, v in kept.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])
        return kept

    def log_config(self, run_id: str, cfg: Any) -> None:
        """A ``passray.config.Config``: dotted params + the whole tree as ``config.yaml``."""
        self.log_params(run_id, cfg.flat())
        self.client.log_dict(run_id, cfg.to_dict(), "config.yaml")

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_dict(self, run_id: str, data: Any, path: str) -> None:
        """JSON or YAML, picked by the file extension."""
        self.client.log_dict(run_id, data, path)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def log_figure(self, run_id: str, figure: Any, path: str) -> None:
        """A matplotlib or plotly figure, saved by MLflow as an image artifact."""
        self.client.log_figure(run_id, figure, path)

    def has_export(self, run_id: str) -> bool:
        """Whether ``run_id`` holds a logged export (``export/structure.json``); an unknown run is a ValueError."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            raise ValueError(f"unknown MLflow run {run_id!r} at {self.uri}") from None
        return any(a.path.endswith("/structure.json") for a in self.client.list_artifacts(run_id, EXPORT_ARTIFACT_PATH))

    def download_export(self, run_id: str, dst: str | Path) -> Path:
        """The export ``log_export`` logged to ``run_id``, downloaded under ``dst``; returns its folder."""
        if not self.has_export(run_id):
            raise ValueError(f"run {run_id} has no logged export ({EXPORT_ARTIFACT_PATH}/structure.json)")
        return Path(self.client.download_artifacts(run_id, EXPORT_ARTIFACT_PATH, str(dst)))

    def log_export(self, run_id: str, export_dir: str | Path, artifact_path: str = EXPORT_ARTIFACT_PATH) -> None:
        """structure.json, weights.safetensors, hypernet/, search.png (PASS) and masks.json under ``export/``.

        ``runs:/<id>/export`` is then an export directory on its own (``download_export``),
        which is what ``passray.registry register RUN_ID`` registers.
        """
        export_dir = Path(export_dir)
        structure_path = export_dir / "structure.json"
        if not structure_path.is_file():
            raise FileNotFoundError(f"{structure_path}: missing structure file")
        structure = json.loads(structure_path.read_text())
        for name in ("structure.json", "weights.safetensors", "search.png"):
            if (export_dir / name).is_file():
                self.client.log_artifact(run_id, str(export_dir / name), artifact_path)
        if (export_dir / "hypernet").is_dir():
            self.client.log_artifacts(run_id, str(export_dir / "hypernet"), f"{artifact_path}/hypernet")
        self.client.log_dict(run_id, masks_summary(structure), f"{artifact_path}/masks.json")
