"""Export: a pruned run saves, loads back identical, and refuses mismatches or corruption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from passray.config import load_config
from passray.data import load_dataset, make_loaders
from passray.engine import evaluate
from passray.export import load_pruned, save_pruned
from passray.pipeline import Runtime, run

TINY = ["model.arch=resnet8", "model.width=0.5", "data.limit_train=128", "data.batch_size=32", "pretrain.epochs=1",
        "search.epochs=1", "finetune.epochs=1", "bn_recalibration_batches=2", "hypernet.hidden_size=8"]


@pytest.fixture(scope="module", params=["pass", "l1"])
def exported(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"export-{request.param}")
    cfg = load_config(None, TINY + [f"method={request.param}"])
    result = run(cfg, Runtime(export_dir=str(out), progress=False))
    return cfg, result, out


def test_round_trip_reproduces_the_reported_accuracy(exported) -> None:
    cfg, result, out = exported
    net, structure = load_pruned(out)
    loaders = make_loaders(load_dataset(cfg.data), cfg.data, "cpu")
    assert evaluate(net, loaders.test, torch.device("cpu"))["accuracy"] == pytest.approx(result["test_accuracy"])
    assert structure["results"]["macs_ratio"] <= cfg.budget.keep_ratio + 1e-9
    kept = [len(g["kept"]) for g in structure["groups"]]
    assert kept == [m.weight.shape[0] for m in _roots(net, structure)]
    assert (out / "hypernet" / "model.safetensors").is_file() == (cfg.method == "pass")


def _roots(net, structure):
    return [net.backbone.get_submodule(g["name"]) for g in structure["groups"]]


def test_save_load_save_gives_identical_outputs(exported, tmp_path: Path) -> None:
    _, _, out = exported
    net, structure = load_pruned(out)
    save_pruned(tmp_path / "again", net, structure)
    again, _ = load_pruned(tmp_path / "again")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), again(x), rtol=0, atol=0)


def _copy(out: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(out, target)
    return target


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change,needle", [
    (lambda s: s.update(backbone_id="torchvision:resnet18+cifar_stem"), "does not match its model section"),
    (lambda s: s["model"].update(arch="convnet"), "does not match its model section"),
    (lambda s: s["groups"][0].update(width=s["groups"][0]["width"] + 1), "channel groups do not match"),
    (lambda s: s["groups"][1].update(kept=[10_000]), "invalid kept indices"),
    (lambda s: s.update(schema_version=99), "schema_version"),
    (lambda s: s.pop("groups"), "missing keys"),
])
def test_mismatched_structure_is_refused(exported, tmp_path: Path, change, needle) -> None:
    target = _copy(exported[2], tmp_path)
    _edit(target / "structure.json", change)
    with pytest.raises(ValueError, match=needle):
        load_pruned(target)


def test_wrong_expected_backbone_and_corrupt_files(exported, tmp_path: Path) -> None:
    target = _copy(exported[2], tmp_path)
    with pytest.raises(ValueError, match="saved for backbone"):
        load_pruned(target, expect_backbone="torchvision:resnet18+cifar_stem")
    (target / "weights.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="weights.safetensors"):
        load_pruned(target)
    (target / "structure.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pruned(target)
    (target / "structure.json").unlink()
    with pytest.raises(FileNotFoundError, match="structure.json"):
        load_pruned(target)
