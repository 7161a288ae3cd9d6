"""What every ``python -m passray.<verb>`` shares: --config/--set/--debug, --help listing
every key, one-line errors, and plain-text result tables."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from passray.config import Config, ConfigError, describe_keys, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "tune_configs" / "quickstart.yaml"

__all__ = ["DEFAULT_CONFIG", "format_table", "load_from_args", "make_parser", "next_free", "run_cli"]


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
    return next(p for p in (path, *(path.with_name(f"{path.name}-{i}") for i in range(2, 100_000))) if not taken(p))


def run_cli(main: Callable[[list[str] | None], Any], prog: str, argv: Sequence[str] | None = None) -> None:
    """Run ``main``; user errors become one line on stderr and exit code 2 (unless --debug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main(argv)
    except (ConfigError, ValueError, OSError, KeyError, TypeError, RuntimeError) as err:
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
