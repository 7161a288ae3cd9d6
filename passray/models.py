"""Backbone factory: passray's own small CNNs, torchvision and timm names, a CIFAR stem,
weights from the hub or a local file, and the classification head pruning must keep.

Why one module: the rest of passray (groups, export, transfer) must agree on which
network a config means (``backbone_id``) and which layer is the head (``classifier``);
keeping both next to the factory keeps them consistent. The architecture of a backbone
depends only on (arch, cifar_stem, width) -- never on the weights -- so a structure
saved for one ``backbone_id`` always fits a freshly created model with that id.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from passray._registry import Registry
from passray._state_io import load_tensors
from passray.config import ModelConfig

__all__ = [
    "available_backbones", "backbone_id", "classifier", "convnet", "create_backbone",
    "load_weights", "register_backbone", "replace_classifier", "resnet8", "resnext8",
]

_REGISTRY: Registry[Callable[..., nn.Module]] = Registry("backbone")
register_backbone = _REGISTRY.register
_log = logging.getLogger(__name__)
_TRACE_SIDE = 64  # stem trace input: cheap, yet five halvings give distinct sizes
_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers in saved keys


# ---------------------------------------------------------------- own small backbones
class _SmallNet(nn.Module):
    """``features`` -> global average pool -> ``fc``: the shape both own nets share."""

    def __init__(self, features: nn.Sequential, channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """CIFAR ResNet block. The residual is a plain ``out + shortcut(x)`` (no in-place
    ops, separate ReLU modules) so Torch-Pruning traces it as one coupled group."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


@register_backbone("convnet")
def convnet(num_classes: int, width: float = 1.0) -> nn.Module:
    """Four conv-BN-ReLU blocks (32-64-128-128 x width), two max-pools, 8x8 last map.

    Built for 32x32 inputs (~20 M MACs at width 1): the embedded default on 2 CPU cores.
    ``cifar_stem`` has no effect on it.
    """
    w = [_scaled(c, width) for c in (32, 64, 128, 128)]
    features = nn.Sequential(
        _conv_bn_relu(3, w[0]), nn.MaxPool2d(2), _conv_bn_relu(w[0], w[1]), nn.MaxPool2d(2),
        _conv_bn_relu(w[1], w[2]), _conv_bn_relu(w[2], w[3]),
    )
    return _SmallNet(features, w[3], num_classes)


@register_backbone("resnet8")
def resnet8(num_classes: int, width: float = 1.0) -> nn.Module:
    """CIFAR ResNet-8: 3x3 stem, three stages of one BasicBlock (16/32/64 x width), 8x8
    last map; 1x1 conv+BN shortcuts where the shape changes, so residual coupling is real.

    Built for 32x32 inputs; ``cifar_stem`` has no effect on it.
    """
    w = [_scaled(c, width) for c in (16, 32, 64)]
    features = nn.Sequential(
        _conv_bn_relu(3, w[0]), BasicBlock(w[0], w[0]), BasicBlock(w[0], w[1], 2), BasicBlock(w[1], w[2], 2),
    )
    return _SmallNet(features, w[2], num_classes)


