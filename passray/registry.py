"""MLflow 3 model registry for transferable hypernets and pruned structures.

An export becomes up to two MLflow 3 LoggedModels, new versions of ``passray-hypernet-<arch>``
and ``passray-structure-<arch>`` (``timm:resnet18d`` -> ``timm-resnet18d``), tagged for search
(dataset, arch, backbone_id, method, keep_ratio, macs_ratio, macs, accuracies, prompt, source_run).

No pickle: the models are pyfunc *models-from-code* (``python_model`` is the path of
``passray/_pyfunc_model.py``, which MLflow copies; no ``python_model.pkl``), the weights are
the export's safetensors + JSON, and loads go through ``load_hypernet`` / ``load_pruned``.

Aliases, recomputed from the tags at each registration (highest ``val_accuracy``; on a tie
the earlier version keeps it): ``champion`` = best of the arch at any budget, ``champion-k50``
= best at keep_ratio 0.50 (2 decimals). ``promote`` moves one by hand until the next
registration. Datasets share a name: narrow with ``find(dataset=...)``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator

import yaml

from passray._cli import format_table, run_cli
from passray.tracking import Tracker, masks_summary, resolve_uri

# Registering downloads each small artifact once to validate it; MLflow's per-download progress
# bars would bury the results table in dozens of lines. Set the variable to "true" to see them.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

__all__ = ["KINDS", "budget_alias", "describe", "find", "load_registered_hypernet", "load_registered_structure", "main",
           "model_name", "promote", "register_export", "register_run", "resolve"]

KINDS = ("hypernet", "structure")
_log = logging.getLogger(__name__)
CODE_PATH = Path(__file__).with_name("_pyfunc_model.py")
_ARTIFACT_KEY = {"hypernet": "hypernet", "structure": "export"}  # pyfunc artifact name of each kind
_FLOAT = re.compile(r"-?\d+(\.\d*)?(e[-+]?\d+)?")
MODEL_CACHE_ENV = "PASSRAY_MODEL_CACHE"
_URI = re.compile(r"^(?:models:/)?(?P<name>[\w.-]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))?$")


def model_name(kind: str, arch: str) -> str:
    """``passray-<kind>-<arch>``, the arch reduced to letters, digits, ``.``, ``_``, ``-``."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    return f"passray-{kind}-" + re.sub(r"[^\w.-]+", "-", arch).strip("-")


def budget_alias(keep_ratio: float, base: str = "champion") -> str:  # 0.5 -> champion-k50
    return f"{base}-k{round(float(keep_ratio) * 100):02d}"


@contextmanager
def _mlflow_at(uri: str) -> Iterator[Any]:
    """A client for ``uri`` (checked reachable first), with MLflow's global URI set to it (Model.log reads
    that one); MLflow errors leave as one-line ValueErrors."""
    import mlflow

    client = Tracker(uri).client
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield client
    except mlflow.exceptions.MlflowException as err:
        raise ValueError(str(err.message).splitlines()[0]) from None
    finally:
        mlflow.set_tracking_uri(previous)


def _paged(call, *args, **kwargs) -> list[Any]:
    items = page = call(*args, **kwargs)
    while page.token:  # MLflow pages: 100 registered models, 10000 versions by default
        items = [*items, *(page := call(*args, page_token=page.token, **kwargs))]
    return list(items)


def _version_tags(structure: dict[str, Any], spec: dict[str, Any] | None, run_id: str) -> dict[str, str]:
    results, budget, prompt = structure.get("results", {}), structure.get("budget", {}), structure["prompt"]
    tags = {"dataset": structure.get("data", {}).get("name"), "arch": structure["model"]["arch"],
            "backbone_id": structure["backbone_id"], "method": structure.get("method"),
            "keep_ratio": budget.get("keep_ratio"), "budget_kind": budget.get("kind"),
            "macs_ratio": results.get("macs_ratio"), "macs": structure.get("macs", {}).get("pruned"),
            "val_accuracy": results.get("val_accuracy"), "test_accuracy": results.get("test_accuracy"),
            "prompt_kind": prompt["kind"], "prompt_size": prompt["size"], "num_classes": structure["num_classes"],
            "hidden_size": (spec or {}).get("hidden_size"), "source_run": run_id}
    return {k: str(v) for k, v in tags.items() if v is not None}


