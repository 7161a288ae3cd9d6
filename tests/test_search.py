"""The PASS search on the embedded default: it learns (its masks beat training the head alone under
the initial masks), and it shows what it did (per-epoch overlaps and widths, search.png)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from passray.config import load_config
from passray.pipeline import Runtime, run

QUICKSTART = Path(__file__).resolve().parents[1] / "tune_configs" / "quickstart.yaml"


def _run(tmp_path: Path, name: str, *extra: str) -> dict:
    cfg = load_config(QUICKSTART, ["budget.keep_ratio=0.12", "search.epochs=3", "finetune.epochs=0",
                                   f"output_dir={tmp_path / name}", *extra])
    return run(cfg, Runtime(progress=False, export_dir=str(tmp_path / name)))


@pytest.mark.slow
def test_search_beats_head_training_under_the_initial_masks(tmp_path: Path) -> None:
    """Same epochs, same head and prompt training; only the hypernet's freedom to move the masks differs
    (warmup_epochs = search.epochs keeps the prior's masks all along)."""
    searched = _run(tmp_path, "searched")
    head_only = _run(tmp_path, "head_only", "hypernet.warmup_epochs=3")
    search = [h for h in searched["history"] if h["stage"] == "search"]
    assert searched["search_best_val_accuracy"] >= head_only["search_best_val_accuracy"] + 0.02, (searched, head_only)
    best = max(search, key=lambda h: h["val_accuracy"])
    assert best["mask_overlap_initial"] < 0.95  # the masks that won are not the initial ones
    assert all(0.11 <= h["macs_ratio"] <= 0.12 for h in search), [h["macs_ratio"] for h in search]  # budget met
    structure = json.loads((tmp_path / "searched" / "structure.json").read_text())
    assert structure["search"]["kept_per_epoch"][-1] == search[-1]["kept_per_group"]
    assert len(structure["search"]["val_per_epoch"]) == 3
    assert (tmp_path / "searched" / "search.png").stat().st_size > 10_000
