"""Dense backbones trained once per (data, model, recipe, seed) and found again by later runs.

Pretraining is the longest stage and the same for every method, budget, search seed and
transfer mode, so ``prune``, ``train``, ``tune`` and ``transfer`` runs whose dense weights
would come out the same share one. An entry is ``<hash>.safetensors`` (the backbone's state
dict) and ``<hash>.json`` (key, accuracies, training seconds, date, the weights' sha256),
named by the hash of ``dense_key``: everything the weights depend on and nothing else.

Each file is written under a temporary name and renamed into place, the JSON last: a reader
sees a whole entry or none, and two runs storing the same key at once leave a whole one. A
corrupt entry (unreadable JSON, weights that differ from their sha256 or do not fit the
backbone) is ignored with a one-line warning; the run trains and replaces it.

Where: ``$PASSRAY_DENSE_CACHE``, else ``~/.cache/passray/dense``, on the machine of the
process that uses the weights (under Ray Train, rank 0's; the other ranks receive its
weights). Point the variable at shared storage (``runtime_env.env_vars``) to share one
cache between the nodes of a cluster.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch

import passray
from passray._state_io import write_atomically
from passray.config import Config

__all__ = ["ENV", "cache_root", "dense_key", "entry_paths", "load", "store"]

ENV = "PASSRAY_DENSE_CACHE"
_log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$PASSRAY_DENSE_CACHE``, else ``~/.cache/passray/dense``."""
    return Path(os.environ.get(ENV) or "~/.cache/passray/dense").expanduser()


def dense_key(cfg: Config, device: torch.device, world_size: int = 1) -> dict[str, Any]:
    """What pretrained weights depend on: the data and its split, the backbone and the weights it starts
    from (their content, not their path), the pretraining recipe, the seed, the passray version, and how
    the training ran (device kind, precision, memory format and workers all change the numbers).

    Not the method, budget, prompt, search, fine-tune, evaluation batch or output paths: runs that
    differ only there share one backbone, which is what makes their comparison fair."""
    cuda = device.type == "cuda"
    data = cfg.data.model_dump(exclude={"eval_batch_size", "cache"})
    if data["root"] is not None:
        data["root"] = str(Path(data["root"]).expanduser().resolve())
    model = cfg.model.model_dump()
    if model["weights"] not in (None, "hub"):
        model["weights"] = "sha256:" + hashlib.sha256(Path(model["weights"]).expanduser().read_bytes()).hexdigest()
    return {"passray": passray.__version__, "seed": cfg.seed, "data": data, "model": model,
            "pretrain": cfg.pretrain.model_dump(exclude={"cache"}), "device": device.type,
            "precision": "bf16" if cfg.amp and cuda else "fp32", "channels_last": cfg.channels_last and cuda,
            "world_size": world_size}


def entry_paths(key: dict[str, Any]) -> tuple[Path, Path]:
    """(weights, record) of ``key``'s entry, named by the first 16 hex digits of the key's sha256."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_root()
    return root / f"{digest}.safetensors", root / f"{digest}.json"


def load(key: dict[str, Any],
         expected: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(state dict, record) of ``key``'s entry, the record with the weights' ``path`` added; None when
    there is none, or (after a one-line warning) when it is corrupt or does not fit ``expected``."""
    weights, marker = entry_paths(key)
    if not marker.is_file():  # absent, or still being written (the record comes last)
        return None
    try:
        record = json.loads(marker.read_text())
        if record.get("key") != key:
            raise ValueError("its record is for another key")
        missing = sorted({"sha256", "created", "val_accuracy", "test_accuracy"} - record.keys())
        if missing:
            raise ValueError(f"its record lacks {', '.join(missing)}")
        data = weights.read_bytes()
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise ValueError(f"{weights.name} does not match the sha256 in its record")
        state = safetensors.torch.load(data)
        _check_fits(state, expected)
    except (OSError, ValueError, TypeError, AttributeError, safetensors.SafetensorError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        _log.warning("ignoring the cached dense backbone %s (%s: %s); training it again", marker,
                     type(err).__name__, reason)
        return None
    return state, {**record, "path": str(weights)}


def _check_fits(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Same names, shapes and dtypes: checked before loading, as a failed ``load_state_dict`` leaves
    the module half overwritten."""
    if state.keys() != expected.keys():
        raise ValueError(f"its tensors are not the backbone's ({len(state)} vs {len(expected)} names)")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape or state[name].dtype != tensor.dtype:
            raise ValueError(f"tensor {name!r} is {tuple(state[name].shape)} {state[name].dtype}, "
                             f"the backbone's {tuple(tensor.shape)} {tensor.dtype}")


def store(key: dict[str, Any], state: Mapping[str, torch.Tensor], record: dict[str, Any]) -> Path:
    """Write ``key``'s entry (weights, then the record with key, sha256 and date); returns the weights' path."""
    weights, marker = entry_paths(key)
    weights.parent.mkdir(parents=True, exist_ok=True)
    data = safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()})
    created = datetime.datetime.now().isoformat(timespec="seconds")
    write_atomically(weights, data)
    write_atomically(marker, json.dumps({"key": key, **record, "sha256": hashlib.sha256(data).hexdigest(),
                                         "created": created}, indent=1))
    return weights
