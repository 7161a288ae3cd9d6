"""Fine-tune distillation from the dense network (``finetune.distill``): off changes nothing, on
trains the student on Hinton's KD loss for PASS and baselines alike, the teacher is never
trained and survives a resume, and a dense network with a new head is refused as a teacher."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from passray import engine
from passray._cli import run_cli
from passray._state_io import load_state
from passray.config import ConfigError, load_config
from passray.models import classifier, create_backbone
from passray.pipeline import RunContext, Runtime, execute, pretrain
from passray.prune import main as prune_main

# 16x16 digits, a quarter-width convnet, 4 fine-tune steps: each run takes seconds on 2 shared cores
TINY = ["model.arch=convnet", "model.width=0.25", "data.name=digits", "data.image_size=16", "data.batch_size=64",
        "data.augment=false", "device=cpu", "seed=0", "bn_recalibration_batches=2"]
PRUNE = [*TINY, "data.limit_train=256", "budget.keep_ratio=0.3", "finetune.epochs=1", "search.epochs=1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense convnet trained on all 10 digit classes, head included (~98 % val)."""
    path = tmp_path_factory.mktemp("dense") / "dense.safetensors"
    cfg = load_config(None, [*TINY, "pretrain.epochs=3", "pretrain.lr=0.1", "pretrain.cache=false"])
    pretrain(cfg, path, Runtime(progress=False))
    return path


def _job(weights: Path, *extra: str, runtime: Runtime | None = None) -> RunContext:
    job = RunContext(load_config(None, [*PRUNE, f"model.weights={weights}", *extra]), runtime or Runtime(progress=False))
    execute(job)
    return job


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


# ---------------------------------------------------------------- the loss
def test_kd_gradient_is_hintons() -> None:
    """d/ds [(1-w)·CE + w·T²·KL] = (1-w)(p - onehot)/B + w·T(p_T - q_T)/B, p_T, q_T the softened
    student and teacher distributions; at w = 1 the labels play no part."""
    torch.manual_seed(0)
    student, teacher, y = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5), torch.randint(0, 5, (8,))
    w, t = 0.3, 4.0
    engine.distillation_loss(student, teacher, y, w, t).backward()
    soft = (F.softmax(student / t, 1) - F.softmax(teacher / t, 1)) * t
    hard = F.softmax(student, 1) - F.one_hot(y, 5)
    torch.testing.assert_close(student.grad, ((1 - w) * hard + w * soft).detach() / 8)
    grads = []
    for labels in (y, (y + 1) % 5):
        student.grad = None
        engine.distillation_loss(student, teacher, labels, 1.0, t).backward()
        grads.append(student.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_kd_step_trains_the_student_towards_the_teacher_only() -> None:
    """At w = 1 a student that already equals its teacher has nothing to learn (the KD gradient is
    the only one; it moves by rounding only), a different student moves; the teacher never does."""
    torch.manual_seed(0)
    batches = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(3)]
    teacher = nn.Linear(6, 3).eval().requires_grad_(False)
    before = copy.deepcopy(teacher.state_dict())
    distill = engine.Distillation(teacher, weight=1.0, temperature=2.0)
    moved = []
    for student in (copy.deepcopy(teacher).requires_grad_(True), nn.Linear(6, 3)):
        start = copy.deepcopy(student.state_dict())
        optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
        engine.run_epoch(student, batches, torch.device("cpu"), optimizer=optimizer, distill=distill)
        moved.append(max((start[k] - v).abs().max().item() for k, v in student.state_dict().items()))
    assert moved[0] < 1e-6 and moved[1] > 1e-2, moved
    _assert_same_state(teacher.state_dict(), before)


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("override, key", [
    ("finetune.distill.weight=1.5", "finetune.distill.weight"),
    ("finetune.distill.weight=-0.1", "finetune.distill.weight"),
    ("finetune.distill.temperature=0", "finetune.distill.temperature"),
    ("search.distill.weight=0.5", "search.distill"),  # only fine-tune has a dense teacher
])
def test_bad_distill_values_are_refused_in_one_line(override: str, key: str, capsys) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(prune_main, "passray.prune", ["--set", override])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and key in err, err


def test_distill_round_trips_and_is_logged_as_params() -> None:
    cfg = load_config(None, ["finetune.distill.weight=0.5", "finetune.distill.temperature=2"])
    assert load_config(None, base=cfg.to_dict()) == cfg
    assert {k: v for k, v in cfg.flat().items() if "distill" in k} == {
        "finetune.distill.weight": 0.5, "finetune.distill.temperature": 2.0}