class GroupedBottleneck(nn.Module):
    """ResNeXt block: 1x1 reduce, 3x3 grouped conv (``cardinality`` conv groups), 1x1 expand, shortcut.
    Its two inner channel groups are pruned in tied units (see ``groups``)."""

    def __init__(self, cin: int, mid: int, cout: int, cardinality: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU()
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(mid), nn.ReLU()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        return self.relu3(self.bn3(self.conv3(out)) + self.shortcut(x))


@register_backbone("resnext8")
def resnext8(num_classes: int, width: float = 1.0) -> nn.Module:
    """CIFAR ResNeXt-8: resnet8's layout with one grouped bottleneck per stage (cardinality 4,
    group widths 8/16/32 x width, outputs 32/64/128 x width): a small grouped-conv backbone.

    Built for 32x32 inputs; ``cifar_stem`` has no effect on it.
    """
    stem, (c1, c2, c3) = _scaled(16, width), [_scaled(c, width) for c in (32, 64, 128)]
    d1, d2, d3 = [4 * _scaled(d, width) for d in (8, 16, 32)]  # a multiple of the cardinality
    features = nn.Sequential(
        _conv_bn_relu(3, stem), GroupedBottleneck(stem, d1, c1, 4), GroupedBottleneck(c1, d2, c2, 4, 2),
        GroupedBottleneck(c2, d3, c3, 4, 2),
    )
    return _SmallNet(features, c3, num_classes)


def available_backbones() -> list[str]:
    """passray's own backbone names (torchvision and timm names are resolved on demand)."""
    return _REGISTRY.names()


# ---------------------------------------------------------------- names and ids
def _resolve(cfg: ModelConfig) -> tuple[str, str]:
    """``cfg.arch`` -> (source, name); bare names try passray first, then torchvision."""
    arch = cfg.arch
    source, sep, name = arch.partition(":")
    if not sep:
        source, name = ("passray" if arch in _REGISTRY else "torchvision"), arch
    known = {
        "passray": lambda: name in _REGISTRY,
        "timm": lambda: bool(name) and timm.is_model(name),
        "torchvision": lambda: name in torchvision.models.list_models(module=torchvision.models),
    }
    if source not in known or not known[source]():
        raise ValueError(f"unknown model.arch {arch!r}: use a passray backbone ({', '.join(available_backbones())}), "
                         "a torchvision classification model (e.g. resnet18, vgg16_bn, mobilenet_v2) "
                         "or timm:<name> (e.g. timm:resnet18d)")
    if source != "passray" and cfg.width != 1.0:  # silently ignoring it would mislabel runs
        raise ValueError(f"model.width={cfg.width} only applies to passray's own backbones "
                         f"({', '.join(available_backbones())}), not {arch!r}; leave it at 1.0")
    return source, name


def backbone_id(cfg: ModelConfig) -> str:
    """A stable id of the architecture a config builds, e.g. ``torchvision:resnet18+cifar_stem``.

    Saved structures carry it and loading refuses another id. It names everything that
    changes the layer shapes (source, arch, width of own nets, cifar_stem) and nothing
    that does not (weights; num_classes, since the head is never pruned).
    """
    source, name = _resolve(cfg)
    ident = f"{source}:{name}" + (f"@w{float(cfg.width)}" if source == "passray" else "")
    return ident + ("+cifar_stem" if cfg.cifar_stem else "")


# ---------------------------------------------------------------- the head
def _unwrap(model: nn.Module) -> nn.Module:
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _name_of(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent), attr, module)


def classifier(model: nn.Module) -> nn.Module:
    """The final classification layer: its out-features are the classes, so pruning
    must leave it out (``ignored_layers``); its in-features may shrink with the body.

    timm models answer ``get_classifier()``; anything else gives its last ``nn.Linear``
    in module order. Call it on the backbone, not on a wrapper that holds other Linears.
    """
    model = _unwrap(model)
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear to serve as the classifier")
    return linears[-1]


def replace_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """Put a fresh ``num_classes`` head in place of the old one and return ``model``.

    The new head keeps the old one's in-features (read from the layer itself, so it is
    right after pruning too, unlike timm's cached ``num_features``), device and dtype.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    target = _unwrap(model)
    head = classifier(target)
    like = next(head.parameters(), None)
    if isinstance(head, nn.Linear):
        new: nn.Module = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
        _set_module(target, _name_of(target, head), new)
    elif callable(getattr(target, "reset_classifier", None)):
        target.reset_classifier(num_classes)
        new = classifier(target)
    else:
        raise ValueError(f"cannot replace a {type(head).__name__} classifier of {type(target).__name__}")
    if like is not None:
        new.to(device=like.device, dtype=like.dtype)
    if hasattr(target, "num_classes"):
        target.num_classes = num_classes
    return model


# ---------------------------------------------------------------- CIFAR stem
def _stride(module: nn.Module) -> int:
    return max(module.stride) if isinstance(module.stride, tuple) else module.stride


def _downsamplers(model: nn.Module) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(name, module, input H x W) of every strided conv and pool, in execution order.

    A traced forward, not module order, because it also yields the input size: every op
    that downsamples the same map (a block's strided conv and its shortcut) changes together.
    """
    seen: dict[str, tuple[str, nn.Module, tuple[int, ...]]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and _stride(mod) > 1:
            def record(m: nn.Module, args: tuple, name: str = name) -> None:
                seen.setdefault(name, (name, m, tuple(args[0].shape[-2:])))
            hooks.append(mod.register_forward_pre_hook(record))
    like = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, _TRACE_SIDE, _TRACE_SIDE, device=like.device, dtype=like.dtype))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return list(seen.values())


