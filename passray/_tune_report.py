"""What a person reads from ``passray.tune``: the live trial table, trial names, and the
results (table, ``results.json``, ``pareto.png``) with the dense network as the reference.

Ray's default console prints every trial's whole config and every result key; here the
live table shows only what was searched and what decides (stage, val accuracy, MACs),
and trial names and folders carry the *sampled* values.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any, Iterable

from ray import tune
from ray.tune.experiment import Trial

from passray._cli import format_table
from passray._state_io import write_atomically

__all__ = ["PARTIAL_NOTE", "TrialTable", "dense_row", "pareto_figure", "pareto_front", "results_table", "short_names",
           "trial_name", "trial_rows", "write_results"]

# config keys every results.json row carries, searched or not, so that rows of different experiments compare
ROW_KEYS = ("prompt.kind", "prompt.size", "hypernet.hidden_size", "budget.keep_ratio")
HEARTBEAT_S = 60.0  # the live table reprints on a status change, else at most this often while trials progress
SETTLE_S = 5.0  # status changes that come together (a trial ends, the next starts) make one table
MAX_NAME = 120  # trial folder names stay well under the 255-byte file-name limit
LABELLED_TRIALS = 20  # pareto.png names every trial up to this many, else only the front's
PARTIAL_NOTE = "PARTIAL: the experiment was interrupted; its unfinished trials say so (--resume continues them)"


def short_names(keys: Iterable[str]) -> dict[str, str]:
    """Column header / name part of each searched key: its last part (``keep_ratio``), or the whole
    key where two last parts would read the same."""
    keys = list(keys)
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "-" if value is None else str(value)


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.1f}"


def trial_name(trial: Trial) -> str:
    """``<trial id>_<key>=<sampled value>,...``: Tune's trial name and folder (its default shows the
    base config's values, not the sampled ones, cut at 130 characters)."""
    values = ",".join(f"{short}={_value(trial.config.get(key))}" for key, short in short_names(trial.config).items())
    name = f"{trial.trial_id}_{values}" if values else trial.trial_id
    return re.sub(r"[^\w.,=+-]", "_", name)[:MAX_NAME]


class TrialTable(tune.ProgressReporter):
    """Tune's live console: one compact table of the trials, printed when trials change status
    (``settle_s`` after the last table at the earliest) and every ``heartbeat_s`` while results
    arrive. Ray's default prints a config table per trial with every key, and a result table
    per trial with every metric."""

    def __init__(self, keys: list[str], heartbeat_s: float = HEARTBEAT_S, settle_s: float = SETTLE_S) -> None:
        self.keys, self.heartbeat_s, self.settle_s = keys, heartbeat_s, settle_s
        self.setup()

    def setup(self, start_time: float | None = None, **kwargs) -> None:
        """Tune calls this when a run starts, and again on ``--resume`` (the reporter is restored with it)."""
        self._started = self._printed_at = start_time or time.time()
        self._statuses: tuple = ()
        self._iterations: tuple = ()

    def should_report(self, trials: list[Trial], done: bool = False) -> bool:
        statuses = tuple((t.trial_id, t.status) for t in trials)
        iterations = tuple(t.last_result.get("training_iteration") for t in trials)
        changed = statuses != self._statuses
        due = time.time() - self._printed_at >= (self.settle_s if changed else self.heartbeat_s)
        if not (changed or iterations != self._iterations) or not (due or done):
            return False
        self._statuses, self._iterations, self._printed_at = statuses, iterations, time.time()
        return True

    def report(self, trials: list[Trial], done: bool, *sys_info: str) -> None:
        print(self.render(trials))

    def render(self, trials: list[Trial]) -> str:
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        minutes, seconds = divmod(int(time.time() - self._started), 60)
        short = short_names(self.keys)
        rows = []
        for t in trials:
            last = t.last_result
            rows.append({"trial": t.trial_id, **{short[k]: _value(t.config.get(k)) for k in self.keys},
                         "status": t.status, "iter": last.get("training_iteration"), "stage": last.get("stage"),
                         "val %": _percent(last.get("val_accuracy")), "MACs %": _percent(last.get("macs_ratio"))})
        head = f"[{minutes} min {seconds:02d} s] trials: " + ", ".join(f"{n} {s}" for s, n in counts.items())
        columns = ["trial", *short.values(), "status", "iter", "stage", "val %", "MACs %"]
        return f"{head}\n{format_table(rows, columns)}\n"


# ---------------------------------------------------------------- results
def trial_rows(results, base_flat: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per trial of a Tune ``ResultGrid``: sampled values over the base config, final metrics."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        rows.append({"trial": metrics.get("trial_id", "-"), **{k: base_flat.get(k) for k in ROW_KEYS},
                     **(result.config or {}),
                     **{k: metrics.get(k) for k in ("macs_ratio", "val_accuracy", "test_accuracy", "dense_val_accuracy",
                                                    "mlflow_run_id", "node_id", "wall_seconds")},
                     "status": "ERROR" if result.error else metrics.get("stage", "-")})
    return rows