# ---------------------------------------------------------------- the pipeline
def test_weight_zero_is_the_plain_fine_tune(dense: Path) -> None:
    """Bit for bit: no teacher is built, the loss is the cross-entropy it always was."""
    plain, off = _job(dense, "method=l1"), _job(dense, "method=l1", "finetune.distill.weight=0",
                                                "finetune.distill.temperature=2")
    assert off.teacher is None
    _assert_same_state(plain.net.state_dict(), off.net.state_dict())
    assert [h.get("train_loss") for h in plain.state.history] == [h.get("train_loss") for h in off.state.history]


@pytest.mark.parametrize("method", ["l1", "pass"])
def test_distillation_changes_fine_tune_and_never_the_teacher(dense: Path, method: str) -> None:
    plain = _job(dense, f"method={method}")
    taught = _job(dense, f"method={method}", "finetune.distill.weight=0.5")
    assert plain.masks is not None and all(torch.equal(a, b) for a, b in zip(plain.masks, taught.masks))  # same student
    tuned = lambda job: [h["train_loss"] for h in job.state.history if h["stage"] == "finetune"]  # noqa: E731
    assert tuned(plain) != tuned(taught)
    assert any(not torch.equal(a, b) for a, b in zip(plain.net.state_dict().values(), taught.net.state_dict().values()))
    teacher = taught.teacher  # the dense network as loaded, head included, after the whole run
    _assert_same_state(teacher.state_dict(), load_file(str(dense)))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_resumed_fine_tune_keeps_the_dense_teacher(dense: Path, tmp_path: Path) -> None:
    """The dense network of a run that pretrains exists only in its checkpoint once fine-tune runs:
    a resumed run must take it from there (rebuilding it would give the weights file's network)."""
    class SaveFirstFinetuneEpoch:
        def report(self, metrics: dict[str, Any], save_state) -> None:
            if metrics.get("stage") == "finetune" and metrics["epoch"] == 0 and save_state is not None:
                save_state(tmp_path / "checkpoint")

    extra = ("method=l1", "pretrain.epochs=1", "pretrain.lr=0.01", "pretrain.cache=false", "finetune.epochs=2",
             "finetune.distill.weight=0.5")
    first = _job(dense, *extra, runtime=Runtime(progress=False, reporter=SaveFirstFinetuneEpoch()))
    resumed = _job(dense, *extra, runtime=Runtime(progress=False, restored=load_state(tmp_path / "checkpoint")))
    in_file = load_file(str(dense))
    assert any(not torch.equal(v, in_file[k]) for k, v in first.teacher.state_dict().items())  # pretrained further
    _assert_same_state(resumed.teacher.state_dict(), first.teacher.state_dict())
    _assert_same_state(resumed.net.state_dict(), first.net.state_dict())


def test_a_new_head_is_no_teacher(dense: Path, tmp_path: Path) -> None:
    """``shifted``-style: the weights file has no head, the run trains a fresh one under the masks;
    the dense network with its random head would teach noise, so fine-tune refuses to start."""
    net = create_backbone(load_config(None, TINY).model, 10)
    head = next(name for name, module in net.named_modules() if module is classifier(net))
    headless = tmp_path / "headless.safetensors"
    save_file({k: v for k, v in load_file(str(dense)).items() if not k.startswith(f"{head}.")}, str(headless))
    out = tmp_path / "export"
    # seed 1: with the pretraining's seed the "fresh" head is the head pretraining started from, and the
    # features it learned still fit that one (72 % val here); with seed 1: dense 7 %, student 64 %
    cfg = load_config(None, [*PRUNE, f"model.weights={headless}", "method=l1", "head_epochs=3", "search.lr=0.05",
                             "budget.keep_ratio=0.7", "finetune.distill.weight=0.5", f"output_dir={out}", "seed=1"])
    with pytest.raises(ValueError, match=r"finetune\.distill\.weight=0\.5: the dense teacher .* no better than"):
        execute(RunContext(cfg, Runtime(progress=False, export_dir=str(out))))
    assert not out.exists()
    no_finetune = RunContext(cfg.derive({"finetune.epochs": 0}), Runtime(progress=False))
    execute(no_finetune)  # nothing to distil into: no teacher, nothing refused
    assert no_finetune.teacher is None
