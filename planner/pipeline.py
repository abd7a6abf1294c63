"""Pipeline step time and peak activation memory of a schedule, for many cost settings.

`parallel.pipeline.simulate` runs a schedule as events. With compute actions only, the time
it computes is a longest path. An action starts when the previous action of its rank has ended
and its inputs have arrived, and ends its duration later. Its inputs are the previous stage's
forward (for a forward) or the next stage's input backward (for a backward), which arrive
`transfer` later when they cross ranks, its own stage's forward (for a backward) and its I (for
a W). The planner evaluates one schedule with thousands of cost
settings, so this module compiles each (schedule, pp, micro-batches, virtual stages) once into
arrays in a topological order of that dependency graph, cached, and evaluates them in one pass.
`tests/test_planner_pipeline.py` checks that the results equal the simulator's exactly.

Memory depends only on each rank's order of actions: a forward keeps its stage's activation
bytes until its B or I; an I keeps the weight-gradient inputs until its W (allocated before the
activation is freed, as in the simulator).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from parallel.pipeline.schedules import build_schedule

_F, _I, _W, _B = 0, 1, 2, 3
_KINDS = {"F": _F, "I": _I, "W": _W, "B": _B}


@dataclass(frozen=True)
class Compiled:
    """A schedule as arrays, in a topological order of its dependency graph."""

    name: str
    num_ranks: int
    num_microbatches: int
    num_stages: int
    stage_ranks: tuple[int, ...]
    kind: np.ndarray  # per action, in topological order
    stage: np.ndarray
    rank: np.ndarray
    previous: list[int]  # position of the rank's previous action, -1 for none
    inputs: list[tuple[int, ...]]  # positions of the actions whose outputs it waits for
    crossing: list[tuple[bool, ...]]  # whether each of those inputs crosses ranks
    memory_events: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per rank: stage, d_act, d_wgrad


@dataclass
class PipelineTimes:
    makespan: float
    busy: list[float]  # per rank
    first_start: list[float]
    last_end: list[float]
    starts: np.ndarray | None = None  # per action, in the compiled order
    ends: np.ndarray | None = None

    @property
    def bubble_fraction(self) -> float:
        """Idle over compute time, summed over ranks, within the makespan."""
        total = sum(self.busy)
        return (len(self.busy) * self.makespan - total) / total if total else 0.0


@functools.lru_cache(maxsize=256)
def zoo_schedule(name: str, num_ranks: int, num_microbatches: int, virtual_stages: int):
    return build_schedule(name, num_ranks, num_microbatches, virtual_stages)


@functools.lru_cache(maxsize=256)
def compile_schedule(name: str, num_ranks: int, num_microbatches: int, virtual_stages: int) -> Compiled:
    """Build the zoo schedule `name` and compile it (cached)."""
    return compile_actions(zoo_schedule(name, num_ranks, num_microbatches, virtual_stages))


@functools.lru_cache(maxsize=1024)
def memory_events(name: str, num_ranks: int, num_microbatches: int, virtual_stages: int):
    """Return the per-rank memory events of a zoo schedule (cached; see `peak_memory`)."""
    return _memory_events(zoo_schedule(name, num_ranks, num_microbatches, virtual_stages))


def compile_actions(schedule) -> Compiled:
    """Compile a compute-only `Schedule` (see the module docstring)."""
    last = schedule.num_stages - 1
    owner = schedule.stage_ranks
    ids: dict[tuple[int, str, int], int] = {}
    actions = []
    for rank, rank_actions in enumerate(schedule.actions):
        for action in rank_actions:
            if not action.is_compute:
                continue
            ids[(action.stage, action.kind, action.microbatch)] = len(actions)
            actions.append((rank, action))

    # Predecessors of each action: the rank's previous action and the inputs it waits for.
    previous = [-1] * len(actions)
    inputs: list[tuple[int, ...]] = []
    crossing: list[tuple[bool, ...]] = []
    last_on_rank: dict[int, int] = {}
    for index, (rank, action) in enumerate(actions):
        previous[index] = last_on_rank.get(rank, -1)
        last_on_rank[rank] = index
        found, crosses = [], []
        s, mb = action.stage, action.microbatch
        if action.kind == "F" and s > 0:
            found.append(ids[(s - 1, "F", mb)])
            crosses.append(owner[s - 1] != owner[s])
        elif action.kind in ("B", "I"):
            found.append(ids[(s, "F", mb)])
            crosses.append(False)
            if s < last:
                found.append(ids.get((s + 1, "I", mb), ids.get((s + 1, "B", mb))))
                crosses.append(owner[s + 1] != owner[s])
        elif action.kind == "W":
            found.append(ids[(s, "I", mb)])
            crosses.append(False)
        inputs.append(tuple(found))
        crossing.append(tuple(crosses))

    order = _topological_order(previous, inputs, schedule.name)
    position = {old: new for new, old in enumerate(order)}
    return Compiled(
        name=schedule.name,
        num_ranks=schedule.num_ranks,
        num_microbatches=schedule.num_microbatches,
        num_stages=schedule.num_stages,
        stage_ranks=tuple(schedule.stage_ranks),
        kind=np.array([_KINDS[actions[i][1].kind] for i in order], dtype=np.int8),
        stage=np.array([actions[i][1].stage for i in order], dtype=np.int32),
        rank=np.array([actions[i][0] for i in order], dtype=np.int32),
        previous=[position[previous[i]] if previous[i] >= 0 else -1 for i in order],
        inputs=[tuple(position[j] for j in inputs[i]) for i in order],
        crossing=[crossing[i] for i in order],
        memory_events=_memory_events(schedule),
    )


def _topological_order(previous: list[int], inputs: list[tuple[int, ...]], name: str) -> list[int]:
    """Return the actions in an order where each comes after its predecessors (Kahn)."""
    waiting = [0] * len(previous)
    followers: list[list[int]] = [[] for _ in previous]
    for index, (before, needs) in enumerate(zip(previous, inputs)):
        for pred in ((before,) if before >= 0 else ()) + needs:
            waiting[index] += 1
            followers[pred].append(index)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    order = []
    while ready:
        index = ready.pop()
        order.append(index)
        for follower in followers[index]:
            waiting[follower] -= 1
            if waiting[follower] == 0:
                ready.append(follower)
    if len(order) != len(previous):
        raise ValueError(f"schedule {name!r} deadlocks: its actions wait for each other in a cycle")
    return order


def _memory_events(schedule) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Return, per rank, the memory changes of its actions in order: (stage, change in stashed
    activations, change in pending weight-gradient inputs). An I is two events, the inputs kept
    first, then the activation freed."""
    events = []
    for rank_actions in schedule.actions:
        stages, activation, weight_inputs = [], [], []
        for action in rank_actions:
            if action.kind == "F":
                changes = [(1, 0)]
            elif action.kind == "B":
                changes = [(-1, 0)]
            elif action.kind == "I":
                changes = [(0, 1), (-1, 0)]
            elif action.kind == "W":
                changes = [(0, -1)]
            else:
                continue
            for act, wgrad in changes:
                stages.append(action.stage)
                activation.append(act)
                weight_inputs.append(wgrad)
        events.append((np.array(stages, dtype=np.int32), np.array(activation, dtype=np.float64),
                       np.array(weight_inputs, dtype=np.float64)))
    return events


