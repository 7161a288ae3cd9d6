"""``python -m passray.prune``: one pruning run (PASS or a baseline) without Ray.

dense training (optional; reused when an earlier run trained the same one, ``pretrain.cache``)
-> scores or PASS search -> masks at the budget -> BN recalibration -> physical pruning ->
fine-tune -> export, then a result table and ``results.json`` in ``output_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path

from passray._cli import TABLE_COLUMNS, format_table, load_from_args, make_parser, next_free, run_cli
from passray.pipeline import Runtime, run

__all__ = ["main"]


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser("passray.prune", __doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    cfg = load_from_args(args)
    out = next_free(Path(cfg.output_dir))
    if out != Path(cfg.output_dir):  # never replace an earlier run's export (it may hold a hypernet)
        print(f"{cfg.output_dir} holds an earlier run; this run writes to {out}")
        cfg = cfg.model_copy(update={"output_dir": str(out)})
    result = run(cfg, Runtime(export_dir=str(out)))
    (out / "results.json").write_text(json.dumps({"config": cfg.to_dict(), "result": result}, indent=1))
    print(format_table([result], TABLE_COLUMNS))
    print(f"exported to {out}/ (structure.json, weights.safetensors{', hypernet/' if cfg.method == 'pass' else ''})")
    return result


if __name__ == "__main__":
    run_cli(main, "passray.prune")
