"""Physical pruning, the masked == pruned check, and save/load of pruned networks.

On disk a pruned network is ``structure.json`` (backbone id, input size, prompt, every
group's kept channel indices, costs, Torch-Pruning's ``pruning_history``) plus
``weights.safetensors``. Loading re-creates the dense backbone from its id, re-applies
the kept indices and loads the weights: no pickle anywhere. Directories are written
to a temporary sibling and renamed, so a failure never leaves a half-written export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from passray.config import ModelConfig
from passray.groups import ChannelGroups, count_macs_params
from passray.hypernet import PassHypernet, save_hypernet
from passray.models import backbone_id, classifier, create_backbone
from passray.network import PrunableNet
from passray.prompts import VisualPrompt
from passray.search_plot import plot_search

__all__ = ["STRUCTURE_VERSION", "atomic_directory", "exact_fp32", "build_groups", "check_equivalence", "load_pruned",
           "masks_from_structure", "measure", "save_pruned", "structure_record"]

STRUCTURE_VERSION = 1


def build_groups(backbone: torch.nn.Module, image_size: int) -> ChannelGroups:
    """Channel groups of a backbone, leaving its classifier (the classes) alone."""
    example = torch.zeros(1, 3, image_size, image_size, device=next(backbone.parameters()).device)
    return ChannelGroups(backbone, example, ignored_layers=[classifier(backbone)])


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


class exact_fp32:
    """TF32 off inside (cuDNN/cuBLAS use it by default on Ampere+), so fp32 means fp32."""

    def __enter__(self) -> None:
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc) -> None:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


@torch.no_grad()
def check_equivalence(masked: torch.Tensor, pruned: torch.Tensor, tolerance: float = 1e-4) -> float:
    """Max abs difference between masked and pruned outputs; raises if above ``tolerance`` or not finite."""
    if not (torch.isfinite(masked).all() and torch.isfinite(pruned).all()):
        raise RuntimeError("masked or pruned network outputs are not finite (NaN/inf): the run diverged")
    diff = float((masked.float() - pruned.float()).abs().max())
    scale = float(masked.float().abs().max().clamp(min=1.0))
    if diff > tolerance * scale:
        raise RuntimeError(f"pruned network differs from the masked one: max |diff| {diff:.3e} > {tolerance} x {scale:.3g}")
    return diff


def structure_record(groups: ChannelGroups, masks: Sequence[torch.Tensor], model_cfg: ModelConfig,
                     num_classes: int, image_size: int, prompt: VisualPrompt, extra: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to rebuild the pruned architecture, as plain data."""
    kept = [torch.nonzero(m.detach().cpu() > 0.5).flatten().tolist() for m in masks]
    return {
        "schema_version": STRUCTURE_VERSION,
        "backbone_id": backbone_id(model_cfg),
        "model": {"arch": model_cfg.arch, "cifar_stem": model_cfg.cifar_stem, "width": model_cfg.width},
        "num_classes": num_classes,
        "input_size": [3, image_size, image_size],
        "prompt": {"kind": prompt.kind, "size": prompt.size},
        "groups": [{"name": g.name, "width": g.width, "kept": k} for g, k in zip(groups.groups, kept)],
        **extra,
    }


def save_pruned(directory: str | Path, net: PrunableNet, structure: dict[str, Any],
                hypernet: PassHypernet | None = None, hypernet_extra: dict[str, Any] | None = None) -> Path:
    """Write ``structure.json`` + ``weights.safetensors`` (+ ``hypernet/``) for a pruned ``net``, all or nothing."""
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / "weights.safetensors"))
        (tmp / "structure.json").write_text(json.dumps(structure, indent=1))
        if hypernet is not None:
            save_hypernet(hypernet, tmp / "hypernet", hypernet_extra)
        plot_search(structure, tmp / "search.png")
    return Path(directory)


def _read_structure(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing structure file")
    try:
        structure = json.loads(path.read_text())
        required = ("schema_version", "backbone_id", "model", "num_classes", "input_size", "prompt", "groups")
        missing = [k for k in required if k not in structure]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if structure["schema_version"] != STRUCTURE_VERSION:
        raise ValueError(f"{path}: schema_version {structure['schema_version']} is not {STRUCTURE_VERSION}")
    return structure


def masks_from_structure(structure: dict[str, Any], groups: ChannelGroups, source: str = "structure") -> list[torch.Tensor]:
    """Masks for ``groups`` from a structure's kept indices; refuses a different group layout."""
    saved = structure["groups"]
    if [(g["name"], g["width"]) for g in saved] != [(g.name, g.width) for g in groups.groups]:
        theirs = [(g["name"], g["width"]) for g in saved][:3]
        ours = [(g.name, g.width) for g in groups.groups][:3]
        raise ValueError(f"{source}: channel groups do not match this backbone (saved {theirs}..., backbone {ours}...)")
    masks = []
    for g in saved:
        mask = torch.zeros(g["width"])
        kept = torch.as_tensor(g["kept"], dtype=torch.long)
        if kept.numel() == 0 or int(kept.max()) >= g["width"] or int(kept.min()) < 0:
            raise ValueError(f"{source}: group {g['name']!r} has invalid kept indices")
        masks.append(mask.index_fill_(0, kept, 1.0))
    return masks


def load_pruned(directory: str | Path, expect_backbone: str | None = None) -> tuple[PrunableNet, dict[str, Any]]:
    """Rebuild a pruned network from an export directory: ``(network, structure.json as a dict)``."""
    directory = Path(directory)
    structure = _read_structure(directory / "structure.json")
    if expect_backbone is not None and structure["backbone_id"] != expect_backbone:
        raise ValueError(f"{directory}: saved for backbone {structure['backbone_id']!r}, not {expect_backbone!r}")
    model_cfg = ModelConfig(**structure["model"])  # weights=None: the saved ones replace them anyway
    if backbone_id(model_cfg) != structure["backbone_id"]:
        raise ValueError(f"{directory}: backbone_id {structure['backbone_id']!r} does not match its model section")
    image_size = int(structure["input_size"][-1])
    backbone = create_backbone(model_cfg, int(structure["num_classes"]))
    with torch.enable_grad():  # Torch-Pruning traces with autograd, also when the caller is in no_grad
        groups = build_groups(backbone, image_size)
    groups.prune(masks_from_structure(structure, groups, source=str(directory / "structure.json")))
    net = PrunableNet(backbone, VisualPrompt(structure["prompt"]["kind"], structure["prompt"]["size"], image_size))
    weights = directory / "weights.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing weights file")
    try:
        net.load_state_dict(load_file(str(weights)), strict=True)
    except Exception as err:
        raise ValueError(f"{weights}: does not fit the saved structure ({str(err).splitlines()[0]})") from None
    return net.eval(), structure


def measure(net: PrunableNet, image_size: int) -> dict[str, float]:
    macs, params = count_macs_params(net.backbone, torch.zeros(1, 3, image_size, image_size,
                                                               device=next(net.parameters()).device))
    return {"macs": macs, "params": params}
