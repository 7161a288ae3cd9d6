"""``python -m passray.profile``: time a backbone's layers at a grid of widths and cache the latency table
(the table and its builder: ``passray.latency_tables``)."""

from __future__ import annotations

import argparse

from passray._cli import format_table, load_from_args, make_parser, run_cli
from passray.data import load_dataset
from passray.engine import resolve_device
from passray.groups import build_groups
from passray.latency import DTYPES, LatencyTable, cache_path
from passray.latency_tables import analytic_table, build_table, load_or_build_table  # noqa: F401 (the CLI's API)
from passray.models import backbone_id, create_backbone

__all__ = ["analytic_table", "build_table", "load_or_build_table", "main", "summary"]


# ---------------------------------------------------------------- CLI
def summary(table: LatencyTable) -> str:
    """Dense predicted latency and every layer's share of it, in network order."""
    total = table.dense_ms
    rows = [{"layer": n, "kind": t.kind, "in": t.in_counts[-1], "out": t.out_counts[-1], "dense_ms": t.dense_ms,
             "share": t.dense_ms / total} for n, t in table.layers.items()]
    rows.append({"layer": "(rest: adds, pools, overhead)", "dense_ms": table.rest_ms, "share": table.rest_ms / total})
    measured = f", measured forward {table.dense_measured_ms:.4f} ms" if table.dense_measured_ms is not None else ""
    head = (f"{table.source} latency table: {table.key['backbone']} on {table.key['device']}, batch "
            f"{table.key['batch_size']}, {table.key['dtype']}\ndense predicted {total:.4f} ms/batch{measured}")
    return head + "\n" + format_table(rows, ["layer", "kind", "in", "out", "dense_ms", "share"])


def _refuse_small_counts(args: argparse.Namespace) -> None:
    """Refused before any work, never replaced: a 0 that quietly became a default times a table nobody asked for."""
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--grid", args.grid, 2),
                               ("--repeats", args.repeats, 1)):
        if value is not None and value < least:
            raise ValueError(f"{flag} {value}: must be at least {least}")


def main(argv: list[str] | None = None) -> LatencyTable:
    parser = make_parser("passray.profile", __doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, help="serving batch size (default: budget.latency_batch_size)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 if amp on CUDA, else fp32")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: the config's device)")
    parser.add_argument("--grid", type=int, default=8, help="widths per dimension: k/grid for k = 1..grid")
    parser.add_argument("--repeats", type=int, default=5, help="timing samples per point (median on a GPU, minimum on a CPU)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (CUDA convs)")
    parser.add_argument("--out", help="output JSON (default: the cache path the pipeline looks up)")
    args = parser.parse_args(argv)
    _refuse_small_counts(args)
    cfg = load_from_args(args)
    device = resolve_device(args.device or cfg.device)
    ds = load_dataset(cfg.data)  # input size and head size, as the pipeline sees them
    backbone = create_backbone(cfg.model.model_copy(update={"weights": None}), ds.num_classes).to(device)
    dtype = args.dtype or ("bf16" if cfg.amp and device.type == "cuda" else "fp32")
    batch = cfg.budget.latency_batch_size if args.batch_size is None else args.batch_size
    table = build_table(build_groups(backbone, ds.image_size), backbone_id(cfg.model), batch, dtype, device, args.grid,
                        args.repeats, args.channels_last)
    path = table.save(args.out or cache_path(table.key))
    print(summary(table))
    print(f"saved to {path}")
    return table


if __name__ == "__main__":
    run_cli(main, "passray.profile")