def dense_row(pretrained: dict[str, Any] | None, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The unpruned backbone as a reference row (all MACs): this experiment's dense training, else the
    dense val accuracy the trials measured (a backbone from ``model.weights``); None if neither."""
    pretrained = pretrained or {}
    val = pretrained.get("val_accuracy")
    if val is None:
        val = next((r["dense_val_accuracy"] for r in rows if r.get("dense_val_accuracy") is not None), None)
    if val is None:
        return None
    return {"trial": "dense", "macs_ratio": 1.0, "val_accuracy": val, "test_accuracy": pretrained.get("test_accuracy"),
            "status": "reference"}


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows not dominated in (higher val_accuracy, lower macs_ratio)."""
    done = [r for r in rows if r.get("status") == "done" and r.get("val_accuracy") is not None
            and r.get("macs_ratio") is not None]
    front = [r for r in done if not any(
        o["val_accuracy"] >= r["val_accuracy"] and o["macs_ratio"] <= r["macs_ratio"]
        and (o["val_accuracy"] > r["val_accuracy"] or o["macs_ratio"] < r["macs_ratio"]) for o in done)]
    return sorted(front, key=lambda r: r["macs_ratio"])


def results_table(rows: list[dict[str, Any]], keys: list[str], dense: dict[str, Any] | None = None) -> str:
    """The searched values and the final accuracies in percent, dense first: narrow enough for a
    terminal (every other field is in ``results.json``)."""
    short = short_names(keys)
    cells = [{"trial": r["trial"], **{short[k]: _value(r.get(k)) for k in keys},
              "MACs %": _percent(r.get("macs_ratio")), "val %": _percent(r.get("val_accuracy")),
              "test %": _percent(r.get("test_accuracy")), "status": r.get("status")}
             for r in ([dense] if dense else []) + rows]
    return format_table(cells, ["trial", *short.values(), "MACs %", "val %", "test %", "status"])


def pareto_figure(rows: list[dict[str, Any]], front: list[dict[str, Any]], dense: dict[str, Any] | None, title: str):
    """Val accuracy against MACs kept, both in percent: every finished trial labelled with its id,
    the front as a line under rings (the dots stay visible), the dense network as a dashed line."""
    from matplotlib.figure import (
        Figure,  # no pyplot: no global figure state, no GUI backend
    )

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    done = [r for r in rows if r.get("status") == "done" and r.get("val_accuracy") is not None
            and r.get("macs_ratio") is not None]
    ax.scatter([100 * r["macs_ratio"] for r in done], [100 * r["val_accuracy"] for r in done], s=25, zorder=3,
               label="trials")
    ax.plot([100 * r["macs_ratio"] for r in front], [100 * r["val_accuracy"] for r in front], "-", color="C3", lw=1.2,
            zorder=2, label="Pareto front")
    ax.scatter([100 * r["macs_ratio"] for r in front], [100 * r["val_accuracy"] for r in front], s=110,
               facecolors="none", edgecolors="C3", zorder=4)
    for r in done if len(done) <= LABELLED_TRIALS else front:
        ax.annotate(r["trial"], (100 * r["macs_ratio"], 100 * r["val_accuracy"]), xytext=(5, 4),
                    textcoords="offset points", fontsize=7)
    if dense is not None:
        ax.axhline(100 * dense["val_accuracy"], color="grey", ls="--", lw=1, zorder=1,
                   label=f"dense ({100 * dense['val_accuracy']:.1f} %, 100 % MACs)")
    ax.set_xlabel("MACs kept (% of dense)")
    ax.set_ylabel("val accuracy (%)")
    ax.set_title(title)
    ax.margins(0.12)  # room for the labels at the edges
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def write_results(out: Path, rows: list[dict[str, Any]], front: list[dict[str, Any]], dense: dict[str, Any] | None,
                  keys: list[str], title: str, partial: bool = False) -> tuple[str, str]:
    """``results.json`` (every field), ``results.txt`` and ``pareto.png``; returns the trial and front tables.

    ``partial``: the experiment was interrupted; every file says so (``"partial": true``, a first line,
    the plot's title), so that no one mistakes its front for the sweep's."""
    table, front_table = results_table(rows, keys, dense), results_table(front, keys, dense)
    note = f"{PARTIAL_NOTE}\n\n" if partial else ""
    write_atomically(out / "results.json", json.dumps(
        {"partial": partial, "dense": dense, "trials": rows, "pareto_front": front}, indent=1, default=str))
    write_atomically(out / "results.txt", f"{note}{table}\n\nPareto front:\n{front_table}\n")
    png = io.BytesIO()
    pareto_figure(rows, front, dense, f"{title} (partial)" if partial else title).savefig(png, dpi=120, format="png")
    write_atomically(out / "pareto.png", png.getvalue())
    return table, front_table
