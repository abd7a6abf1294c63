"""Recorded runs: turn the runtime's per-rank records into timelines, costs and Chrome traces.

A recorded run and a simulation share one form, `SimulationResult`, so that the same bubble and
stash figures and the same pictures apply to both. `measured_costs` turns a recording into
per-action durations, which the simulator replays to predict the run's own timeline.
"""

from __future__ import annotations

import json
from pathlib import Path

from parallel.pipeline.actions import Action, Schedule
from parallel.pipeline.runtime import Record
from parallel.pipeline.simulate import Costs, Interval, SimulationResult


def recorded_result(schedule: Schedule, records: list[list[Record]]) -> SimulationResult:
    """Return the timeline of a recorded run (records[r] from pp rank r) as a SimulationResult."""
    intervals, busy, first, last, stash = [], [], [], [], []
    for rank, rank_records in enumerate(records):
        compute = [rec for rec in rank_records if rec.action.is_compute]
        intervals += [Interval(rank, rec.action, rec.start, rec.end) for rec in compute]
        busy.append(sum(rec.end - rec.start for rec in compute))
        first.append(min((rec.start for rec in compute), default=0.0))
        last.append(max((rec.end for rec in compute), default=0.0))
        stash.append(_peak_stash([rec.action for rec in compute]))
    return SimulationResult(schedule, intervals, busy, first, last, [0.0] * len(records), stash)


def measured_costs(records: list[list[Record]], transfer: float = 0.0) -> Costs:
    """Return Costs that replay each recorded compute action with its measured duration."""
    measured = {rec.action: rec.end - rec.start
                for rank_records in records for rec in rank_records if rec.action.is_compute}
    num_stages = 1 + max((a.stage for a in measured), default=-1)
    costs = Costs.uniform(num_stages, 0.0, 0.0, 0.0, transfer)
    costs.measured = measured
    return costs


def chrome_trace(result: SimulationResult, time_unit_s: float = 1.0) -> dict:
    """Return a Chrome trace (the JSON object format that Perfetto and chrome://tracing open):
    one thread per rank, one complete event per compute action. `time_unit_s` converts the
    timeline's unit to seconds (1.0 for a recorded run)."""
    to_us = 1e6 * time_unit_s
    events = [{"name": "process_name", "ph": "M", "pid": 0,
               "args": {"name": f"pipeline schedule {result.schedule.name}"}}]
    for rank in range(result.num_ranks):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank,
                       "args": {"name": f"rank {rank}"}})
    for interval in result.intervals:
        a = interval.action
        events.append({
            "name": str(a), "cat": a.kind, "ph": "X", "pid": 0, "tid": interval.rank,
            "ts": interval.start * to_us, "dur": (interval.end - interval.start) * to_us,
            "args": {"stage": a.stage, "microbatch": a.microbatch, "kind": a.kind},
        })
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(path: str | Path, result: SimulationResult, time_unit_s: float = 1.0) -> None:
    with open(path, "w") as f:
        json.dump(chrome_trace(result, time_unit_s), f)


def _peak_stash(actions: list[Action]) -> int:
    stashed = peak = 0
    for a in actions:
        stashed += (a.kind == "F") - (a.kind in ("B", "I"))
        peak = max(peak, stashed)
    return peak
