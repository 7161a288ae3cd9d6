"""``python -m passray.transfer``: reuse a registered hypernet or structure on a new dataset.

Modes, each fine-tuned and reported against a fresh search at the same budget:
- ``zero-shot``: the registered hypernet, frozen, picks the masks; only the prompt (and the
  new head) are fitted for ``--prompt-epochs``;
- ``warm-start``: PASS search continues from the registered hypernet;
- ``mask``: the registered structure's kept channels are used as they are (the head is
  trained ``head_epochs``, or ``search.epochs`` if that is 0);
- ``fresh``: PASS search from scratch (the reference).
Every run is an MLflow child run tagged with the source model version (lineage). The modes
share one dense backbone: with pretraining configured, the first mode trains it and the
others reuse it (``pretrain.cache``); ``search_seconds`` counts from the moment it is ready.
A hypernet depends on no width: ``zero-shot`` and ``warm-start`` also run on a backbone of
other widths (its prior is taken anew on the new data); ``mask`` needs the same group layout.
Incompatible sources fail with one line before anything is trained.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from passray._cli import format_table, load_from_args, make_parser, run_cli
from passray.config import Config
from passray.pipeline import Runtime, run
from passray.registry import describe, find, load_registered_hypernet, load_registered_structure
from passray.tracking import Tracker, resolve_uri

__all__ = ["MODES", "main", "mode_setup", "transfer"]

MODES = ("zero-shot", "warm-start", "mask", "fresh")
COLUMNS = ["mode", "source", "macs_ratio", "initial_masked_val_accuracy", "val_accuracy_before_finetune",
           "val_accuracy", "test_accuracy", "pretrain_seconds", "search_seconds", "wall_seconds"]


class _Reporter:
    """Per-epoch metrics to the mode's MLflow child run; times the search from the moment the dense
    backbone was ready (the run's ``pretrain_seconds``: loading data, then training or reusing it)."""

    def __init__(self, tracker: Tracker, run_id: str, clock: Callable[[], float] = time.time) -> None:
        self.tracker, self.run_id, self.clock = tracker, run_id, clock
        self.started, self.search_seconds = clock(), 0.0

    def report(self, metrics: dict[str, Any], save_state) -> None:
        self.tracker.log_metrics(self.run_id, metrics)
        if metrics.get("stage") == "search":
            self.search_seconds = self.clock() - self.started - metrics.get("pretrain_seconds", 0.0)


def _aligned(cfg: Config, spec: dict[str, Any]) -> Config:
    """The hypernet's own sizes and prompt win over the config's (they define its weights)."""
    prompt = spec.get("prompt", {})
    return cfg.derive({"hypernet.hidden_size": spec["hidden_size"], "hypernet.recurrent": spec["recurrent"],
                       "hypernet.stats_length": spec["stats_length"], "hypernet.prior": spec["prior"],
                       "prompt.kind": prompt.get("kind", cfg.prompt.kind), "prompt.size": prompt.get("size", cfg.prompt.size),
                       "method": "pass"})


def _structure_uri(source: dict[str, Any], uri: str) -> str:
    """The structure registered from the same run as the hypernet."""
    for entry in find(kind="structure", arch=source["tags"].get("arch"), tracking_uri=uri):
        if entry["tags"].get("source_run") == source["tags"].get("source_run"):
            return entry["uri"]
    raise ValueError(f"no registered structure comes from the run of {source['uri']}; pass --structure")


def _check_compatible(cfg: Config, structure: dict[str, Any] | None) -> None:
    """Refuse a structure whose groups do not fit the target backbone, before training."""
    if structure is None:
        return
    from passray.data import load_dataset
    from passray.export import masks_from_structure
    from passray.groups import build_groups
    from passray.models import create_backbone

    ds = load_dataset(cfg.data)
    groups = build_groups(create_backbone(cfg.model.model_copy(update={"weights": None}), ds.num_classes), ds.image_size)
    masks_from_structure(structure, groups, source="registered structure")


def mode_setup(cfg: Config, mode: str, hypernet=None, structure: dict[str, Any] | None = None,
               prompt_epochs: int = 1) -> tuple[Config, Runtime]:
    """The config and runtime of one mode; each mode gets its own copy of the source hypernet."""
    if mode == "zero-shot":
        return (cfg.derive({"search.epochs": prompt_epochs}),
                Runtime(progress=False, hypernet=copy.deepcopy(hypernet), freeze_hypernet=True))
    if mode == "warm-start":
        return cfg, Runtime(progress=False, hypernet=copy.deepcopy(hypernet))
    if mode == "mask":  # no search: the head gets the epochs a search would have given it, as baselines do
        head = cfg.head_epochs or cfg.search.epochs
        return cfg.derive({"head_epochs": head}), Runtime(progress=False, structure=structure)
    if mode == "fresh":
        return cfg, Runtime(progress=False)
    raise ValueError(f"transfer mode must be one of {', '.join(MODES)}, got {mode!r}")


def transfer(cfg: Config, source_uri: str, modes: list[str], structure_uri: str | None = None,
             prompt_epochs: int = 1) -> list[dict[str, Any]]:
    uri = resolve_uri(cfg.tracking.uri)
    tracker = Tracker(uri)
    source = describe(source_uri, tracking_uri=uri)
    hypernet, spec = load_registered_hypernet(source["uri"], tracking_uri=uri)
    cfg = _aligned(cfg, spec)
    structure = None
    if "mask" in modes:
        structure_uri = structure_uri or _structure_uri(source, uri)
        structure, _ = load_registered_structure(structure_uri, tracking_uri=uri)
    _check_compatible(cfg, structure)
    lineage = {"passray.source_model": source["name"], "passray.source_version": str(source["version"]),
               "passray.source_uri": source_uri, "passray.source_run": source["tags"].get("source_run", "")}
    parent = tracker.start_parent(cfg.tracking.experiment, f"transfer-{source['name']}-v{source['version']}",
                                  params=cfg.flat(), tags=lineage)
    rows = []
    for number, mode in enumerate(modes, 1):
        print(f"[transfer] {mode} ({number}/{len(modes)}) started", flush=True)
        mode_cfg, runtime = mode_setup(cfg, mode, hypernet, structure, prompt_epochs)
        child = tracker.start_child(parent, mode, params=mode_cfg.flat(), tags={**lineage, "passray.transfer_mode": mode})
        reporter = _Reporter(tracker, child)
        runtime.reporter = reporter
        with tempfile.TemporaryDirectory(prefix="passray-transfer-") as export:
            runtime.export_dir = export
            try:
                result = run(mode_cfg, runtime)
            except BaseException:
                tracker.end(child, "FAILED")
                raise
            tracker.log_export(child, export)
        tracker.end(child, "FINISHED")
        rows.append({"mode": mode, "source": f"{source['name']} v{source['version']}",
                     "search_seconds": reporter.search_seconds, **result})
        print(f"[transfer] {mode} ({number}/{len(modes)}) done: val {100 * result['val_accuracy']:.1f} %, "
              f"test {100 * result['test_accuracy']:.1f} % in {result['wall_seconds']:.0f} s "
              f"(dense {result['pretrain_seconds']:.0f} s, search {reporter.search_seconds:.0f} s)", flush=True)
    tracker.log_dict(parent, rows, "transfer.json")
    tracker.end(parent, "FINISHED")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = make_parser("passray.transfer", __doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", required=True, help="models:/passray-hypernet-<arch>@champion or /VERSION")
    parser.add_argument("--structure", help="registered structure for --modes mask (default: the hypernet's sibling)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--prompt-epochs", type=int, default=1, help="zero-shot: epochs fitting only prompt and head")
    args = parser.parse_args(argv)
    cfg = load_from_args(args)
    rows = transfer(cfg, args.source, args.modes, args.structure, args.prompt_epochs)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer.json").write_text(json.dumps(rows, indent=1, default=str))
    print(format_table(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    run_cli(main, "passray.transfer")
