"""One picture of a PASS search: did it learn, and what structure did it find?

Left: masked val accuracy per search epoch (after BN recalibration, what ``keep: best``
decides on) against the start, with the overlap of each epoch's masks with the initial
masks and with global Taylor's. Right: kept width per group, the searched structure next
to global Taylor's at the same budget. Drawn from the ``search`` record of
``structure.json``, so any export can be re-plotted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_search"]


def plot_search(structure: dict[str, Any], path: str | Path) -> bool:
    """Write ``path`` (PNG); False when there is nothing to draw or matplotlib is missing."""
    search = structure.get("search")
    if not search or not search.get("val_per_epoch"):
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = list(range(1, len(search["val_per_epoch"]) + 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    left.plot([0, *epochs], [search["initial_val"], *search["val_per_epoch"]], "o-", label="masked val accuracy")
    left.axhline(search["initial_val"], color="grey", ls=":", label="initial masks")
    left.set_xticks([0, *epochs])
    left.set_xlabel("search epoch (0 = initial masks)")
    left.set_ylabel("masked val accuracy (BN recalibrated)")
    left.grid(alpha=0.3)
    twin = left.twinx()
    twin.plot(epochs, search["overlap_initial"], "s--", color="tab:green", alpha=0.7, label="overlap with initial masks")
    twin.plot(epochs, search["overlap_taylor"], "^--", color="tab:red", alpha=0.7, label="overlap with global Taylor")
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("kept-channel overlap (IoU)")
    lines = left.get_legend_handles_labels(), twin.get_legend_handles_labels()
    left.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8, loc="lower right")
    left.set_title(f"search (best epoch kept: val {100 * search['best_val']:.2f} %)")
    names = [g["name"] for g in structure["groups"]]
    x = range(len(names))
    right.bar([i - 0.2 for i in x], [len(g["kept"]) for g in structure["groups"]], width=0.4, label="PASS")
    right.bar([i + 0.2 for i in x], search["taylor_kept"], width=0.4, label="global Taylor (same budget)")
    right.step([i + 0.5 for i in range(-1, len(names))], [structure["groups"][0]["width"]] + [g["width"] for g in structure["groups"]],
               color="grey", lw=0.8, label="dense width")
    right.set_xticks(list(x), names, rotation=70, fontsize=7)
    right.set_ylabel("kept channels")
    right.set_title("kept width per group")
    right.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