def _log_and_register(uri: str, kind: str, artifact_dir: Path, run_id: str, tags: dict[str, str],
                      structure: dict[str, Any], alias: str) -> dict[str, Any]:
    """A LoggedModel (models-from-code + artifacts) of ``run_id``, registered as a new version; aliases updated.
    A run that already has a version of this model keeps it: nothing is logged or moved.

    Explicit requirements skip MLflow's inference (a subprocess that loads the model); MLflow
    runs the input example through the logged model, which checks that it loads."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    import passray

    name, tags = model_name(kind, tags["arch"]), {**tags, "kind": kind}
    with _mlflow_at(uri) as client:  # the same run registered again (e.g. a resumed experiment): a no-op
        for entry in _versions(client, name):
            if entry["tags"].get("source_run") == run_id:
                model_id = getattr(client.get_model_version(name, str(entry["version"])), "model_id", None)
                return {"name": name, "version": entry["version"], "uri": entry["uri"], "model_id": model_id,
                        "aliases": entry["aliases"], "existing": True}
    shape = (-1,) if kind == "hypernet" else (-1, *map(int, structure["input_size"]))  # hypernet: input ignored
    outputs = None if kind == "hypernet" else Schema([TensorSpec(np.dtype(np.float32), (-1, int(structure["num_classes"])))])
    requirements = [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}", "safetensors",
                    "numpy", f"passray=={passray.__version__}"]
    with _mlflow_at(uri) as client:
        logged = client.create_logged_model(client.get_run(run_id).info.experiment_id, name=kind, source_run_id=run_id,
                                            tags=tags, model_type=f"passray-{kind}")
        Model.log(artifact_path=None, name=kind, flavor=mlflow.pyfunc, run_id=run_id, model_id=logged.model_id,
                  python_model=str(CODE_PATH), artifacts={_ARTIFACT_KEY[kind]: str(artifact_dir)},
                  pip_requirements=requirements, input_example=np.zeros((1, *shape[1:]), np.float32),
                  signature=ModelSignature(Schema([TensorSpec(np.dtype(np.float32), shape)]), outputs))
        with suppress(mlflow.exceptions.MlflowException):  # exists already; a real failure resurfaces below
            client.create_registered_model(name, description=f"passray {kind}s for {tags['arch']}")
        version = int(client.create_model_version(name, f"models:/{logged.model_id}", run_id, tags=tags,
                                                  model_id=logged.model_id).version)
        aliases = sorted(a for a, v in _update_aliases(client, name, alias).items() if v == version)
    return {"name": name, "version": version, "uri": f"models:/{name}/{version}", "model_id": logged.model_id,
            "aliases": aliases}


def _update_aliases(client: Any, name: str, base: str) -> dict[str, int]:
    """Point ``base`` at the best version and ``base-kNN`` at the best of each budget; returns alias -> version."""
    best: dict[str, tuple[tuple[float, int], int]] = {}
    for e in _versions(client, name):
        keys = [base] + ([budget_alias(float(e["tags"]["keep_ratio"]), base)] if "keep_ratio" in e["tags"] else [])
        for key in keys:
            best[key] = max(best.get(key, ((float("-inf"), 0), 0)), (_score(e), e["version"]))
    for alias, (_, version) in best.items():
        client.set_registered_model_alias(name, alias, str(version))
    return {alias: version for alias, (_, version) in best.items()}


def register_export(export_dir: str | Path, run_id: str | None = None, *, tracking_uri: str | None = None,
                    alias: str = "champion", experiment: str = "passray") -> dict[str, Any]:
    """Register an export's hypernet (if any) and structure; ``{"run_id", kind: {name, version, uri, aliases}}``.

    The export is loaded first: a tampered one is refused (the loader's one-line error) before anything is
    written. The export is logged to ``run_id`` unless there already; no run_id: a run ``register-<folder>``.
    The structure model also holds ``model.onnx`` (``passray.export.to_onnx``) when onnx is installed."""
    from passray.export import ONNX_FILE, OnnxUnavailable, load_pruned, to_onnx
    from passray.hypernet import load_hypernet

    export_dir = Path(export_dir)
    structure = load_pruned(export_dir)[1]
    spec = load_hypernet(export_dir / "hypernet")[1] if (export_dir / "hypernet").exists() else None
    tracker = Tracker(tracking_uri)
    if run_id is None:
        run_id = tracker.start_parent(experiment, f"register-{export_dir.resolve().name}")
        tracker.log_export(run_id, export_dir)
        tracker.end(run_id)
    elif not tracker.has_export(run_id):
        tracker.log_export(run_id, export_dir)
    tags, out = _version_tags(structure, spec, run_id), {"run_id": run_id}
    with tempfile.TemporaryDirectory(prefix="passray-register-") as staging:
        staged = Path(staging) / "export"  # the structure model: what load_pruned reads, masks.json, model.onnx
        staged.mkdir()
        for file in ("structure.json", "weights.safetensors"):
            shutil.copy2(export_dir / file, staged / file)
        (staged / "masks.json").write_text(json.dumps(masks_summary(structure), indent=1))
        try:  # the served form; a missing optional package never fails a registration
            to_onnx(staged)
        except OnnxUnavailable as err:
            _log.warning("registering %s without %s: %s", export_dir, ONNX_FILE, err)
        sources = {"structure": staged, **({"hypernet": export_dir / "hypernet"} if spec is not None else {})}
        for kind in sorted(sources):
            out[kind] = _log_and_register(tracker.uri, kind, sources[kind], run_id, tags, structure, alias)
    return out


def register_run(run_id: str, *, tracking_uri: str | None = None, alias: str = "champion") -> dict[str, Any]:
    """Register the export ``run_id`` logged (``Tracker.log_export``)."""
    tracker = Tracker(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="passray-run-") as tmp:
        return register_export(tracker.download_export(run_id, tmp), run_id, tracking_uri=tracker.uri, alias=alias)


def _versions(client: Any, name: str) -> list[dict[str, Any]]:
    """Entries (name, version, uri, tags, aliases) of every version of ``name`` (a ``[\\w.-]+`` name)."""
    found = _paged(client.search_model_versions, f"name='{name}'")
    aliases = client.get_registered_model(name).aliases if found else {}  # searches leave aliases empty on some stores
    return [{"name": name, "version": int(v.version), "uri": f"models:/{name}/{v.version}", "tags": dict(v.tags),
             "aliases": sorted(a for a, n in aliases.items() if int(n) == int(v.version))} for v in found]


def _number(tags: dict[str, str], key: str) -> float:
    """A numeric tag; -inf when missing or not a number (ranks last, passes no bound)."""
    return float(tags[key]) if _FLOAT.fullmatch(tags.get(key, "")) else float("-inf")


def _score(entry: dict[str, Any]) -> tuple[float, int]:
    """Sort key: higher val_accuracy first, then the earlier version (the one aliases stay on)."""
    return _number(entry["tags"], "val_accuracy"), -entry["version"]


def find(arch: str | None = None, dataset: str | None = None, max_macs: float | None = None, alias: str | None = None,
         kind: str = "hypernet", *, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Versions of ``kind`` matching every filter, best ``val_accuracy`` first; each: name, version, uri, tags, aliases.

    ``max_macs`` <= 1 bounds the fraction of dense MACs (tag ``macs_ratio``), > 1 the MAC count (tag ``macs``)."""
    names = [model_name(kind, arch or "x")]
    with _mlflow_at(resolve_uri(tracking_uri)) as client:
        if arch is None:
            names = [m.name for m in _paged(client.search_registered_models, f"name LIKE 'passray-{kind}-%'")]
        found = [e for name in names for e in _versions(client, name)]
    key = "macs_ratio" if max_macs is not None and max_macs <= 1 else "macs"
    found = [e for e in found if (dataset is None or e["tags"].get("dataset") == dataset)
             and (alias is None or alias in e["aliases"])
             and (max_macs is None or -float("inf") < _number(e["tags"], key) <= max_macs)]
    return sorted(found, key=_score, reverse=True)


def _parse(uri: str) -> tuple[str, str | None, str | None]:
    match = _URI.match(uri.strip())
    if match is None:
        raise ValueError(f"not a registered model URI: {uri!r} (expected models:/NAME/VERSION or models:/NAME@ALIAS)")
    return match["name"], match["version"], match["alias"]


def _lookup(client: Any, uri: str) -> Any:
    """The ModelVersion ``uri`` names; None if it names a model but no version or alias."""
    import mlflow

    name, version, alias = _parse(uri)
    if not _paged(client.search_registered_models, f"name = '{name}'"):
        raise ValueError(f"unknown registered model {name!r}")
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return None if version is None else client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException:
        if alias is not None:
            known = ", ".join(sorted(client.get_registered_model(name).aliases)) or "none"
            raise ValueError(f"registered model {name!r} has no alias {alias!r} (its aliases: {known})") from None
        versions = sorted(int(v.version) for v in _paged(client.search_model_versions, f"name='{name}'"))
        raise ValueError(f"registered model {name!r} has no version {version} "
                         f"(its versions: {', '.join(map(str, versions)) or 'none'})") from None


def _required(client: Any, uri: str) -> Any:
    """The ModelVersion ``uri`` names; a bare model name is refused with the forms that work."""
    version = _lookup(client, uri)
    if version is None:
        raise ValueError(f"{uri!r} names no version or alias: write models:/NAME@ALIAS (e.g. @champion) "
                         "or models:/NAME/VERSION")
    return version


def _cached_version(store: str, version: Any) -> Path:
    """Where ``resolve`` keeps a registered version: ``$PASSRAY_MODEL_CACHE`` or ``~/.cache/passray/models``,
    then ``NAME/VERSION-DIGEST``; the digest (store, creation time, run) tells apart two stores, and a
    version number given again after its model was deleted."""
    root = Path(os.environ.get(MODEL_CACHE_ENV) or "~/.cache/passray/models").expanduser()
    identity = json.dumps([store, version.name, str(version.version), version.creation_timestamp, version.run_id])
    return root / version.name / f"{version.version}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def resolve(uri: str, *, tracking_uri: str | None = None, dst: str | Path | None = None) -> Path:
    """Download ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` into ``dst``.

    Without ``dst``, into a cache of registered versions (``_cached_version``) that later resolves
    of the same version reuse, instead of a temp dir nobody deletes: a registered version is a
    snapshot, and the directory outlives the call (``load_registered_structure`` returns it).
    Read it, do not write to it: later resolves of the version return the same directory."""
    import mlflow

    store = resolve_uri(tracking_uri)
    with _mlflow_at(store) as client:
        version = _required(client, uri)  # pin the version an alias points at now
        source = f"models:/{version.name}/{version.version}"
        if dst is not None:
            Path(dst).mkdir(parents=True, exist_ok=True)
            return Path(mlflow.artifacts.download_artifacts(source, dst_path=str(dst), tracking_uri=store,
                                                            registry_uri=store))
        target = _cached_version(store, version)
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            mlflow.artifacts.download_artifacts(source, dst_path=str(staging), tracking_uri=store, registry_uri=store)
            os.rename(staging, target)  # whole or absent; a concurrent resolve that got there first wins
        except OSError:
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _artifact_dir(model_dir: Path, key: str) -> Path:
    """Where the model's ``key`` artifact lies, as its MLmodel file says."""
    try:
        flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
        return model_dir / flavor["artifacts"][key]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        raise ValueError(f"{model_dir}: not a passray model with a {key!r} artifact") from None


def load_registered_hypernet(uri: str, *, tracking_uri: str | None = None) -> tuple[Any, dict[str, Any]]:
    """(PassHypernet, spec) of a registered hypernet, validated by ``load_hypernet``."""
    from passray.hypernet import load_hypernet  # late: torch

    return load_hypernet(_artifact_dir(resolve(uri, tracking_uri=tracking_uri), "hypernet"))


def load_registered_structure(uri: str, *, tracking_uri: str | None = None) -> tuple[dict[str, Any], Path]:
    """(structure dict, local export dir), validated by ``load_pruned``; ``load_pruned(dir)`` gives the net."""
    from passray.export import load_pruned

    directory = _artifact_dir(resolve(uri, tracking_uri=tracking_uri), "export")
    return load_pruned(directory)[1], directory


def describe(uri: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """Name, version (an alias resolved to the version it points at now) and tags: for lineage."""
    with _mlflow_at(resolve_uri(tracking_uri)) as client:
        version = _required(client, uri)
        return {"name": version.name, "version": int(version.version), "tags": dict(version.tags or {}),
                "uri": f"models:/{version.name}/{version.version}"}


def promote(name: str, version: int | str, alias: str = "champion", *, tracking_uri: str | None = None) -> None:
    """Point ``alias`` at version ``version`` of ``name``."""
    with _mlflow_at(resolve_uri(tracking_uri)) as client:
        _lookup(client, f"models:/{name}/{int(version)}")
        client.set_registered_model_alias(name, alias, str(int(version)))


# ---------------------------------------------------------------- CLI
_COLUMNS = ["name", "version", "aliases", "dataset", "method", "keep_ratio", "macs_ratio", "val_accuracy",
            "test_accuracy", "source_run"]


def _rows(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**{k: float(v) if _FLOAT.fullmatch(v) and "." in v else v for k, v in e["tags"].items()}, "name": e["name"],
             "version": e["version"], "aliases": ",".join(e["aliases"]) or "-"} for e in entries]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="passray.registry", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    alias = ("--alias", {"default": "champion"})
    for command, text, arguments in [
            ("list", "registered passray models and their aliases", []),
            ("show", "versions of a model, or one version's tags", [("model", {"metavar": "NAME[/VERSION|@ALIAS]"})]),
            ("promote", "point an alias at a version", [("name", {}), ("version", {"type": int}), alias]),
            ("find", "versions matching tags, best val_accuracy first",
             [("--arch", {}), ("--dataset", {}), ("--alias", {}), ("--kind", {"choices": KINDS, "default": "hypernet"}),
              ("--max-macs", {"type": float, "help": "<= 1: fraction of dense MACs; > 1: MAC count"})]),
            ("register", "register an export directory or the export a run logged",
             [("source", {"metavar": "RUN_ID_OR_EXPORT_DIR"}), alias])]:
        command_parser = sub.add_parser(command, help=text)
        for flag, options in arguments:
            command_parser.add_argument(flag, **options)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    uri = resolve_uri(args.tracking_uri)
    if args.command == "list":
        entries = [e for kind in KINDS for e in find(kind=kind, tracking_uri=uri)]
        rows = [{"name": n, "versions": sum(e["name"] == n for e in entries),
                 "aliases": " ".join(f"{a}={e['version']}" for e in entries if e["name"] == n for a in e["aliases"])}
                for n in sorted({e["name"] for e in entries})]
        print(format_table(rows, ["name", "versions", "aliases"]))
    elif args.command == "show":
        name = _parse(args.model)[0]
        with _mlflow_at(uri) as client:
            chosen = _lookup(client, args.model)
            entries = sorted(_versions(client, name), key=_score, reverse=True)
        entry = next((e for e in entries if chosen is not None and e["version"] == int(chosen.version)), None)
        print(format_table(_rows(entries), _COLUMNS) if entry is None else "\n".join(
            f"{k}: {v}" for k, v in [("uri", entry["uri"]), ("aliases", ",".join(entry["aliases"]) or "-"),
                                     *sorted(entry["tags"].items())]))
    elif args.command == "promote":
        promote(args.name, args.version, args.alias, tracking_uri=uri)
        print(f"{args.name}@{args.alias} -> version {args.version}")
    elif args.command == "find":
        entries = find(args.arch, args.dataset, args.max_macs, args.alias, args.kind, tracking_uri=uri)
        print(format_table(_rows(entries), _COLUMNS))
    else:
        if not Path(args.source).is_dir() and not re.fullmatch(r"[0-9a-f]{32}", args.source):
            raise ValueError(f"{args.source!r} is neither an export directory nor an MLflow run id")
        register = register_export if Path(args.source).is_dir() else register_run
        out = register(args.source, tracking_uri=uri, alias=args.alias)
        rows = [{"kind": k, **v, "aliases": ",".join(v["aliases"]) or "-"} for k, v in out.items() if k != "run_id"]
        print(format_table(rows, ["kind", "name", "version", "aliases"]))


if __name__ == "__main__":
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    run_cli(main, "passray.registry")
