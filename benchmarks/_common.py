"""What ``quality.py`` and ``speed.py`` share: resumable results files, a wall-clock budget,
environment records, an in-process dataset cache and mean/std helpers.

Both scripts run on a GPU machine in commands of at most 10 minutes, so every finished row
is written at once (temp file + ``os.replace``: a killed command never leaves half a JSON)
and a re-run skips the rows already there. A results file remembers the protocol it was
made with and refuses rows made under another one, so a resumed run never mixes recipes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("passray") is None:  # run from a plain checkout (GPU machine): use the repo's code
    sys.path.insert(0, str(REPO))

__all__ = ["REPO", "ResultsFile", "TimeBudget", "cached_datasets", "cli", "command_line", "deterministic",
           "environment", "estimate", "gpu_settings", "mean_std", "now", "sha256_file", "write_atomic"]

SCHEMA_VERSION = 1


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    """The invocation as a shell line (``python benchmarks/x.py ...``) that reproduces this run."""
    return shlex.join(["python", *sys.argv])


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a sibling temp file, then rename it over ``path`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cli(main: Callable[[list[str] | None], int], prog: str) -> None:
    """passray's CLI conventions (one-line errors, ``--debug`` for tracebacks); exit with ``main``'s code."""
    from passray._cli import run_cli

    def run(argv: list[str] | None) -> None:
        code = main(argv)
        if code:
            sys.exit(code)

    run_cli(run, prog)


def gpu_settings() -> dict[str, Any]:
    """cuDNN autotuning on, TF32 off; returns the settings for the results file.

    Autotuning: many pruned shapes, each tuned once, numbers unchanged. TF32 off: the
    heavy work runs in bf16 autocast anyway, and fp32 must mean fp32 where it matters --
    the pipeline's masked == pruned check (tolerance 1e-4) fails under TF32 convolutions,
    and fp32 inference timings should be fp32.
    """
    import torch

    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def deterministic():
    """Bit-reproducible training inside the block (cuDNN deterministic, no autotuning).

    Device commands are short and a fresh machine starts bare, so a backbone may have to be
    re-trained there; it must come out identical (callers check its sha256). Needs
    ``CUBLAS_WORKSPACE_CONFIG`` set before CUDA starts (the scripts set it at import).
    """
    import torch

    import torch.utils.deterministic as det

    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    # warn_only: the adaptive-pool backward is flagged, yet with a 1x1 output every input
    # cell gets exactly one atomic add, so it is deterministic all the same.
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = False  # NaN-filling every empty tensor costs time and changes no result
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2])
        det.fill_uninitialized_memory = saved[3]


def _git() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    if head.returncode != 0:
        return {}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def environment() -> dict[str, Any]:
    """Device name, library versions and the code that ran (reproducibility record)."""
    import torch
    import torchvision

    import passray

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
        "gpu_count": torch.cuda.device_count(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "passray": str(Path(passray.__file__).parent), "git": _git(),
    }
    for name in ("timm", "torch_pruning"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    return env


class ResultsFile:
    """One JSON file of rows that a re-run extends instead of repeating.

    ``key_fields`` name the fields that identify a row; ``protocol`` is everything that
    must be equal for two rows to be comparable (epochs, recipe, backbone, data). Several
    processes may share one file (e.g. one per setting on a GPU that one alone leaves
    idle): every save merges with what is on disk under a lock, so no writer loses rows.
    """

    def __init__(self, path: str | Path, benchmark: str, key_fields: Sequence[str],
                 protocol: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path}: not valid JSON ({err}); move it away to start afresh") from None
            if self.data.get("benchmark") != benchmark:
                raise ValueError(f"{self.path}: holds {self.data.get('benchmark')!r} results, not {benchmark!r}")
        else:
            self.data = {"schema_version": SCHEMA_VERSION, "benchmark": benchmark, "rows": [], "invocations": []}
        if protocol is not None:
            self._check_protocol(protocol)

    def _check_protocol(self, protocol: dict[str, Any]) -> None:
        saved = self.data.get("protocol")
        normal = json.loads(json.dumps(protocol))  # tuples -> lists, as they come back from disk
        if saved is not None and saved != normal:
            diff = [k for k in sorted(set(saved) | set(normal)) if saved.get(k) != normal.get(k)]
            first = diff[0]
            raise ValueError(f"{self.path} was made with another protocol ({first}: {saved.get(first)!r} there, "
                             f"{normal.get(first)!r} now; {len(diff)} difference(s)); use another --results file")
        self.data["protocol"] = normal

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.data["rows"]

    def key(self, row: dict[str, Any]) -> tuple:
        return tuple(row.get(f) for f in self.key_fields)

    def has(self, key: tuple) -> bool:
        return any(self.key(r) == key for r in self.rows)

    def start_invocation(self, extra: dict[str, Any] | None = None) -> None:
        """Record this command line, device and versions (the latest one also at top level)."""
        record = {"command": command_line(), "started": now(), "environment": environment(), **(extra or {})}
        self.data["invocations"].append(record)
        self.data["command"] = record["command"]
        self.data["environment"] = record["environment"]
        self.save()

    def absorb(self, other: "ResultsFile") -> None:
        """Take the rows, invocations and backbones of a file made under the same protocol
        (e.g. one per process of a GPU command that ran several at once)."""
        if other.data.get("protocol") is None:
            raise ValueError(f"{other.path}: records no protocol")
        self._check_protocol(other.data["protocol"])
        for name, mine in self.data.get("backbones", {}).items():  # rows of other weights must not share a table
            theirs = other.data.get("backbones", {}).get(name, {})
            if theirs.get("sha256") not in (None, mine.get("sha256")):
                raise ValueError(f"{other.path}: backbone {name!r} has sha256 {theirs['sha256'][:12]}, "
                                 f"{self.path} has {mine.get('sha256', '')[:12]}: not the same weights")
        self.data = self._merge(self.data, {k: v for k, v in other.data.items() if k != "summary"})
        self.save()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.save()

    def save(self, replace: bool = False) -> None:
        """Merge with what other writers saved meanwhile (their rows kept; ``replace``: ours win where keys meet)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.is_file():
                disk = json.loads(self.path.read_text())
                if replace:
                    mine = {self.key(r) for r in self.rows}
                    disk["rows"] = [r for r in disk.get("rows", []) if self.key(r) not in mine]
                self.data = self._merge(disk, self.data)
            write_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=False) + "\n")

    _APPENDED = ("rows", "invocations", "failures")  # every writer's entries are kept

    def _merge(self, disk: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
        merged = {**disk, **mine}
        for name in self._APPENDED:
            old, new = disk.get(name, []), mine.get(name, [])
            ident = self.key if name == "rows" else (lambda x: json.dumps(x, sort_keys=True))
            seen = {ident(x) for x in old}
            merged[name] = old + [x for x in new if ident(x) not in seen]
        for name, value in mine.items():  # e.g. quality's per-setting backbones
            if isinstance(value, dict) and isinstance(disk.get(name), dict):
                merged[name] = {**disk[name], **value}
        return merged


class TimeBudget:
    """Wall-clock budget of one command: start a unit of work only if it should finish in time."""

    def __init__(self, seconds: float | None, reserve: float = 0.0) -> None:
        self.seconds, self.reserve = seconds, reserve
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allows(self, estimate: float | None) -> bool:
        """Unknown estimates are allowed (the first unit of a kind must run to be measured)."""
        if self.seconds is None or estimate is None:
            return True
        return self.elapsed() + estimate + self.reserve <= self.seconds


def estimate(rows: Iterable[dict[str, Any]], field: str, matchers: Sequence[Callable[[dict[str, Any]], bool]],
             margin: float = 1.15, extra: float = 5.0) -> float | None:
    """Time of a new unit from finished ones: the slowest match of the first matcher that has any."""
    rows = list(rows)
    for match in matchers:
        times = [r[field] for r in rows if match(r) and isinstance(r.get(field), (int, float))]
        if times:
            return max(times) * margin + extra
    return None


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample std (ddof 1; 0 for one value) and count of the non-missing values."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std, len(xs)


class _DatasetCache:
    """Decode each dataset once per process: every run of a benchmark asks for its data again.

    ``load`` is a ``Runtime.load_data`` (the pipeline's data source) memoised by the whole
    ``DataConfig``, so every run still sees exactly the dataset its config describes (and the
    configs stored with the rows stay valid ``passray.prune`` configs).
    """

    def __init__(self) -> None:
        self.cache: dict[str, Any] = {}
        self.load_seconds: dict[str, float] = {}

    def load(self, cfg):
        from passray.data import load_dataset

        key = cfg.model_dump_json()
        if key not in self.cache:
            t0 = time.perf_counter()
            self.cache[key] = load_dataset(cfg)
            self.load_seconds[key] = time.perf_counter() - t0
        return self.cache[key]

    def loaded(self, data_cfg) -> bool:
        return data_cfg.model_dump_json() in self.cache

    def typical_load_seconds(self) -> float | None:
        return max(self.load_seconds.values()) if self.load_seconds else None


cached_datasets = _DatasetCache()
