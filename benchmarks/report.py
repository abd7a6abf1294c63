"""Write a sweep's rows as CSV, a markdown report, JSON and PNG plots.

Per-rank figures (peak memory, shares, bubbles) are written as space-separated lists in rank
order in the CSV and JSON. The plots need matplotlib (the `plot` extra). Without it the report
states that it has no plots, and the other files are still written.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from benchmarks.results import bubble_checks, target_ratios

log = logging.getLogger("microtron.benchmarks")

COLUMNS = (
    "workload", "label", "impl", "tp", "pp", "dp", "schedule", "virtual_stages", "micro_batches",
    "layers_per_stage", "threads", "ranks", "status", "step_s", "step_s_min", "step_s_max", "step_s_rounds",
    "tokens_per_s", "cpu_s", "cpu_busy", "model_gflops", "mfu", "vs_torch_1_thread", "comm_share",
    "pipeline_wait_share", "comm_mib_per_step", "bubble", "bubble_sim", "peak_memory_mib",
)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(_cell(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def flat_row(row: dict) -> dict:
    point = row["point"]
    values = point.job_args()
    values.update({"label": point.label, "ranks": point.world_size})
    values.update({key: value for key, value in row.items() if key != "point"})
    return {column: _cell(values.get(column)) for column in COLUMNS}


def add_baseline_ratios(rows: list[dict]) -> None:
    """Set each row's step time relative to plain PyTorch with one thread on its workload."""
    baselines = {r["point"].workload: r["step_s"] for r in rows
                 if r["point"].impl == "torch" and r["point"].threads == 1 and r.get("step_s")}
    for row in rows:
        base = baselines.get(row["point"].workload)
        if base and row.get("step_s"):
            row["vs_torch_1_thread"] = row["step_s"] / base


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(flat_row(row))


def write_json(path: Path, rows: list[dict], context: dict) -> None:
    data = {"context": context, "rows": [flat_row(row) for row in rows],
            "targets": target_ratios(rows), "bubble_checks": bubble_checks(rows)}
    path.write_text(json.dumps(data, indent=1))