def _apply_cifar_stem(model: nn.Module) -> None:
    """Cut the stem's downsampling by 4x so 32x32 inputs keep a useful last map.

    The first strided conv gets stride 1; so does the next downsampling step (a max-pool
    becomes ``nn.Identity``, a strided conv stride 1 -- with its shortcut, which sees the
    same map). Nets whose stem is not strided (VGG) keep their pools. torchvision ResNets
    also get the usual 3x3 CIFAR conv1 (fresh weights, even with hub weights, so that
    the architecture depends on the id alone); torchvision VGGs get a 1x1 average pool
    and a single Linear(512, classes) head, as their 1x1 map would be blown up to 7x7.
    """
    ops = _downsamplers(model)
    first = next((i for i, op in enumerate(ops) if isinstance(op[1], nn.Conv2d)), None)
    if first is not None:
        stem_size = ops[first][2]
        next_size = next((size for _, _, size in ops[first:] if size != stem_size), None)
        for name, mod, size in ops[first:]:
            if size not in (stem_size, next_size):
                continue
            if isinstance(mod, nn.Conv2d):
                mod.stride = (1, 1)
            else:
                _set_module(model, name, nn.Identity())
    if isinstance(model, torchvision.models.ResNet) and model.conv1.kernel_size == (7, 7):
        old = model.conv1
        model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(model, torchvision.models.VGG):
        channels = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Linear(channels, classifier(model).out_features)


# ---------------------------------------------------------------- factory and weights
def _build(source: str, name: str, cfg: ModelConfig, num_classes: int) -> nn.Module:
    hub = cfg.weights == "hub"
    if source == "passray":
        if hub:
            raise ValueError(f"model.weights='hub': passray's own {name!r} has no hub weights; give a file path")
        return _REGISTRY.get(name)(num_classes=num_classes, width=cfg.width)
    if source == "timm":
        return timm.create_model(name, pretrained=hub, num_classes=num_classes)
    if not hub:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    model = torchvision.models.get_model(name, weights="DEFAULT")
    if getattr(classifier(model), "out_features", None) != num_classes:
        replace_classifier(model, num_classes)
    return model


def create_backbone(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build the backbone ``cfg`` names with a ``num_classes`` head.

    ``cfg.weights``: None -> random init; "hub" -> the library's pretrained weights
    (download); any other string -> a local .safetensors/.pt/.pth file (``load_weights``).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    source, name = _resolve(cfg)
    path = None if cfg.weights in (None, "hub") else Path(cfg.weights)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"model.weights: file not found: {path}")
    model = _build(source, name, cfg, num_classes)
    if cfg.cifar_stem and source != "passray":
        _apply_cifar_stem(model)
    if path is not None:
        load_weights(model, path)
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure is one user-facing problem: a bad file
        first_line = (str(err).splitlines() or [""])[0]
        raise ValueError(f"weights file {path}: cannot read it ({type(err).__name__}: {first_line})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path}: expected a state dict of tensors")
    while state and (prefix := next((p for p in _PREFIXES if all(k.startswith(p) for k in state)), None)):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a .safetensors file or a torch state dict (``weights_only=True``) into ``model``.

    Strict except for the head: a head of another shape (or none in the file) is skipped,
    so a backbone trained on 10 classes loads onto a 5-class head. Anything else that does
    not fit raises ``ValueError`` naming the file and the first offending key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    target = _unwrap(model)
    state = _read_state_dict(path)
    own = target.state_dict()
    head = classifier(target)
    head_name = _name_of(target, head)
    head_keys = {f"{head_name}.{k}" for k in head.state_dict()}
    skip_head = any(k in state and state[k].shape != own[k].shape for k in head_keys)
    problems = []
    for key, tensor in state.items():
        if key not in own:
            problems.append(f"unexpected key {key!r}")
        elif tensor.shape != own[key].shape and key not in head_keys:
            problems.append(f"key {key!r} has shape {tuple(tensor.shape)} in the file, {tuple(own[key].shape)} in the model")
    missing = [k for k in own if k not in state and k not in head_keys and not k.endswith("num_batches_tracked")]
    problems += [f"missing key {k!r}" for k in missing]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"weights file {path} does not fit {type(target).__name__}: {problems[0]}{more}")
    if skip_head:
        _log.info("%s: head %r has another shape; kept the model's fresh head", path, head_name)
        state = {k: v for k, v in state.items() if k not in head_keys}
    load_tensors(target, state, strict=False)  # with the module's own metadata (MNASNet needs its version)
