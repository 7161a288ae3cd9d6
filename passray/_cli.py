"""What every ``python -m passray.<verb>`` shares: --config/--set/--debug, --help listing
every key, one-line errors (exit 2; Ctrl-C: exit 130), the refusal to resume a run with
another config, and plain-text result tables."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from safetensors import SafetensorError  # a torn or full-disk weights file: bad input, not a bug

from passray.config import Config, ConfigError, describe_keys, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "tune_configs" / "quickstart.yaml"

__all__ = ["DEFAULT_CONFIG", "EXIT_INTERRUPTED", "TABLE_COLUMNS", "config_record", "format_table", "load_from_args",
           "make_parser", "next_free", "refuse_other_config", "run_cli"]

EXIT_INTERRUPTED = 130  # what a shell reports for a program ended by Ctrl-C (128 + SIGINT)
# the result table of one pruning run, as passray.prune and passray.train print it
TABLE_COLUMNS = ["method", "keep_ratio", "macs_ratio", "params_ratio", "speedup_predicted", "speedup_measured",
                 "dense_val_accuracy", "initial_masked_val_accuracy", "search_val_accuracy", "val_accuracy_before_finetune",
                 "test_accuracy_before_finetune", "val_accuracy", "test_accuracy", "wall_seconds"]


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The values listed are what a run without --config uses: the embedded default over the built-ins."""
    defaults = load_config(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None
    source = f"{DEFAULT_CONFIG.parent.name}/{DEFAULT_CONFIG.name}" if defaults is not None else "the built-in defaults"
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"config keys (set in YAML or with --set key=value), with the values a run without --config uses "
               f"({source}):\n" + "\n".join(describe_keys(defaults)))
    parser.add_argument("--config", help=f"YAML config file (keys below; default: {source})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set budget.keep_ratio=0.25 (repeatable)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def load_from_args(args: argparse.Namespace) -> Config:
    """--config, else the embedded default (``tune_configs/quickstart.yaml``), plus --set overrides."""
    return load_config(args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None), args.set)


def next_free(path: Path) -> Path:
    """``path`` if nothing (or an empty folder) is there, else the first free ``path-2``, ``path-3``, ...:
    a new run never overwrites an earlier one's output."""
    taken = lambda p: p.exists() and not (p.is_dir() and not any(p.iterdir()))  # noqa: E731
    candidates = itertools.chain([path], (path.with_name(f"{path.name}-{i}") for i in itertools.count(2)))
    return next(p for p in candidates if not taken(p))


def config_record(flat: Mapping[str, Any]) -> dict[str, Any]:
    """What a run stores at its start to recognise its config on resume: the flat config (to name
    a differing key) and its hash (to show and compare at a glance)."""
    canonical = json.dumps(flat, sort_keys=True, default=str)
    return {"config_hash": hashlib.sha1(canonical.encode()).hexdigest()[:12], "config": json.loads(canonical)}


def refuse_other_config(recorded: Mapping[str, Any], flat: Mapping[str, Any], what: str) -> None:
    """Raise a one-line ``ConfigError`` naming the first key where ``flat`` differs from the
    ``config_record`` that ``what`` (e.g. "experiment DIR") was started with: resuming it with
    another config would mix two runs under one record (and load state the model cannot hold)."""
    current = config_record(flat)
    if current["config_hash"] == recorded["config_hash"]:
        return
    old, new = recorded["config"], current["config"]
    key = next(k for k in [*new, *old] if old.get(k, "<unset>") != new.get(k, "<unset>"))
    raise ConfigError(f"config key '{key}': {what} was started with {old.get(key, '<unset>')!r}, not "
                      f"{new.get(key, '<unset>')!r} (config {recorded['config_hash']} vs {current['config_hash']}); "
                      f"resume it with the config it was started with, or start a new run")


def run_cli(main: Callable[[list[str] | None], Any], prog: str, argv: Sequence[str] | None = None) -> None:
    """Run ``main``; user errors become one line on stderr and exit code 2, an interruption
    (Ctrl-C) one line and exit code 130 (both with a traceback under --debug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main(argv)
    except KeyboardInterrupt as err:
        if "--debug" in argv:
            raise
        print(f"{prog}: interrupted" + (f": {err}" if str(err) else ""), file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except (ConfigError, ValueError, OSError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        if "--debug" in argv:
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])
