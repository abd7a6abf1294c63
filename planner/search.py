"""Enumerate the layouts that the compatibility table allows, drop those that do not fit, and
rank the rest by predicted step time.

The search is exact for the layouts it returns, and fast because most layouts are never
evaluated in full. Every candidate gets a lower bound of its step time
(`CostModel.lower_bound`, no pipeline evaluation). Candidates are taken in the order of their
bounds; each is checked against the memory limit and then evaluated. Once `keep` layouts that
fit are known, a candidate whose bound is above the slowest of them cannot enter the ranking,
and neither can any candidate after it.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from planner.estimate import CostModel, Estimate
from planner.memory import MemoryBreakdown
from planner.workload import Candidate, Workload
from training import compat
from training.compat import SCHEDULE_RULES, Strategy

GIB = 2**30


@dataclass(frozen=True)
class SearchSpace:
    """Restrictions of the search (None: every value the table allows)."""

    schedules: tuple[str, ...] | None = None
    tp: tuple[int, ...] | None = None
    pp: tuple[int, ...] | None = None
    micro_batch_sizes: tuple[int, ...] | None = None
    recompute: tuple[str, ...] | None = None
    sequence_parallel: tuple[bool, ...] | None = None
    zero1: tuple[bool, ...] | None = None
    include_declared: bool = False  # also cost strategies this build cannot run yet


@dataclass
class Rejected:
    """A layout that does not fit in memory."""

    candidate: Candidate
    memory: MemoryBreakdown
    limit: float
    lower_bound: bool = False  # `memory` is a lower bound (one micro-batch per stage)

    def reason(self) -> str:
        m = self.memory
        part, size = m.largest()
        at_least = "at least " if self.lower_bound else ""
        return (f"{at_least}{format_bytes(m.total)} > {format_bytes(self.limit)} per device on pipeline "
                f"rank {m.rank}; largest part {part} {format_bytes(size)} (parameters "
                f"{format_bytes(m.params)}, gradients {format_bytes(m.grads)}, optimizer "
                f"{format_bytes(m.optimizer)}, activations {format_bytes(m.activations)}, workspace "
                f"{format_bytes(m.workspace)})")


def format_bytes(num_bytes: float) -> str:
    """Return a byte count in GiB, or in MiB below 1 GiB."""
    if num_bytes >= GIB:
        return f"{num_bytes / GIB:.1f} GiB"
    return f"{num_bytes / 2**20:.1f} MiB"


@dataclass
class PlanResult:
    workload: Workload
    devices: int
    ranked: list[Estimate]  # fastest first
    rejected: list[Rejected]  # examined and too large, in the order examined
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(workload: Workload, devices: int, space: SearchSpace = SearchSpace(),
               counts: dict[str, int] | None = None):
    """Yield every layout of `devices` devices that the table and the model allow.

    With one pipeline rank only 1F1B is listed: every schedule then runs the same actions.
    Strategy values that change nothing (sequence parallelism at tp = 1, ZeRO-1 at dp = 1) are
    skipped.
    """
    counts = counts if counts is not None else {}
    model = workload.model
    schedules = space.schedules or tuple(SCHEDULE_RULES)
    axis_values = {name: getattr(space, name) or tuple(compat.values(name, space.include_declared))
                   for name in ("recompute", "sequence_parallel", "zero1")}
    for tp in divisors(devices):
        if model.n_head % tp or model.ffn_size % tp or (space.tp and tp not in space.tp):
            continue
        for pp in divisors(devices // tp):
            if pp > model.n_layer or (space.pp and pp not in space.pp):
                continue
            dp = devices // (tp * pp)
            if workload.global_batch % dp:
                continue
            local = workload.global_batch // dp
            for b in divisors(local):
                if space.micro_batch_sizes and b not in space.micro_batch_sizes:
                    continue
                yield from _strategies(workload, tp, pp, dp, b, local // b, schedules, axis_values,
                                       space.include_declared, counts)


def _strategies(workload, tp, pp, dp, b, m, schedules, axis_values, include_declared, counts):
    context = compat.Context(tp=tp, pp=pp, dp=dp, micro_batches=m, seq_len=workload.seq_len)
    for schedule in schedules:
        if pp == 1 and schedule != "1f1b":
            continue
        for v in compat.virtual_stage_options(schedule, pp, workload.model.n_layer):
            for recompute in axis_values["recompute"]:
                for sp in axis_values["sequence_parallel"]:
                    for zero1 in axis_values["zero1"]:
                        strategy = Strategy(schedule=schedule, virtual_stages=v, sequence_parallel=sp,
                                            recompute=recompute, zero1=zero1, dtype=workload.dtype,
                                            tied_embeddings=workload.tied_embeddings)
                        if not compat.has_effect(strategy, context):
                            continue
                        if compat.problems(strategy, context, require_runs=not include_declared):
                            counts["breaks a rule"] = counts.get("breaks a rule", 0) + 1
                            continue
                        yield Candidate(tp, pp, dp, b, m, strategy)


def plan(workload: Workload, cost_model: CostModel, devices: int, keep: int = 10,
         space: SearchSpace = SearchSpace()) -> PlanResult:
    """Return the `keep` fastest layouts of `devices` devices that fit, and what was dropped."""
    started = time.perf_counter()
    counts: dict[str, int] = {}
    bounded = [(cost_model.lower_bound(workload, c), c) for c in candidates(workload, devices, space, counts)]
    bounded.sort(key=lambda item: item[0])
    counts["layouts"] = len(bounded)

    ranked: list[Estimate] = []
    times: list[float] = []
    rejected: list[Rejected] = []
    limit = cost_model.cluster.memory_bytes
    for index, (bound, candidate) in enumerate(bounded):
        if len(ranked) >= keep and bound >= times[keep - 1]:
            counts["not evaluated: bound above the ranking"] = len(bounded) - index
            break
        low = cost_model.memory_lower_bound(workload, candidate)
        if low.total > limit:
            rejected.append(Rejected(candidate, low, limit, lower_bound=True))
            continue
        memory = cost_model.memory(workload, candidate)
        if memory.total > limit:
            rejected.append(Rejected(candidate, memory, limit))
            continue
        estimate = cost_model.estimate(workload, candidate)
        position = bisect.bisect(times, estimate.step_s)
        times.insert(position, estimate.step_s)
        ranked.insert(position, estimate)
        del times[keep:], ranked[keep:]
        counts["evaluated"] = counts.get("evaluated", 0) + 1
    counts["too large for memory"] = len(rejected)
    return PlanResult(workload, devices, ranked, rejected, counts, time.perf_counter() - started)
