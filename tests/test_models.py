"""Backbone factory: every supported arch builds, runs at 32x32 with a CIFAR stem, has a
findable head, round-trips its weights, and the small nets are traceable by Torch-Pruning.
No test downloads anything (weights=None or local files only)."""

from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
import torch_pruning as tp
import torchvision
from safetensors.torch import save_file
from torch import nn

from passray.config import ModelConfig
from passray.models import (
    available_backbones,
    backbone_id,
    classifier,
    create_backbone,
    load_weights,
    register_backbone,
    replace_classifier,
)

TORCHVISION = ["resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn", "mobilenet_v2"]
TIMM = ["timm:resnet18d", "timm:efficientnet_b0", "timm:mobilenetv3_small_100", "timm:regnetx_002"]
ARCHS = ["convnet", "resnet8", *TORCHVISION, *TIMM]
LAST_MAP = {"convnet": 8, "resnet8": 8, "vgg11_bn": 1, "vgg16_bn": 1}  # others: 4 (32 / 8)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

_CACHE: dict[str, nn.Module] = {}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch: str) -> nn.Module:
    """One 10-class cifar_stem model per arch for the whole file (VGG takes ~1 s to build)."""
    if arch not in _CACHE:
        torch.manual_seed(0)
        _CACHE[arch] = create_backbone(ModelConfig(arch=arch, cifar_stem=True), 10)
    return _CACHE[arch]


def _last_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "forward_features"):  # timm
        return model.forward_features(x)
    if isinstance(model, torchvision.models.ResNet):
        return nn.Sequential(*list(model.children())[:-2])(x)
    return model.features(x)  # torchvision VGG / MobileNet, passray's own nets


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.mul_(1.5).add_(0.1)  # keeps running_var positive


def _save(model: nn.Module, path) -> None:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)


def test_available_backbones_lists_own_nets():
    assert {"convnet", "resnet8"} <= set(available_backbones())
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("convnet")(lambda num_classes, width=1.0: nn.Linear(1, num_classes))


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_with_cifar_stem(arch):
    model = _model(arch).eval()
    with torch.no_grad():
        assert model(X).shape == (2, 10)
        assert _last_map(model, X).shape[-2:] == (LAST_MAP.get(arch, 4),) * 2
    model.train()


@pytest.mark.parametrize("arch", ARCHS)
def test_classifier_and_replace(arch):
    model = copy.deepcopy(_model(arch))
    head = classifier(model)
    assert head.out_features == 10
    replace_classifier(model, 3)
    new = classifier(model)
    assert new is not head and new.out_features == 3 and new.in_features == head.in_features
    with torch.no_grad():
        assert model.eval()(X).shape == (2, 3)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("arch", ARCHS)
def test_weights_roundtrip(arch, suffix, tmp_path):
    source = _model(arch).eval()
    path = tmp_path / f"w{suffix}"
    _save(source, path)
    target = copy.deepcopy(source)
    _perturb(target)
    with torch.no_grad():
        expected = source(X)
        assert not torch.allclose(target(X), expected)
        load_weights(target, str(path))
        torch.testing.assert_close(target(X), expected)
    source.train()


@pytest.mark.parametrize("arch", ["convnet", "resnet18", "timm:regnetx_002"])
def test_create_with_file_skips_other_head(arch, tmp_path):
    source = _model(arch)
    path = tmp_path / "ten_classes.safetensors"
    _save(source, path)
    model = create_backbone(ModelConfig(arch=arch, weights=str(path)), 5)
    assert classifier(model).out_features == 5
    head = {k for k in model.state_dict() if k.startswith(_head_name(model))}
    for key, value in model.state_dict().items():
        if key not in head:
            torch.testing.assert_close(value, source.state_dict()[key], msg=key)
    same = create_backbone(ModelConfig(arch=arch, weights=str(path)), 10).eval()
    with torch.no_grad():
        torch.testing.assert_close(same(X), source.eval()(X))
    source.train()


def _head_name(model: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is classifier(model)) + "."


