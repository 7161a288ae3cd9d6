"""Decoded image folders kept on disk: a folder or archive of JPEGs is decoded once per machine.

Decoding CIFAR-10's 60k JPEGs takes about 10 s of one core, and every process that loads the
data paid it again: each Tune trial's first run, each Ray Train worker, the dense-training task.
An entry is one ``<hash>.safetensors`` with the train and eval images (uint8 ``[N,3,H,W]``) and
labels (int64) and, in its metadata, the class names; it is named by the hash of the source
(resolved path, and the size and modification time of the archive or of every file below the
folder), the decode size and the passray version, so an edited dataset misses. Written under a
temporary name and renamed: a reader sees a whole entry or none. An entry that cannot be read
is ignored with a one-line warning and written again.

Where: ``$PASSRAY_DATA_CACHE``, else ``~/.cache/passray/data``, on each node. ``data.cache:
false`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import safetensors
import safetensors.torch
import torch

import passray
from passray._state_io import write_atomically

__all__ = ["ENV", "cache_root", "cached"]

ENV = "PASSRAY_DATA_CACHE"
_log = logging.getLogger(__name__)
_NAMES = ("train_images", "train_labels", "eval_images", "eval_labels")

Decoded = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]


def cache_root() -> Path:
    """``$PASSRAY_DATA_CACHE``, else ``~/.cache/passray/data``."""
    return Path(os.environ.get(ENV) or "~/.cache/passray/data").expanduser()


def _fingerprint(root: Path) -> list:
    """What the decoded tensors depend on in the source: an archive's size and mtime, or every file's below a folder."""
    if root.is_file():
        stat = root.stat()
        return [stat.st_size, stat.st_mtime_ns]
    stats = {str(p.relative_to(root)): p.stat() for p in root.rglob("*") if p.is_file()}
    return [[name, stat.st_size, stat.st_mtime_ns] for name, stat in sorted(stats.items())]


def _entry(root: Path, size: int | None) -> Path:
    key = {"passray": passray.__version__, "source": str(root.resolve()), "files": _fingerprint(root), "size": size}
    return cache_root() / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.safetensors"


def _read(path: Path) -> Decoded:
    with safetensors.safe_open(str(path), framework="pt") as f:
        classes = json.loads((f.metadata() or {})["classes"])
        tensors = [f.get_tensor(name) for name in _NAMES]
    train_x, train_y, eval_x, eval_y = tensors
    for images, labels in ((train_x, train_y), (eval_x, eval_y)):
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.dtype != torch.int64 \
                or labels.shape != images.shape[:1]:
            raise ValueError(f"tensors {tuple(images.shape)} {images.dtype} / {tuple(labels.shape)} {labels.dtype} "
                             "are not images and their labels")
    return train_x, train_y, eval_x, eval_y, classes


def cached(root: Path, size: int | None, decode: Callable[[], Decoded]) -> Decoded:
    """``decode()``'s result for the image folder or archive ``root`` at decode size ``size``, from the
    cache when an entry is there, else decoded now and stored."""
    path = _entry(root, size)
    if path.is_file():
        try:
            return _read(path)
        except (OSError, ValueError, KeyError, safetensors.SafetensorError) as err:
            _log.warning("ignoring the decoded-image cache entry %s (%s: %s); decoding again", path,
                         type(err).__name__, (str(err).strip().splitlines() or [""])[0])
    decoded = decode()
    try:
        data = safetensors.torch.save(dict(zip(_NAMES, decoded[:4])), metadata={
            "classes": json.dumps(decoded[4]), "source": str(root.resolve()), "size": json.dumps(size)})
        write_atomically(path, data)
    except OSError as err:  # a read-only or full home: the run goes on without the cache
        _log.warning("not caching decoded images (%s)", err)
    return decoded
