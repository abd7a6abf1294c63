"""Draw schedule timelines: one row per rank, one box per compute action, labelled by micro-batch.

Uses matplotlib, the optional `plot` extra (pip install -e ".[plot]" in a clone). Forward, full
backward, input backward and weight backward boxes get distinct colours; gaps are bubbles.
"""

from __future__ import annotations

from pathlib import Path

from parallel.pipeline.simulate import SimulationResult

COLOURS = {"F": "#4C72B0", "B": "#8172B3", "I": "#DD8452", "W": "#55A868"}
LABELS = {"F": "forward", "B": "backward (full)", "I": "backward for inputs",
          "W": "backward for weights"}


def draw_timelines(panels: list[tuple[str, SimulationResult, str]], path: str | Path) -> None:
    """Draw each (title, result, time unit) side by side and save to `path` (.png or .svg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as error:
        raise RuntimeError("matplotlib not found: drawing a schedule needs the `plot` extra; "
                           "install it with pip install -e \".[plot]\" in a clone of microtron, "
                           "or with pip install matplotlib") from error

    num_ranks = max(result.num_ranks for _, result, _ in panels)
    figure, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 0.55 * num_ranks + 1.6),
                                squeeze=False)
    for ax, (title, result, unit) in zip(axes[0], panels):
        _draw_one(ax, result, title, unit)
    kinds = sorted({i.action.kind for _, r, _ in panels for i in r.intervals}, key="FBIW".index)
    figure.legend(handles=[Patch(color=COLOURS[k], label=LABELS[k]) for k in kinds],
                  loc="lower center", ncol=len(kinds), frameon=False)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _draw_one(ax, result: SimulationResult, title: str, unit: str) -> None:
    origin = min(result.first_start, default=0.0)
    for interval in result.intervals:
        a = interval.action
        start, width = interval.start - origin, interval.end - interval.start
        ax.barh(interval.rank, width, left=start, height=0.8, color=COLOURS[a.kind],
                edgecolor="white", linewidth=0.4)
        if width > 0.012 * (result.makespan - origin):
            ax.text(start + width / 2, interval.rank, str(a.microbatch), ha="center",
                    va="center", fontsize=6, color="white")
    ax.set_yticks(range(result.num_ranks), [f"rank {r}" for r in range(result.num_ranks)])
    ax.invert_yaxis()
    ax.set_xlabel(f"time ({unit})")
    ax.set_title(f"{title}\nbubble fraction {result.bubble_fraction:.3f}", fontsize=9)
    ax.set_xlim(0, result.makespan - origin)