def test_wrong_arch_checkpoint_names_file_and_key(tmp_path):
    path = tmp_path / "convnet.pt"
    _save(_model("convnet"), path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*key '"):
        create_backbone(ModelConfig(arch="resnet8", weights=str(path)), 10)
    with pytest.raises(ValueError, match=r"key 'features\.0\.0\.weight' has shape"):
        load_weights(create_backbone(ModelConfig(arch="convnet", width=0.5), 10), path)


def test_missing_key_and_ddp_prefix(tmp_path):
    state = _model("resnet8").state_dict()
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    model = create_backbone(ModelConfig(arch="resnet8", weights=str(path)), 10)
    torch.testing.assert_close(model.state_dict(), state)
    torch.save({k: v for k, v in state.items() if not k.startswith("features.1.conv1")}, path)
    with pytest.raises(ValueError, match=r"missing key 'features\.1\.conv1\.weight'"):
        load_weights(model, path)


def test_unreadable_files_raise_value_error(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listing)
    for path in (junk, listing):
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_weights(_model("convnet"), path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        create_backbone(ModelConfig(arch="convnet", weights=str(path)), 10)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_weights(_model("convnet"), str(path))


@pytest.mark.parametrize("arch", ["resnet_nope", "timm:nope_net", "timm:", "keras:resnet18", "passray:resnet18"])
def test_unknown_arch(arch):
    with pytest.raises(ValueError, match=r"unknown model\.arch '.*'.*timm:<name>") as info:
        create_backbone(ModelConfig(arch=arch), 10)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"model\.arch"):
        backbone_id(ModelConfig(arch=arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_backbone_id(arch):
    on, off = backbone_id(ModelConfig(arch=arch, cifar_stem=True)), backbone_id(ModelConfig(arch=arch, cifar_stem=False))
    assert on != off and on.endswith("+cifar_stem")
    assert on == backbone_id(ModelConfig(arch=arch, cifar_stem=True, weights="some/file.pt"))


def test_backbone_id_forms():
    ids = {backbone_id(ModelConfig(arch=a)) for a in ARCHS}
    assert len(ids) == len(ARCHS)
    assert backbone_id(ModelConfig(arch="torchvision:resnet18")) == "torchvision:resnet18+cifar_stem"
    assert backbone_id(ModelConfig(arch="timm:resnet18d", cifar_stem=False)) == "timm:resnet18d"
    assert backbone_id(ModelConfig(arch="passray:convnet")) == "passray:convnet@w1.0+cifar_stem"
    assert backbone_id(ModelConfig(arch="convnet", width=0.5)) == "passray:convnet@w0.5+cifar_stem"


@pytest.mark.parametrize("arch", ["convnet", "resnet8"])
def test_own_nets(arch):
    on = create_backbone(ModelConfig(arch=arch, cifar_stem=True), 10).state_dict()
    off = create_backbone(ModelConfig(arch=arch, cifar_stem=False), 10).state_dict()
    assert {k: v.shape for k, v in on.items()} == {k: v.shape for k, v in off.items()}
    narrow = create_backbone(ModelConfig(arch=arch, width=0.5), 10)
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in _model(arch).parameters())
    with pytest.raises(ValueError, match="no hub weights"):
        create_backbone(ModelConfig(arch=arch, weights="hub"), 10)


def test_width_refused_for_foreign_arch():
    cfg = ModelConfig(arch="resnet18", width=0.5)
    for call in (lambda: create_backbone(cfg, 10), lambda: backbone_id(cfg)):
        with pytest.raises(ValueError, match=r"model\.width=0\.5.*'resnet18'"):
            call()


def test_hub_code_path_without_download(monkeypatch):
    """weights='hub' asks each library for its pretrained weights; faked here, never fetched."""
    calls = []

    def fake_get_model(name, weights=None, **kwargs):
        calls.append((name, weights, kwargs))
        return torchvision.models.resnet18(weights=None)  # a 1000-class head, like the hub's

    def fake_create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs))
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, kwargs["num_classes"]))

    monkeypatch.setattr(torchvision.models, "get_model", fake_get_model)
    monkeypatch.setattr(timm, "create_model", fake_create_model)
    model = create_backbone(ModelConfig(arch="resnet18", weights="hub"), 10)
    assert classifier(model).out_features == 10 and model.conv1.kernel_size == (3, 3)
    create_backbone(ModelConfig(arch="timm:resnet18d", weights="hub", cifar_stem=False), 10)
    assert calls == [("resnet18", "DEFAULT", {}), ("resnet18d", True, {"num_classes": 10})]


@pytest.mark.parametrize("arch", ["convnet", "resnet8"])
def test_torch_pruning_traces_own_nets(arch):
    model = create_backbone(ModelConfig(arch=arch), 10)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    groups = list(graph.get_all_groups(ignored_layers=[classifier(model)], root_module_types=[nn.Conv2d, nn.Linear]))
    assert len(groups) > 0
    assert all(dep.target.module is not classifier(model) or dep.handler != tp.prune_linear_out_channels
               for group in groups for dep, _ in group)
    if arch == "resnet8":  # the residual stream couples a block's conv2 with its shortcut conv
        coupled = [sum(isinstance(d.target.module, nn.Conv2d) and d.handler == tp.prune_conv_out_channels
                       for d, _ in g) for g in groups]
        assert max(coupled) >= 2


def test_stem_trace_leaves_train_mode():
    assert create_backbone(ModelConfig(arch="mobilenet_v2", cifar_stem=True), 10).training


def test_classifier_without_linear():
    with pytest.raises(ValueError, match="no nn.Linear"):
        classifier(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match="num_classes"):
        create_backbone(ModelConfig(arch="convnet"), 0)


def test_import_pulls_in_neither_ray_nor_mlflow(imported_after):
    assert imported_after["passray.models"] == []
