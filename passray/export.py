"""Save and load pruned networks (safetensors + JSON), and their ONNX form for serving.

On disk a pruned network is ``structure.json`` (backbone id, input size, prompt, every
group's kept channel indices, costs, Torch-Pruning's ``pruning_history``) plus
``weights.safetensors``. Loading re-creates the dense backbone from its id, re-applies
the kept indices and loads the weights: no pickle anywhere. Directories are written
to a temporary sibling and renamed, so a failure never leaves a half-written export.

For serving, ``to_onnx`` (``python -m passray.export DIR --onnx``) writes the loaded
network, visual prompt included, as ONNX and checks ONNX Runtime's outputs against it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from passray._cli import run_cli
from passray._state_io import atomic_directory, load_tensors
from passray.config import ModelConfig
from passray.equivalence import check_equivalence
from passray.groups import ChannelGroups, build_groups, count_macs_params
from passray.models import backbone_id, create_backbone
from passray.network import PrunableNet
from passray.prompts import VisualPrompt
from passray.search_plot import plot_search

__all__ = ["ONNX_FILE", "ONNX_OPSET", "ONNX_OPSETS", "STRUCTURE_VERSION", "OnnxUnavailable", "load_pruned", "main",
           "masks_from_structure", "measure", "save_pruned", "structure_record", "to_onnx"]

STRUCTURE_VERSION = 1
ONNX_FILE = "model.onnx"  # to_onnx's default name inside an export directory
ONNX_OPSET = 17  # ONNX Runtime >= 1.12 runs it; a pruned CNN needs no newer operator
ONNX_OPSETS = range(7, 21)  # the TorchScript exporter writes up to 20; ONNX Runtime runs 7 and above
_log = logging.getLogger(__name__)


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
                write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``structure.json`` + ``weights.safetensors`` for a pruned ``net``, all or nothing.

    ``write_extra(tmp)`` adds files inside the same atomic directory (PASS writes its ``hypernet/``).
    """
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / "weights.safetensors"))
        (tmp / "structure.json").write_text(json.dumps(structure, indent=1))
        if write_extra is not None:
            write_extra(tmp)
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
        load_tensors(net, load_file(str(weights)))
    except Exception as err:
        raise ValueError(f"{weights}: does not fit the saved structure ({str(err).splitlines()[0]})") from None
    return net.eval(), structure


def measure(net: PrunableNet, image_size: int) -> dict[str, float]:
    macs, params = count_macs_params(net.backbone, torch.zeros(1, 3, image_size, image_size,
                                                               device=next(net.parameters()).device))
    return {"macs": macs, "params": params}


class OnnxUnavailable(RuntimeError):
    """torch.onnx cannot write a model without the ``onnx`` package (``pip install 'passray[onnx]'``)."""


def _onnx_metadata(structure: dict[str, Any]) -> dict[str, str]:
    """What a server needs besides the graph: the input's normalisation and the class names."""
    data = structure.get("data", {})
    props = {"passray.backbone_id": structure["backbone_id"], "passray.input_size": structure["input_size"],
             "passray.num_classes": structure["num_classes"], "passray.classes": data.get("classes"),
             "passray.normalize_mean": data.get("mean"), "passray.normalize_std": data.get("std")}
    return {k: json.dumps(v) if not isinstance(v, str) else v for k, v in props.items() if v is not None}


@torch.no_grad()
def _verify_onnx(path: Path, net: PrunableNet, input_size: Sequence[int], batch_size: int,
                 tolerance: float) -> float | None:
    """Max abs difference of ONNX Runtime vs PyTorch on a seeded random batch; None when onnxruntime is missing."""
    try:
        import onnxruntime
    except ImportError:
        return None
    images = torch.randn(batch_size, *input_size, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    served = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    return check_equivalence(net(images), served, tolerance, labels=("PyTorch", "ONNX Runtime"))


def to_onnx(directory: str | Path, path: str | Path | None = None, *, batch_size: int | None = None,
            opset: int = ONNX_OPSET, tolerance: float = 1e-4) -> Path:
    """Write the pruned network of an export directory as ONNX (default ``DIR/model.onnx``); returns the path.

    The graph is the network exactly as ``load_pruned`` runs it: input ``images`` [N, 3, H, W] float32,
    normalised as in training (``(pixels / 255 - mean) / std``, structure.json's ``data.mean``/``data.std``),
    the visual prompt added inside; output ``logits`` [N, classes]. ``batch_size`` None: a dynamic batch axis.
    With onnxruntime installed, the written model must match PyTorch within ``tolerance`` on a random batch,
    or nothing is written. Uses the legacy TorchScript exporter: the dynamo one needs ``onnxscript``, took 5 s
    vs 1 s for a ResNet-18 here (torch 2.14, 2-core CPU) and reported it could not convert to opset 17."""
    try:
        import onnx
    except ImportError:
        raise OnnxUnavailable("ONNX export needs the onnx package: pip install 'passray[onnx]'") from None
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1 (or None for a dynamic batch axis)")
    if opset not in ONNX_OPSETS:
        raise ValueError(f"opset={opset}: choose one from {ONNX_OPSETS[0]} to {ONNX_OPSETS[-1]}")
    directory = Path(directory)
    net, structure = load_pruned(directory)
    target = Path(path) if path is not None else directory / ONNX_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")  # same folder: the rename is atomic
    try:
        with warnings.catch_warnings():  # noise: the exporter's deprecation (chosen on purpose, see above) and
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # the prompt's shape check (H, W are fixed)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"passray\.prompts")
            torch.onnx.export(net, (torch.zeros(batch_size or 2, *structure["input_size"]),), partial, dynamo=False,
                              opset_version=opset, input_names=["images"], output_names=["logits"],
                              dynamic_axes=None if batch_size else {"images": {0: "batch"}, "logits": {0: "batch"}})
        model = onnx.load(partial)
        onnx.helper.set_model_props(model, _onnx_metadata(structure))
        onnx.save(model, partial)
        # dynamic: checked at another batch size than traced, so a batch baked into the graph shows
        diff = _verify_onnx(partial, net, structure["input_size"], batch_size or 3, tolerance)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    checked = "not checked: onnxruntime is not installed" if diff is None else f"max |diff| {diff:.2e}"
    _log.info("wrote %s (opset %d, batch %s); ONNX Runtime vs PyTorch %s", target, opset, batch_size or "dynamic",
              checked)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="passray.export", description="Write an export directory's pruned network "
                                     "in a deployable format (input: images normalised as in training).")
    parser.add_argument("directory", metavar="DIR", help="export directory (structure.json + weights.safetensors)")
    parser.add_argument("--onnx", action="store_true", help="write ONNX, checked against PyTorch with onnxruntime "
                        "when installed")
    parser.add_argument("--output", metavar="FILE", help=f"where to write (default: DIR/{ONNX_FILE})")
    parser.add_argument("--batch-size", type=int, help="fixed batch size (default: a dynamic batch axis)")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET,
                        help=f"ONNX opset, {ONNX_OPSETS[0]} to {ONNX_OPSETS[-1]} (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)
    if not args.onnx:
        parser.error("nothing to write: pass --onnx")
    to_onnx(args.directory, args.output, batch_size=args.batch_size, opset=args.opset)


if __name__ == "__main__":
    run_cli(main, "passray.export")
