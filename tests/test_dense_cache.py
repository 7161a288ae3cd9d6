"""The dense-backbone cache: a backbone trained once per (data, model, recipe, seed) is reused.

Every test has a cache of its own (``conftest._own_caches`` points $PASSRAY_DENSE_CACHE at
an empty tmp dir). Tiny runs: convnet width 0.25 on 16x16 synthetic images, 32 train images.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from passray import dense_cache
from passray.config import load_config

TINY = ["model.arch=convnet", "model.width=0.25", "data.name=synthetic", "data.num_samples=64", "data.image_size=16",
        "data.batch_size=8", "data.eval_batch_size=64", "data.augment=false", "data.limit_train=32", "pretrain.epochs=1",
        "search.epochs=1", "finetune.epochs=1", "bn_recalibration_batches=2", "device=cpu"]
CPU = torch.device("cpu")
REUSED = re.compile(r"^reusing dense backbone (\S+) \(trained \d{4}-\d\d-\d\d \d\d:\d\d, val \d+\.\d %\)$", re.M)


def _key(*extra: str) -> dict:
    return dense_cache.dense_key(load_config(None, [*TINY, *extra]), CPU)


@pytest.mark.parametrize("change", ["data.limit_train=16", "data.classes=[0,1]", "data.seed=1", "data.augment=true",
                                    "data.batch_size=4", "model.width=0.5", "pretrain.lr=0.05", "pretrain.epochs=2",
                                    "pretrain.label_smoothing=0.1", "seed=1"])
def test_what_the_dense_weights_depend_on_changes_the_key(change: str) -> None:
    assert _key(change) != _key()


@pytest.mark.parametrize("change", ["method=l1", "budget.keep_ratio=0.3", "prompt.kind=none", "hypernet.hidden_size=8",
                                    "search.epochs=3", "finetune.lr=0.1", "head_epochs=2", "data.eval_batch_size=7",
                                    "output_dir=elsewhere", "pretrain.cache=false", "tracking.experiment=x"])
def test_what_only_pruning_reads_does_not(change: str) -> None:
    assert _key(change) == _key()


def test_the_key_reads_the_content_of_starting_weights_and_the_run_layout(tmp_path: Path) -> None:
    start = tmp_path / "start.safetensors"
    start.write_bytes(b"one")
    first = _key(f"model.weights={start}")
    start.write_bytes(b"two")
    assert _key(f"model.weights={start}") != first
    assert dense_cache.dense_key(load_config(None, TINY), CPU, world_size=2) != _key()


def test_a_second_pretraining_reuses_the_first(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from passray.pipeline import Runtime, pretrain

    first = pretrain(load_config(None, TINY), tmp_path / "a.safetensors", Runtime(progress=False))
    assert not first["dense_reused"] and "stored dense backbone" in capsys.readouterr().out
    weights, record = dense_cache.entry_paths(_key())
    assert json.loads(record.read_text())["val_accuracy"] == first["val_accuracy"]

    # another method, budget and search: the same dense backbone
    again = load_config(None, [*TINY, "method=l1", "budget.keep_ratio=0.3", "search.epochs=3"])
    second = pretrain(again, tmp_path / "b.safetensors", Runtime(progress=False))
    printed = REUSED.findall(capsys.readouterr().out)
    assert second["dense_reused"] and printed == [str(weights)]
    assert (second["val_accuracy"], second["test_accuracy"]) == (first["val_accuracy"], first["test_accuracy"])
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()

    off = pretrain(load_config(None, [*TINY, "pretrain.cache=false"]), tmp_path / "c.safetensors", Runtime(progress=False))
    assert not off["dense_reused"] and not REUSED.findall(capsys.readouterr().out)
    changed = pretrain(load_config(None, [*TINY, "pretrain.lr=0.05"]), tmp_path / "d.safetensors", Runtime(progress=False))
    assert not changed["dense_reused"] and len(list(weights.parent.glob("*.json"))) == 2


def _state(width: float) -> dict[str, torch.Tensor]:
    from passray.models import create_backbone

    cfg = load_config(None, [*TINY, f"model.width={width}"])
    return create_backbone(cfg.model, 10).state_dict()  # synthetic data: 10 classes


@pytest.mark.parametrize("damage", ["record", "weights", "foreign"])
def test_a_corrupt_entry_is_ignored_with_one_warning_and_trained_again(damage: str, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    from passray.pipeline import Runtime, pretrain

    key = _key()
    weights, record = dense_cache.entry_paths(key)
    dense_cache.store(key, _state(0.5 if damage == "foreign" else 0.25), {"val_accuracy": 0.5, "test_accuracy": 0.5})
    if damage == "record":
        record.write_text("{not json")
    elif damage == "weights":
        weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="passray.dense_cache"):
        out = pretrain(load_config(None, TINY), tmp_path / "w.safetensors", Runtime(progress=False))
    assert not out["dense_reused"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0] and warnings[0].startswith(f"ignoring the cached dense backbone {record}")
    assert dense_cache.load(key, _state(0.25)) is not None  # replaced by the sound entry of this training


def test_a_reused_backbone_gives_the_run_a_trained_one_would(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """prune twice: the second run reuses the backbone and, from there on, does exactly what the first did."""
    from safetensors.torch import load_file

    from passray.prune import main

    first = main(["--set", f"output_dir={tmp_path / 'a'}", *(f"--set={o}" for o in TINY)])
    second = main(["--set", f"output_dir={tmp_path / 'b'}", *(f"--set={o}" for o in TINY)])
    assert len(REUSED.findall(capsys.readouterr().out)) == 1
    assert (first["dense_reused"], second["dense_reused"]) == (False, True)
    assert [h["stage"] for h in first["history"]] == ["pretrain", *(h["stage"] for h in second["history"])]
    for key in ("dense_val_accuracy", "search_best_val_accuracy", "val_accuracy", "test_accuracy", "pruned_macs"):
        assert second[key] == first[key], key
    a, b = load_file(str(tmp_path / "a" / "weights.safetensors")), load_file(str(tmp_path / "b" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