# ----------------------------------------------------------------------------------------------
# Evaluation


def pipeline_times(compiled: Compiled, forward: Sequence[float], backward_input: Sequence[float],
                   backward_weight: Sequence[float], transfer: float = 0.0) -> PipelineTimes:
    """Return the step's makespan and each rank's busy time for per-stage action times.

    A full backward B costs backward_input + backward_weight, as in the simulator.
    """
    table = np.array([forward, backward_input, backward_weight,
                      np.add(backward_input, backward_weight)], dtype=np.float64)
    duration = table[compiled.kind, compiled.stage].tolist()
    end = [0.0] * len(duration)
    start_of = [0.0] * len(duration)
    for index, dur in enumerate(duration):
        start = 0.0
        before = compiled.previous[index]
        if before >= 0:
            start = end[before]
        for pred, crosses in zip(compiled.inputs[index], compiled.crossing[index]):
            ready = end[pred] + transfer if crosses else end[pred]
            if ready > start:
                start = ready
        start_of[index] = start
        end[index] = start + dur

    num_ranks = compiled.num_ranks
    rank = compiled.rank
    ends = np.array(end)
    starts = np.array(start_of)
    durations = np.array(duration)
    busy = np.bincount(rank, weights=durations, minlength=num_ranks)
    first_start = np.full(num_ranks, np.inf)
    np.minimum.at(first_start, rank, starts)
    last_end = np.zeros(num_ranks)
    np.maximum.at(last_end, rank, ends)
    first_start[~np.isfinite(first_start)] = 0.0
    return PipelineTimes(float(ends.max(initial=0.0)), busy.tolist(), first_start.tolist(),
                         last_end.tolist(), starts, ends)


