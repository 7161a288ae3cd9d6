"""Save/load nested training state (model and optimizer state dicts, metadata) without pickle.

Tensors go to one ``state.safetensors`` under flattened keys; everything else (numbers,
strings, lists) goes to ``state.json``. This is what Ray checkpoints and exports carry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["load_state", "save_state"]

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


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    save_file(tensors, str(directory / "state.safetensors"))
    (directory / "state.json").write_text(json.dumps(skeleton))
    return directory


def load_state(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    skeleton = json.loads((directory / "state.json").read_text())
    return _join(skeleton, load_file(str(directory / "state.safetensors")))
