"""Export: a pruned run saves, loads back identical, refuses mismatches or corruption, and serves as ONNX."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from passray._cli import run_cli
from passray.config import load_config
from passray.data import load_dataset, make_loaders
from passray.engine import evaluate
from passray.export import ONNX_FILE, OnnxUnavailable, load_pruned, main, save_pruned, to_onnx
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


# ---------------------------------------------------------------- ONNX (deployable export)
def _pruned_export(directory: Path, arch: str, image_size: int, width: float = 1.0) -> Path:
    """A real export of a randomly pruned backbone (random BN statistics, a non-zero pad prompt): seconds to build."""
    from passray.config import ModelConfig
    from passray.export import structure_record
    from passray.groups import build_groups
    from passray.models import create_backbone
    from passray.network import PrunableNet
    from passray.prompts import VisualPrompt

    torch.manual_seed(0)
    model_cfg = ModelConfig(arch=arch, cifar_stem=True, width=width)
    backbone = create_backbone(model_cfg, 10).eval()
    for module in backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # not the identity, so a wrong channel would show
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.normal_()
    groups = build_groups(backbone, image_size)
    masks = [(torch.rand(g.width) < 0.5).float().index_fill_(0, torch.tensor([0]), 1.0) for g in groups.groups]
    groups.prune(masks)
    prompt = VisualPrompt("pad", 2, image_size)
    prompt.values.data.normal_()
    net = PrunableNet(backbone, prompt).eval()
    data = {"name": "digits", "classes": [str(i) for i in range(10)], "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    structure = structure_record(groups, masks, model_cfg, 10, image_size, prompt,
                                 {"data": data, "results": {"val_accuracy": 0.5}})  # registry aliases rank by it
    return save_pruned(directory, net, structure)


@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> Path:
    return _pruned_export(tmp_path_factory.mktemp("onnx") / "convnet", "convnet", 16, width=0.5)


def _onnxruntime_logits(path: Path, images: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


@pytest.mark.parametrize("arch,width,image_size", [("convnet", 0.5, 16), ("resnet18", 1.0, 16)])
def test_onnx_runs_in_onnxruntime_like_pytorch(tmp_path: Path, arch: str, width: float, image_size: int) -> None:
    pytest.importorskip("onnxruntime")
    export_dir = _pruned_export(tmp_path / arch, arch, image_size, width)
    net, _ = load_pruned(export_dir)
    path = to_onnx(export_dir)
    assert path == export_dir / ONNX_FILE and [p.name for p in export_dir.glob(".*")] == []
    for batch in (1, 5):  # the batch axis is dynamic
        images = torch.randn(batch, 3, image_size, image_size)
        with torch.no_grad():
            expected = net(images)
        torch.testing.assert_close(_onnxruntime_logits(path, images), expected, rtol=0, atol=1e-4)
    with torch.no_grad():  # the prompt is inside the served graph: without it the logits differ
        assert (net.backbone(images) - expected).abs().max() > 1e-3


def test_onnx_carries_the_input_normalisation_and_a_fixed_batch(small_export: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    path = to_onnx(small_export, tmp_path / "fixed" / "m.onnx", batch_size=4)
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["passray.normalize_mean"]) == [0.1, 0.2, 0.3]
    assert json.loads(props["passray.normalize_std"]) == [0.4, 0.5, 0.6]
    assert json.loads(props["passray.input_size"]) == [3, 16, 16]
    assert props["passray.backbone_id"] == "passray:convnet@w0.5+cifar_stem"
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert (model.graph.input[0].name, dims) == ("images", [4, 3, 16, 16])


def test_onnx_that_differs_from_pytorch_is_refused_and_not_written(small_export: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    with pytest.raises(RuntimeError, match="ONNX Runtime network differs from the PyTorch one"):
        to_onnx(small_export, tmp_path / "m.onnx", tolerance=-1.0)  # no difference passes a negative bound
    assert list(tmp_path.iterdir()) == []


def test_onnx_without_the_onnx_package_says_how_to_install(small_export: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # what `import onnx` meets when it is not installed
    with pytest.raises(OnnxUnavailable, match=r"pip install 'passray\[onnx\]'"):
        to_onnx(small_export, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_registered_structure_model_carries_the_onnx(small_export: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    """With onnx missing a registration logs one line and goes on; with it, the model's artifacts hold model.onnx."""
    pytest.importorskip("onnxruntime")
    from passray.registry import register_export, resolve

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "onnx", None)
        without = register_export(small_export, tracking_uri=store)["structure"]
    assert [r.getMessage() for r in caplog.records if "model.onnx" in r.getMessage()] == [
        f"registering {small_export} without model.onnx: "
        "ONNX export needs the onnx package: pip install 'passray[onnx]'"]
    assert list(resolve(without["uri"], tracking_uri=store, dst=tmp_path / "without").rglob(ONNX_FILE)) == []
    served = list(resolve(register_export(small_export, tracking_uri=store)["structure"]["uri"], tracking_uri=store,
                          dst=tmp_path / "with").rglob(ONNX_FILE))
    assert len(served) == 1
    net, _ = load_pruned(small_export)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(_onnxruntime_logits(served[0], images), net(images), rtol=0, atol=1e-4)


def test_cli_writes_onnx_and_reports_the_check(small_export: Path, tmp_path: Path, caplog) -> None:
    pytest.importorskip("onnxruntime")
    caplog.set_level(logging.INFO, logger="passray.export")
    run_cli(main, "passray.export", [str(small_export), "--onnx", "--output", str(tmp_path / "served.onnx")])
    assert "ONNX Runtime vs PyTorch max |diff|" in caplog.text and (tmp_path / "served.onnx").is_file()


def test_cli_on_a_missing_directory_is_one_line_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "passray.export", str(tmp_path / "missing"), "--onnx", "--output",
                             str(tmp_path / "out" / "m.onnx")], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    missing = tmp_path / "missing" / "structure.json"
    assert result.stderr == f"passray.export: error: {missing}: missing structure file\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv_tail,needle", [([], "nothing to write: pass --onnx"),
                                              (["--onnx"], "structure.json: not valid JSON"),
                                              (["--onnx", "--batch-size", "0"], "batch_size=0: must be at least 1"),
                                              (["--onnx", "--opset", "99"], "opset=99: choose one from 7 to 20")])
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, capsys, argv_tail, needle) -> None:
    corrupt = tmp_path / "export"
    corrupt.mkdir()
    (corrupt / "structure.json").write_text("{")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, "passray.export", [str(corrupt), "--output", str(tmp_path / "out" / "m.onnx"), *argv_tail])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err.splitlines()[-1]
    assert sorted(tmp_path.rglob("*")) == before
