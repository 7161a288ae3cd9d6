"""Bad input: one-line errors that name the cause, exit code 2, and nothing written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_together
from PIL import Image

from passray import profile
from passray._cli import run_cli
from passray.prune import main

FAST = ["--set", "model.arch=convnet", "--set", "model.width=0.25", "--set", "data.limit_train=64",
        "--set", "pretrain.epochs=0", "--set", "search.epochs=0", "--set", "finetune.epochs=0"]


def _image_folder(root: Path, classes: dict[str, int]) -> Path:
    """train/ and test/ with ``classes[name]`` tiny PNGs in each class folder (0: an empty folder)."""
    for split in ("train", "test"):
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


def _case(tmp_path: Path, name: str, data: Path) -> tuple[list[str], str]:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("data: [unclosed\n")
    tabbed = tmp_path / "tab.yaml"
    tabbed.write_text("data:\n\tname: digits\n")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- a\n- b\n")
    empty_yaml = tmp_path / "empty.yaml"
    empty_yaml.write_text("# nothing set yet\n")
    folder = ["--set", "data.name=imagefolder", "--set", f"data.root={data}"]
    cases = {
        "unknown key": (["--set", "dat.name=digits"], "config key 'dat': unknown key"),
        "unknown nested key": (["--set", "budget.keep=0.5"], "config key 'budget.keep': unknown key"),
        "budget above 1": (["--set", "budget.keep_ratio=1.5"], "budget.keep_ratio"),
        "budget zero": (["--set", "budget.keep_ratio=0"], "budget.keep_ratio"),
        "budget not a number": (["--set", "budget.keep_ratio=half"], "budget.keep_ratio"),
        "unknown method": (["--set", "method=magic"], "unknown method 'magic'"),
        "unknown arch": (["--set", "model.arch=resnet999"], "model.arch"),
        "unknown dataset": (["--set", "data.name=mnist"], "unknown dataset 'mnist'"),
        "missing data root": (["--set", "data.name=imagefolder", "--set", f"data.root={tmp_path}/nowhere"], "nowhere"),
        "bad classes": (["--set", "data.classes=[42]"], "data.classes"),
        "missing config file": (["--config", str(tmp_path / "missing.yaml")], "missing.yaml"),
        "invalid yaml": (["--config", str(bad_yaml)], "line 2: invalid YAML (expected ',' or ']'"),
        "tab in yaml": (["--config", str(tabbed)], "invalid YAML (a tab; YAML indents with spaces)"),
        "config not a mapping": (["--config", str(not_mapping)], "mapping"),
        "set without equals": (["--set", "budget.keep_ratio"], "key=value"),
        "prompt wider than image": (["--set", "prompt.size=20"], "prompt.size=20"),
        "unreachable budget": (["--set", "budget.keep_ratio=0.01", "--set", "budget.min_channels=8"], "min_channels"),
        "unknown prompt kind": (["--set", "prompt.kind=circle"], "prompt.kind"),
        "missing weights file": (["--set", f"model.weights={tmp_path}/w.safetensors"], "w.safetensors"),
        "empty config file": (["--config", str(empty_yaml)], f"config file {empty_yaml} is empty"),
        "infinite float": (["--set", "hypernet.lr=.inf"], "config key 'hypernet.lr': Input should be a finite number"),
        "nan float": (["--set", "finetune.distill.temperature=.nan"], "'finetune.distill.temperature': Input should"),
        "one class kept": (["--set", "data.classes=[3]"], "data.classes: [3] keeps one class"),
        "one-class imagefolder": (folder, f"(data.root={data}) has 1 class(es) ['cat']; a classifier needs at least 2"),
        "empty class folder": (folder, f"{data}: no images in class folder(s) train/dog, test/dog"),
    }
    return cases[name]


# what each case's data.root holds (an image folder of these classes and image counts)
FOLDERS = {"one-class imagefolder": {"cat": 2}, "empty class folder": {"cat": 2, "dog": 0, "eel": 2}}


NAMES = ["unknown key", "unknown nested key", "budget above 1", "budget zero", "budget not a number", "unknown method",
         "unknown arch", "unknown dataset", "missing data root", "bad classes", "missing config file", "invalid yaml", "tab in yaml",
         "config not a mapping", "set without equals", "prompt wider than image", "unreachable budget",
         "unknown prompt kind", "missing weights file", "empty config file", "infinite float", "nan float",
         "one class kept", "one-class imagefolder", "empty class folder"]


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_one_line_and_writes_nothing(name: str, tmp_path: Path, tmp_path_factory, capsys,
                                                  monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = tmp_path_factory.mktemp("images") / "folder"
    if name in FOLDERS:
        _image_folder(data, FOLDERS[name])
    args, needle = _case(tmp_path, name, data)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, "passray.prune", FAST + ["--set", f"output_dir={out}"] + args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("passray.prune: error: ") and "\n" not in err, err
    assert needle in err, err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in tmp_path.iterdir()
                                                                  if p.suffix == ".yaml")


def test_real_cli_error_exit_code_and_help(tmp_path: Path) -> None:
    bad, helped = run_together([sys.executable, "-m", "passray.prune", "--set", "budget.keep_ratio=2"],
                               [sys.executable, "-m", "passray.prune", "--help"], cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "budget.keep_ratio" in bad.stderr
    assert list(tmp_path.iterdir()) == []  # neither wrote anything
    assert helped.returncode == 0
    for key in ("budget.keep_ratio", "hypernet.hidden_size", "prompt.kind", "data.root", "train.num_workers"):
        assert key in helped.stdout
    # the values listed are the ones a run without --config gets (the embedded default), and help says so
    assert "model.arch = 'convnet'" in helped.stdout and "tune_configs/quickstart.yaml" in helped.stdout


def test_resume_of_a_missing_experiment_is_refused_before_ray_starts(tmp_path: Path) -> None:
    """A relative path, as README writes it; the refusal comes before Ray or MLflow start."""
    out = subprocess.run([sys.executable, "-m", "passray.tune", "--resume", "ray_results/nowhere"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "ray_results/nowhere" in lines[0] and "not a passray.tune experiment" in lines[0], lines
    assert "Ray" not in out.stdout + out.stderr and not (tmp_path / "mlflow.db").exists()


def test_a_second_prune_never_replaces_the_first_export(tmp_path: Path, capsys) -> None:
    """A baseline run after a PASS run in the same output_dir takes the next free name and says so."""
    out = tmp_path / "run"
    first = FAST + ["--set", "search.epochs=1", "--set", f"output_dir={out}"]
    main(first)
    assert (out / "hypernet").is_dir()
    main(FAST + ["--set", "method=l1", "--set", f"output_dir={out}"])
    assert (out / "hypernet").is_dir()  # the PASS export is untouched
    assert (tmp_path / "run-2" / "structure.json").is_file()
    assert f"this run writes to {tmp_path / 'run-2'}" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    main(FAST + ["--set", "method=l1", "--set", f"output_dir={tmp_path / 'empty'}"])  # an empty folder is free
    assert (tmp_path / "empty" / "structure.json").is_file() and not (tmp_path / "empty-2").exists()


@pytest.mark.parametrize("flag, value, least", [("--batch-size", 0, 1), ("--batch-size", -4, 1), ("--grid", 1, 2),
                                                 ("--repeats", 0, 1)])
def test_profile_refuses_counts_below_their_least(flag: str, value: int, least: int, tmp_path: Path, capsys,
                                                  monkeypatch) -> None:
    """--batch-size 0 used to become budget.latency_batch_size (256), --repeats 0 one sample: refused now."""
    monkeypatch.setenv("PASSRAY_LATENCY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "table.json"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(profile.main, "passray.profile", ["--set", "model.arch=convnet", "--set", "model.width=0.25",
                                                  "--device", "cpu", "--out", str(out), flag, str(value)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"passray.profile: error: {flag} {value}: must be at least {least}", err
    assert list(tmp_path.iterdir()) == []


def test_runtime_env_states_the_upload_cap_ray_job_submit_enforces() -> None:
    """`ray job submit` PUTs the zipped working_dir to the dashboard, whose aiohttp body limit is the cap."""
    from ray._private.ray_constants import DASHBOARD_CLIENT_MAX_SIZE

    text = (Path(__file__).resolve().parent.parent / "cluster" / "runtime_env.yaml").read_text()
    stated = re.search(r"refuses a\s+#?\s*body over (\d+) MiB", text)
    assert stated and int(stated.group(1)) * 1024**2 == DASHBOARD_CLIENT_MAX_SIZE
