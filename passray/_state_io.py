"""Save/load nested training state (model and optimizer state dicts, metadata) without pickle,
and the file-level safety every writer shares: a file or directory is whole or absent, and a destination is
known to be writable before hours of compute are spent on what goes there.

Tensors go to one ``state.safetensors`` under flattened keys; everything else (numbers,
strings, lists) goes to ``state.json``. This is what Ray checkpoints and exports carry.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

__all__ = ["atomic_directory", "check_writable", "load_state", "load_tensors", "save_state", "write_atomically"]

_SEP = "/"


def _split(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        return {"__dict__": [[k, _split(v, f"{prefix}{_SEP}{k}", tensors)] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return [_split(v, f"{prefix}{_SEP}{i}", tensors) for i, v in enumerate(tree)]
    return tree


def _join(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict) and "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if isinstance(tree, dict) and "__dict__" in tree:
        return {k: _join(v, tensors) for k, v in tree["__dict__"]}
    if isinstance(tree, list):
        return [_join(v, tensors) for v in tree]
    return tree


def write_atomically(path: str | Path, data: bytes | str) -> Path:
    """``path`` holds all of ``data`` or stays as it was: written beside it under a name of this
    writer's own (concurrent writers never share a temporary file), then renamed over it.

    A full disk (or any write error) removes the partial file and raises an ``OSError`` that
    names ``path``, not the temporary name. The parent folder is created if missing."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "xb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(partial, path)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write {path}: {err.strerror}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def check_writable(path: str | Path, key: str) -> None:
    """Raise a one-line ``ValueError`` naming config ``key`` unless ``path`` can be created and written.

    Nothing is created: the nearest existing folder must be a writable directory (a file in the
    way, a read-only mount or missing permissions all fail here, before any compute)."""
    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"config key '{key}': {path} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "a read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "no write permission"
        raise ValueError(f"config key '{key}': {path} is not writable ({why} at {existing})")


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """``state.safetensors`` then ``state.json``, each written atomically: in a fresh folder (a
    checkpoint's), a reader that finds ``state.json`` finds the tensors it names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    write_atomically(directory / "state.safetensors", save(tensors))
    write_atomically(directory / "state.json", json.dumps(skeleton))
    return directory


def load_state(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    skeleton = json.loads((directory / "state.json").read_text())
    return _join(skeleton, load_file(str(directory / "state.safetensors")))


class atomic_directory:
    """``with atomic_directory(path) as tmp:`` write into tmp; it becomes ``path`` only on success."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)


def load_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor], strict: bool = True) -> None:
    """``module.load_state_dict(tensors, strict)`` with the module's own state-dict metadata.

    safetensors keeps tensors only, and some loaders need the per-module ``version`` that
    ``state_dict()`` carries beside them (torchvision's MNASNet refuses a state dict without it).
    """
    state = OrderedDict(tensors)
    state._metadata = module.state_dict()._metadata  # type: ignore[attr-defined]
    module.load_state_dict(state, strict=strict)
