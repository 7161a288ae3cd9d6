"""Import directions (DESIGN.md section 2): every import in passray/ points down the layers.

Structure code never imports the method or the driver; nothing imports a command-line
entry point; the core never imports Ray, MLflow or Optuna. Late (in-function) imports count.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "passray"

# Lower layers first; a module may import only from layers below its own (or its own layer
# where it says so). A new module must be placed here, so its direction is a decision.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundation", {"_registry", "_state_io", "config", "equivalence", "run_state", "search_plot", "step_graph"}),
    ("decoded data", {"image_cache"}),
    ("inputs", {"_cli", "cost", "data", "models", "prompts"}),
    ("groups", {"groups"}),
    ("structure", {"budget", "importance", "latency", "network"}),
    ("tools", {"latency_tables", "prunability", "engine", "dense_cache", "hypernet"}),
    ("artifacts", {"export", "serving"}),
    ("stages", {"stages"}),
    ("method", {"search"}),
    ("driver", {"pipeline"}),
    ("shells", {"tracking", "_pyfunc_model", "_tune_report", "registry", "train", "transfer", "tune", "prune", "profile"}),
]
ENTRY_POINTS = {"prune", "profile"}  # pure CLIs: imported by nothing
OUTSIDE_CORE = {"ray", "mlflow", "optuna"}


def imports_of(path: Path, package: str = "passray") -> tuple[set[str], set[str]]:
    """(modules of ``package`` imported anywhere in the file, top-level names of other packages)."""
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == package:
                if len(parts) > 1:
                    inside.add(parts[1])
            else:
                outside.add(parts[0])
    return inside, outside


def wrong_way_imports(package_dir: Path, layers: list[tuple[str, set[str]]], entry_points: set[str],
                      outside_core: set[str]) -> list[str]:
    """Every import that breaks the layering, as 'a -> b (why)' lines; unplaced modules too."""
    rank = {module: i for i, (_, modules) in enumerate(layers) for module in modules}
    shells = len(layers) - 1
    modules = {p.stem: p for p in package_dir.glob("*.py") if p.stem != "__init__"}
    problems = [f"{m}: not placed in a layer" for m in sorted(modules) if m not in rank]
    for module, path in sorted(modules.items()):
        if module not in rank:
            continue
        inside, outside = imports_of(path, package_dir.name)
        for other in sorted(inside & set(modules)):
            if other == module:
                continue
            if other in entry_points:
                problems.append(f"{module} -> {other} (a command-line entry point)")
            elif rank.get(other, -1) > rank[module] or (rank.get(other) == rank[module] != shells):
                problems.append(f"{module} -> {other} ({layers[rank[module]][0]} imports {layers[rank[other]][0]})")
        if rank[module] < shells:
            problems += [f"{module} -> {pkg} (the core never imports it)" for pkg in sorted(outside & outside_core)]
    return problems


def test_passray_imports_point_down_the_layers() -> None:
    assert wrong_way_imports(PACKAGE, LAYERS, ENTRY_POINTS, OUTSIDE_CORE) == []


def test_the_check_finds_wrong_way_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "low.py").write_text("def f():\n    from pkg.high import g  # late, still counted\n")
    (pkg / "high.py").write_text("import ray\nfrom pkg import cli\n")
    (pkg / "cli.py").write_text("from pkg.low import f\n")
    (pkg / "new.py").write_text("")
    layers = [("low", {"low"}), ("high", {"high"}), ("shells", {"cli"})]
    assert wrong_way_imports(pkg, layers, {"cli"}, {"ray"}) == [
        "new: not placed in a layer", "high -> cli (a command-line entry point)",
        "high -> ray (the core never imports it)", "low -> high (low imports high)"]


def test_config_accepts_exactly_the_registered_methods() -> None:
    """config lists the methods without importing Torch-Pruning; importance registers the same ones."""
    from passray.config import METHODS
    from passray.importance import available_importances

    assert sorted(METHODS) == sorted(["pass", *available_importances()])