def shared_core_times(compiled: Compiled, times: PipelineTimes, slowdown: Sequence[float]) -> PipelineTimes:
    """Return `times` stretched for ranks that share CPU cores.

    `slowdown[k]` is the factor by which compute takes longer than in `times` while k pipeline
    ranks compute at once (slowdown[0] is unused). The simulation's order of events is kept, and
    each stretch of time is rescaled by the slowdown of the number of ranks computing in it. On
    a machine whose cores are shared with other processes, or by more ranks than cores, a rank
    computes faster while the others wait in a bubble.
    """
    starts, ends = times.starts, times.ends
    boundaries = np.unique(np.concatenate([starts, ends, [0.0]]))
    change = np.zeros(len(boundaries))
    np.add.at(change, np.searchsorted(boundaries, starts), 1.0)
    np.add.at(change, np.searchsorted(boundaries, ends), -1.0)
    computing = np.rint(np.cumsum(change)[:-1]).astype(int)
    factors = np.asarray([1.0] + list(slowdown[1:]), dtype=np.float64)
    stretched = np.concatenate([[0.0], np.cumsum(np.diff(boundaries) * factors[computing])])
    new_starts = np.interp(starts, boundaries, stretched)
    new_ends = np.interp(ends, boundaries, stretched)

    num_ranks = compiled.num_ranks
    busy = np.bincount(compiled.rank, weights=new_ends - new_starts, minlength=num_ranks)
    first_start = np.full(num_ranks, np.inf)
    np.minimum.at(first_start, compiled.rank, new_starts)
    first_start[~np.isfinite(first_start)] = 0.0
    last_end = np.zeros(num_ranks)
    np.maximum.at(last_end, compiled.rank, new_ends)
    return PipelineTimes(float(new_ends.max(initial=0.0)), busy.tolist(), first_start.tolist(),
                         last_end.tolist(), new_starts, new_ends)


def peak_memory(events, activation_bytes: Sequence[float],
                weight_grad_bytes: Sequence[float] | None = None) -> list[float]:
    """Return each rank's peak of stashed activations and pending weight-gradient inputs, for
    the memory events of a schedule (`memory_events`, or `Compiled.memory_events`)."""
    activation = np.asarray(activation_bytes, dtype=np.float64)
    weight = (np.zeros_like(activation) if weight_grad_bytes is None
              else np.asarray(weight_grad_bytes, dtype=np.float64))
    peaks = []
    for stages, d_act, d_wgrad in events:
        if len(stages) == 0:
            peaks.append(0.0)
            continue
        held = np.cumsum(d_act * activation[stages] + d_wgrad * weight[stages])
        peaks.append(float(max(held.max(), 0.0)))
    return peaks