def _mean(values) -> float | None:
    return sum(values) / len(values) if values else None


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def markdown(rows: list[dict], context: dict, plots: list[str] | None) -> str:
    """Return the report: the context, one table per workload, the targets and the plots."""
    lines = ["# Benchmark results", ""]
    lines += [f"- {key}: {value}" for key, value in context.items()]
    for workload in dict.fromkeys(r["point"].workload for r in rows):
        lines += ["", f"## {workload}", "",
                  "| point | ranks x threads | step s (min-max) | tokens/s | CPU s (busy) | "
                  "model GFLOP/s | MFU | vs torch 1 thread | comm share | pipeline wait | "
                  "bubble (measured / simulated) | peak MiB per rank | loss check |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in (r for r in rows if r["point"].workload == workload):
            lines.append(_markdown_row(row))
    lines += ["", "## Targets", "", "| workload | target | ours | peer | ratio | limit | met |",
              "|---|---|---|---|---|---|---|"]
    for t in target_ratios(rows):
        ratio = "" if t["ratio"] is None else f"{t['ratio']:.3f}"
        met = {None: "not measured", True: "yes", False: "no"}[t["met"]]
        lines.append(f"| {t['workload']} | {t['target']} | {t['ours'] or ''} | {t['peer'] or ''} | "
                     f"{ratio} | {t['limit']} | {met} |")
    checks = bubble_checks(rows)
    lines += ["", "Measured bubble within 0.05 of the simulator's replay: "
              + ("; ".join(f"{c['label']}: gap {c['gap']:.3f} ({'yes' if c['met'] else 'no'})"
                           for c in checks)
                 if checks else "not measured (the pipeline runtime records no action times)")]
    if plots is None:
        lines += ["", "The plots are written when the sweep ends."]
    elif plots:
        lines += [""] + [f"![{name}]({name})" for name in plots]
    else:
        lines += ["", "No plots: matplotlib is not installed (`pip install -e \".[plot]\"`)."]
    return "\n".join(lines) + "\n"


def _markdown_row(row: dict) -> str:
    point = row["point"]
    head = f"| {point.label} | {point.world_size} x {point.threads} |"
    if row.get("step_s") is None:
        return head + " |" * 10 + f" {row['status']} |"
    bubble = ""
    if row.get("bubble") is not None:
        bubble = " ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(row["bubble"], row["bubble_sim"]))
    ratio = row.get("vs_torch_1_thread")
    rounds = row.get("step_s_rounds") or []
    each_round = "; rounds " + " ".join(f"{s:.3f}" for s in rounds) if len(rounds) > 1 else ""
    return (head + f" {row['step_s']:.3f} ({row['step_s_min']:.3f}-{row['step_s_max']:.3f}"
            f"{each_round}) |"
            f" {row['tokens_per_s']:.0f} | {row['cpu_s']:.2f} ({_percent(row['cpu_busy'])}) |"
            f" {row['model_gflops']:.1f} | {_percent(row.get('mfu'))} |"
            f" {'' if ratio is None else f'{ratio:.2f}x'} |"
            f" {_percent(_mean(row.get('comm_share')))} |"
            f" {_percent(_mean(row.get('pipeline_wait_share')))} | {bubble} |"
            f" {' '.join(f'{m:.0f}' for m in row['peak_memory_mib'])} | {row['status']} |")


# ----------------------------------------------------------------------------------------------
# Plots


def write_plots(out: Path, rows: list[dict]) -> list[str]:
    """Write the plots into `out`; return their file names (none without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install -e \".[plot]\")")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("step_s") is not None]
    names = []
    for workload in dict.fromkeys(r["point"].workload for r in done):
        ours = [r for r in done if r["point"].workload == workload]
        for name, draw in ((f"step_time-{workload}.png", _draw_step_times),
                           (f"scaling-{workload}.png", _draw_scaling)):
            figure = draw(plt, ours, workload)
            figure.savefig(out / name, dpi=110, bbox_inches="tight")
            plt.close(figure)
            names.append(name)
    return names


def _draw_step_times(plt, rows: list[dict], workload: str):
    """Draw horizontal bars of step time. microtron's bars are split into compute, collectives
    and pipeline wait (means over the ranks), and the peers' bars are drawn whole."""
    figure, axes = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.5))
    labels = [r["point"].label for r in rows]
    for y, row in enumerate(rows):
        step = row["step_s"]
        comm = (_mean(row.get("comm_share")) or 0.0) * step
        wait = (_mean(row.get("pipeline_wait_share")) or 0.0) * step
        if "comm_share" in row:
            axes.barh(y, step - comm - wait, color="tab:blue")
            axes.barh(y, comm, left=step - comm - wait, color="tab:orange")
            axes.barh(y, wait, left=step - wait, color="tab:red")
        else:
            axes.barh(y, step, color="tab:gray")
    axes.set_yticks(range(len(rows)), labels)
    axes.invert_yaxis()
    axes.set_xlabel("step time (s), median of the timed steps")
    axes.set_title(f"{workload}: step time")
    from matplotlib.patches import Patch
    axes.legend(handles=[Patch(color="tab:blue", label="compute (microtron)"),
                         Patch(color="tab:orange", label="collectives"),
                         Patch(color="tab:red", label="pipeline wait (bubble and transfers)"),
                         Patch(color="tab:gray", label="PyTorch peer, not broken down")],
                loc="lower right", fontsize=8)
    return figure


def _draw_scaling(plt, rows: list[dict], workload: str):
    """Draw tokens per second against the cores a point uses, one line per implementation and
    layout, with linear scaling from plain PyTorch on one thread for reference."""
    figure, axes = plt.subplots(figsize=(8, 5))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        point = row["point"]
        series.setdefault(point.layout_label, []).append((point.cores, row["tokens_per_s"]))
    colours = plt.get_cmap("tab20").colors
    markers = "os^vD<>ph*"
    for index, (key, values) in enumerate(series.items()):
        values.sort()
        axes.plot([c for c, _ in values], [t for _, t in values], label=key,
                  color=colours[index % len(colours)], marker=markers[index % len(markers)])
    cores = sorted({c for values in series.values() for c, _ in values})
    base = series.get("torch", [])
    if base and base[0][0] == 1:
        axes.plot(cores, [base[0][1] * c for c in cores], color="black", linestyle="--",
                  linewidth=0.8, label="linear from torch, 1 thread")
    axes.set_xticks(cores)
    axes.set_xlabel("cores (ranks x threads per rank)")
    axes.set_ylabel("tokens / s")
    axes.set_title(f"{workload}: throughput")
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes.grid(alpha=0.3)
    return figure
