"""The planner's report: the ranking, why the winner wins, what did not fit; as text or JSON."""

from __future__ import annotations

from planner.estimate import COMPONENT_NAMES, COMPONENTS, Estimate
from planner.search import GIB, PlanResult, format_bytes

# A component difference is named when it is at least this share of the winner's step time.
_NOTABLE = 0.005


def explain(winner: Estimate, other: Estimate) -> str:
    """Return one line on why `winner` is faster than `other`, component by component."""
    gap = other.step_s - winner.step_s
    differences = sorted(((winner.components[c] - other.components[c], c) for c in COMPONENTS),
                         key=lambda item: item[0])
    notable = [(d, c) for d, c in differences if abs(d) >= _NOTABLE * winner.step_s]
    parts = [f"{COMPONENT_NAMES[c]} {_signed(d)}" for d, c in notable] or ["no component differs by 0.5% or more"]
    memory = ""
    if abs(winner.memory.total - other.memory.total) >= 0.05 * max(winner.memory.total, other.memory.total):
        memory = (f"; memory {format_bytes(winner.memory.total)} vs {format_bytes(other.memory.total)} "
                  f"per device")
    return (f"{_time(gap)} faster ({gap / other.step_s:.1%}) than {other.candidate.describe()}: "
            + ", ".join(parts) + memory)


def format_text(result: PlanResult, top: int, cluster_name: str) -> str:
    """Return the report that scripts/plan.py prints."""
    w = result.workload
    m = w.model
    lines = [
        f"model: {m.n_layer} layers, hidden {m.n_embd}, {m.n_head} heads, vocabulary {m.vocab_size}, "
        f"{_parameter_count(m.num_parameters())} parameters; sequence {w.seq_len}, global batch {w.global_batch}, "
        f"{w.dtype}",
        f"cluster: {cluster_name}, {result.devices} devices",
        _counts_line(result),
    ]
    if not result.ranked:
        lines.append("no layout fits in memory")
        lines += _rejected_lines(result, 5)
        return "\n".join(lines)

    lines += ["", _table(result.ranked[:top])]
    winner = result.ranked[0]
    if len(result.ranked) > 1:
        lines += ["", "why the first is fastest (its time minus the other's, per component):"]
        lines += [f"  vs {i + 1}: {explain(winner, other)}" for i, other in enumerate(result.ranked[1:top], 1)]
    lines += ["", "parts of the first's step:"]
    lines += ["  " + ", ".join(f"{COMPONENT_NAMES[c]} {_time(winner.components[c])}" for c in COMPONENTS
                             if winner.components[c] > 0)]
    if result.rejected:
        lines += ["", f"too large for memory ({len(result.rejected)}; the first few, fastest bound first):"]
        lines += _rejected_lines(result, 5)
    return "\n".join(lines)


def _counts_line(result: PlanResult) -> str:
    c = result.counts
    return (f"searched {c.get('layouts', 0):,} layouts in {result.seconds:.1f} s: {c.get('evaluated', 0):,} "
            f"evaluated, {c.get('too large for memory', 0):,} too large for memory, "
            f"{c.get('not evaluated: bound above the ranking', 0):,} skipped (their lower bound is above "
            f"the ranking); {c.get('breaks a rule', 0):,} more break a rule of the compatibility table")


def _table(estimates: list[Estimate]) -> str:
    rows = [("#", "layout", "step", "MFU", "memory/device", "bubble", "comm")]
    for i, e in enumerate(estimates, 1):
        rows.append((str(i), e.candidate.describe(), _time(e.step_s), f"{e.mfu:.1%}",
                     format_bytes(e.memory.total), f"{e.bubble_fraction:.1%}", f"{e.comm_share:.1%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _rejected_lines(result: PlanResult, count: int) -> list[str]:
    return [f"  {r.candidate.describe()}: {r.reason()}" for r in result.rejected[:count]]


def _time(seconds: float) -> str:
    if abs(seconds) >= 1:
        return f"{seconds:.3g} s"
    return f"{seconds * 1000:.3g} ms"


def _signed(seconds: float) -> str:
    return ("+" if seconds > 0 else "-") + _time(abs(seconds))


def to_json(result: PlanResult, top: int, cluster_name: str) -> dict:
    """Return the report as a JSON-serializable mapping."""
    w = result.workload
    winner = result.ranked[0] if result.ranked else None
    return {
        "workload": {"model": w.model.to_dict(), "seq_len": w.seq_len, "global_batch": w.global_batch,
                     "dtype": w.dtype},
        "cluster": cluster_name,
        "devices": result.devices,
        "counts": result.counts,
        "seconds": result.seconds,
        "ranked": [_estimate_json(e) for e in result.ranked[:top]],
        "explanations": [explain(winner, other) for other in result.ranked[1:top]] if winner else [],
        "too_large": [{"layout": r.candidate.describe(), "overrides": r.candidate.overrides(),
                       "reason": r.reason(), "memory_gib": r.memory.total / GIB,
                       "lower_bound": r.lower_bound} for r in result.rejected],
    }


def _estimate_json(e: Estimate) -> dict:
    m = e.memory
    return {
        "layout": e.candidate.describe(),
        "overrides": e.candidate.overrides(),
        "micro_batch": e.candidate.micro_batch,
        "step_s": e.step_s,
        "mfu": e.mfu,
        "hfu": e.hfu,
        "tokens_per_s": e.tokens_per_s,
        "bubble_fraction": e.bubble_fraction,
        "comm_share": e.comm_share,
        "components_s": dict(e.components),
        "memory_gib": {"total": m.total / GIB, "parameters": m.params / GIB, "gradients": m.grads / GIB,
                       "optimizer": m.optimizer / GIB, "activations": m.activations / GIB,
                       "workspace": m.workspace / GIB, "pipeline_rank": m.rank},
    }


def _parameter_count(count: int) -> str:
    """Return a parameter count as 7.4M, 1.3B or 1.01T."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return f"{count:,}"
