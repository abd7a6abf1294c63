"""Turn the per-rank results of one job into a row of figures, and rows into target ratios.

A step's time is the time of its slowest rank (every rank starts a step at a barrier), and a
point's step time is the median over its timed steps. Shares are per rank, over that step time:

  CPU s: the CPU time of all ranks' processes in a step (median per rank, summed). CPU busy is
    that time over step time x cores. It stays below 1 where ranks wait (bubbles,
    communication) and where other processes on the machine take the cores;
  comm share: time blocked in collectives (the ledger's timing, microtron only);
  pipeline wait: time blocked waiting for point-to-point transfers, which on a pipeline includes
    the bubble (waiting for the other stage to compute) as well as the transfer itself;
  bubble: idle time between compute actions over compute time, per rank, from the recorded
    step, and the simulator's replay of the same recorded action times, where the pipeline
    runtime can record (see `benchmarks.microtron_job`).
"""

from __future__ import annotations

import math
import statistics

from benchmarks.sweep import Point
from benchmarks.workload import Workload

LOSS_RTOL = 1e-4  # fp32 losses of one model agree this closely over a few steps (see README)


def loss_mismatch(losses: list[float], reference: list[float], min_steps: int) -> str | None:
    """Return a description of the first step whose loss differs from the reference, or None.

    Steps beyond the shorter list are not compared (a point may stop its timed steps early), but
    at least `min_steps` must be.
    """
    if min(len(losses), len(reference)) < min_steps:
        return f"{len(losses)} losses against {len(reference)} of microtron; {min_steps} needed"
    for step, (loss, expected) in enumerate(zip(losses, reference)):
        if not math.isclose(loss, expected, rel_tol=LOSS_RTOL):
            return f"step {step}: loss {loss:.6f}, microtron {expected:.6f}"
    return None


def summarize(point: Point, workload: Workload, ranks: list[dict], peak_flops: float) -> dict:
    """Return the row of figures of one finished job."""
    timed = [max(steps) for steps in zip(*(r["seconds"][workload.warmup_steps:] for r in ranks))]
    step_s = statistics.median(timed)
    cpu_s = sum(statistics.median(r["cpu_seconds"][workload.warmup_steps:]) for r in ranks)
    flops = workload.model_flops_per_step() / step_s
    row = {
        "step_s": step_s,
        "step_s_min": min(timed),
        "step_s_max": max(timed),
        "tokens_per_s": workload.global_batch * workload.seq_len / step_s,
        "cpu_s": cpu_s,
        "cpu_busy": cpu_s / (step_s * point.cores),
        "model_gflops": flops / 1e9,
        "mfu": flops / peak_flops if peak_flops else None,
        "peak_memory_mib": [r["peak_memory_mib"] for r in ranks],
    }
    if "collective_seconds" in ranks[0]:
        row["comm_share"] = [r["collective_seconds"] / step_s for r in ranks]
        row["pipeline_wait_share"] = [r["p2p_seconds"] / step_s for r in ranks]
        row["comm_mib_per_step"] = [r["comm_bytes"] / 2**20 for r in ranks]
    row.update(_bubbles(ranks))
    return row


def _bubbles(ranks: list[dict]) -> dict:
    """Return the measured and simulated bubble per pipeline rank, when the job recorded them."""
    recorded = [r for r in ranks if r.get("records") is not None]
    if not recorded or recorded[0].get("schedule") is None:
        return {}
    try:
        from parallel.pipeline.simulate import simulate
        from parallel.pipeline.trace import measured_costs, recorded_result
    except ImportError:
        return {}
    schedule = recorded[0]["schedule"]
    records = [[] for _ in range(schedule.num_ranks)]
    for rank in recorded:
        records[rank["coordinates"][1]] = rank["records"]
    measured = recorded_result(schedule, records)
    replay = simulate(schedule, measured_costs(records))
    return {"bubble": measured.rank_bubble_fraction, "bubble_sim": replay.rank_bubble_fraction}


# ----------------------------------------------------------------------------------------------
# Targets


def target_ratios(rows: list[dict]) -> list[dict]:
    """Return the comparisons the benchmark is judged by, one per workload and target.

    Each entry: workload, target, ours (label), peer (label), ratio (ours / peer step time),
    limit, met (None when a side is missing).
    """
    targets = []
    for workload in sorted({row["point"].workload for row in rows}):
        ok = [r for r in rows if r["point"].workload == workload and r.get("step_s") is not None]
        targets += _workload_targets(workload, ok)
    return targets


def _workload_targets(workload: str, rows: list[dict]) -> list[dict]:
    def pick(impl, **where):
        return [r for r in rows if r["point"].impl == impl
                and all(getattr(r["point"], key) == value for key, value in where.items())]

    def fastest(candidates):
        return min(candidates, key=lambda r: r["step_s"]) if candidates else None

    def compare(target, ours, peer, limit):
        entry = {"workload": workload, "target": target, "limit": limit,
                 "ours": ours["point"].label if ours else None,
                 "peer": peer["point"].label if peer else None, "ratio": None, "met": None}
        if ours and peer:
            entry["ratio"] = ours["step_s"] / peer["step_s"]
            entry["met"] = entry["ratio"] <= limit
        return entry

    out = []
    ours_1f1b = fastest(pick("microtron", tp=1, pp=2, dp=1, schedule="1f1b", layers_per_stage=None))
    out.append(compare("pp=2 1F1B, same split", ours_1f1b,
                       fastest(pick("torch-pipelining", pp=2, schedule="1f1b")), 0.97))
    out.append(compare("best pp=2 vs fastest torch schedule", fastest(pick("microtron", tp=1, pp=2, dp=1)),
                       fastest(pick("torch-pipelining", pp=2)), 0.90))
    out.append(compare("tp=2", fastest(pick("microtron", tp=2, pp=1, dp=1)),
                       fastest(pick("torch-tp", tp=2)), 0.50))
    for threads in sorted({r["point"].threads for r in pick("torch")}):
        out.append(compare(f"tp=1, pp=1, {threads} thread(s)",
                           fastest(pick("microtron", tp=1, pp=1, dp=1, threads=threads)),
                           fastest(pick("torch", threads=threads)), 1.03))
    two_ranks = [r for r in pick("microtron") if r["point"].world_size == 2]
    torch_two_threads = fastest(pick("torch", threads=2))
    out.append(compare("best 2-rank layout vs torch, 2 threads", fastest(two_ranks),
                       torch_two_threads, 1.0))
    return out


def bubble_checks(rows: list[dict], tolerance: float = 0.05) -> list[dict]:
    """Return, per pipeline point with a recorded step, the largest |measured - simulated|."""
    checks = []
    for row in rows:
        if row.get("bubble") is None:
            continue
        gap = max(abs(a - b) for a, b in zip(row["bubble"], row["bubble_sim"]))
        checks.append({"label": row["point"].label, "workload": row["point"].workload,
                       "gap": gap, "met": gap <= tolerance})
    return checks
