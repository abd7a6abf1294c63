"""An event-driven simulator of pipeline schedules: step time, bubbles and peak activation memory.

The simulator runs the same action lists as the runtime. Each rank executes its list in order; a
compute action starts when the rank is free and its inputs are there: the previous stage's output
for a forward, the next stage's input gradient for a backward (B or I), and the rank's own earlier
actions on that stage. A tensor that crosses ranks arrives `transfer` time units after its send
(after its producer when the lists hold no communication actions); tensors between stages of one
rank arrive at once. Communication takes no compute time on either rank, as with the runtime's
non-blocking sends and receives posted ahead.

Costs are per stage, so uneven stages count, or per action, to replay measured times.

Terms of the result:
  busy[r]: the compute time of rank r (its ideal time, with no bubble);
  span[r]: from rank r's first action to its last;
  cost: the largest span, the time per step when nothing synchronizes the ranks between steps
    (the convention of Qi et al. 2024, "Zero Bubble Pipeline Parallelism");
  bubble_fraction: idle time over compute time, summed over ranks, within `cost`: (p - 1) / m
    for GPipe and 1F1B with equal stages (Narayanan et al. 2021 define it this way);
  bubble_rate: idle time over total time within `cost`, 1 - sum(busy) / (p * cost), the figure
    that the Zero Bubble paper tabulates;
  makespan: from time 0 to the end of the last action, the step time when the ranks wait for each
    other at the end of each step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from parallel.pipeline.actions import Action, Schedule


@dataclass
class Costs:
    """Durations of the actions and the memory that each stage keeps per micro-batch.

    forward, backward_input, backward_weight: per stage; a full backward B costs
        backward_input + backward_weight.
    transfer: the time a tensor takes from one rank to another.
    activation_bytes: per stage, what a micro-batch keeps from its forward until its B or I.
    weight_grad_bytes: per stage, what a micro-batch keeps from its I until its W (the inputs
        and output gradients of the linear layers).
    measured: per-action durations that replace the per-stage ones (a replay of a recorded run).
    """

    forward: Sequence[float]
    backward_input: Sequence[float]
    backward_weight: Sequence[float]
    transfer: float = 0.0
    activation_bytes: Sequence[float] | None = None
    weight_grad_bytes: Sequence[float] | None = None
    measured: dict[Action, float] = field(default_factory=dict)

    @classmethod
    def uniform(cls, num_stages: int, forward: float = 1.0, backward_input: float = 1.0,
                backward_weight: float = 1.0, transfer: float = 0.0, **memory) -> "Costs":
        """Return the same costs for every stage."""
        return cls([forward] * num_stages, [backward_input] * num_stages,
                   [backward_weight] * num_stages, transfer, **memory)

    def duration(self, action: Action) -> float:
        if action in self.measured:
            return self.measured[action]
        s = action.stage
        if action.kind == "F":
            return self.forward[s]
        if action.kind == "I":
            return self.backward_input[s]
        if action.kind == "W":
            return self.backward_weight[s]
        if action.kind == "B":
            return self.backward_input[s] + self.backward_weight[s]
        return 0.0


@dataclass(frozen=True)
class Interval:
    """One executed action: on which rank, from when to when."""

    rank: int
    action: Action
    start: float
    end: float


@dataclass
class SimulationResult:
    schedule: Schedule
    intervals: list[Interval]  # compute actions, in the order they were simulated
    busy: list[float]
    first_start: list[float]
    last_end: list[float]
    peak_bytes: list[float]  # per rank, activations plus pending weight-gradient inputs
    peak_stash: list[int]  # per rank, most micro-batch activations held at once

    @property
    def num_ranks(self) -> int:
        return len(self.busy)

    @property
    def span(self) -> list[float]:
        return [end - start for start, end in zip(self.first_start, self.last_end)]

    @property
    def makespan(self) -> float:
        return max(self.last_end, default=0.0)

    @property
    def cost(self) -> float:
        return max(self.span, default=0.0)

    @property
    def rank_bubble_fraction(self) -> list[float]:
        """Per rank, the idle time within its own span over its compute time."""
        return [(span - busy) / busy if busy else 0.0 for span, busy in zip(self.span, self.busy)]

    @property
    def bubble_fraction(self) -> float:
        total = sum(self.busy)
        return (self.num_ranks * self.cost - total) / total if total else 0.0

    @property
    def bubble_rate(self) -> float:
        return 1.0 - sum(self.busy) / (self.num_ranks * self.cost) if self.cost else 0.0

    @property
    def makespan_bubble_fraction(self) -> float:
        total = sum(self.busy)
        return (self.num_ranks * self.makespan - total) / total if total else 0.0

    def summary(self) -> str:
        """Return a few lines that describe the result, for logs and scripts."""
        lines = [f"{self.schedule.name}: p={self.num_ranks} m={self.schedule.num_microbatches} "
                 f"stages={self.schedule.num_stages}: cost {self.cost:.4g}, makespan "
                 f"{self.makespan:.4g}, bubble fraction {self.bubble_fraction:.4f}, bubble rate "
                 f"{self.bubble_rate:.4f}"]
        for r in range(self.num_ranks):
            lines.append(f"  rank {r}: busy {self.busy[r]:.4g}, span {self.span[r]:.4g}, bubble "
                         f"{self.rank_bubble_fraction[r]:.4f}, peak stash {self.peak_stash[r]}, "
                         f"peak memory {self.peak_bytes[r]:.4g} bytes")
        return "\n".join(lines)


class Deadlock(RuntimeError):
    """The action lists stop with actions left: each rank waits for an input never produced."""

    def __init__(self, blocked: dict[int, int], message: str):
        super().__init__(message)
        self.blocked = blocked  # rank -> position of the action it waits at


def simulate(schedule: Schedule, costs: Costs) -> SimulationResult:
    """Run `schedule` on the costs; raise Deadlock if some rank can never take its next action."""
    engine = _Engine(schedule, costs)
    engine.run()
    return engine.result()


class _Engine:
    def __init__(self, schedule: Schedule, costs: Costs):
        self.schedule = schedule
        self.costs = costs
        self.last = schedule.num_stages - 1
        self.has_comm = any(not a.is_compute for acts in schedule.actions for a in acts)
        p = schedule.num_ranks
        self.position = [0] * p
        self.clock = [0.0] * p
        self.done: dict[tuple[int, str, int], float] = {}  # (stage, kind, mb) -> end time
        self.arrived: dict[tuple[str, int, int], float] = {}  # ("F"|"B", producer stage, mb)
        self.intervals: list[Interval] = []
        self.busy = [0.0] * p
        self.first_start = [None] * p
        self.last_end = [0.0] * p
        self.memory = [0.0] * p
        self.peak_bytes = [0.0] * p
        self.stash = [0] * p
        self.peak_stash = [0] * p

    def run(self) -> None:
        progress = True
        while progress:
            progress = False
            for rank in range(self.schedule.num_ranks):
                while self._step(rank):
                    progress = True
        blocked = {r: pos for r, pos in enumerate(self.position)
                   if pos < len(self.schedule.actions[r])}
        if blocked:
            waits = ", ".join(f"rank {r} at {self.schedule.actions[r][pos]}"
                              for r, pos in blocked.items())
            raise Deadlock(blocked, f"the ranks wait for each other forever: {waits}")

    def result(self) -> SimulationResult:
        return SimulationResult(self.schedule, self.intervals, self.busy,
                                [s if s is not None else 0.0 for s in self.first_start],
                                self.last_end, self.peak_bytes, self.peak_stash)

    # ------------------------------------------------------------------------------------------

    def _step(self, rank: int) -> bool:
        """Take rank's next action if its inputs are there; return whether it did."""
        actions = self.schedule.actions[rank]
        if self.position[rank] >= len(actions):
            return False
        action = actions[self.position[rank]]
        if not action.is_compute:
            if action.kind in ("SF", "SB"):
                direction = action.kind[1]
                self.arrived[(direction, action.stage, action.microbatch)] = (
                    self.clock[rank] + self.costs.transfer)
            self.position[rank] += 1
            return True

        ready = self._inputs_ready(action)
        if ready is None:
            return False
        start = max(self.clock[rank], ready)
        end = start + self.costs.duration(action)
        self._account(rank, action, start, end)
        self._publish(rank, action, end)
        self.position[rank] += 1
        return True

    def _inputs_ready(self, action: Action) -> float | None:
        """Return when the inputs of `action` are all there, or None if one is not yet known."""
        s, mb = action.stage, action.microbatch
        needed = []
        if action.kind == "F" and s > 0:
            needed.append(self.arrived.get(("F", s - 1, mb)))
        elif action.kind in ("B", "I"):
            needed.append(self.done.get((s, "F", mb)))
            if s < self.last:
                needed.append(self.arrived.get(("B", s + 1, mb)))
        elif action.kind == "W":
            needed.append(self.done.get((s, "I", mb)))
        if any(t is None for t in needed):
            return None
        return max(needed, default=0.0)

    def _publish(self, rank: int, action: Action, end: float) -> None:
        """Record the action's end and make its output available where it goes."""
        s, mb = action.stage, action.microbatch
        self.done[(s, action.kind, mb)] = end
        if action.kind == "F" and s < self.last:
            consumer, key = s + 1, ("F", s, mb)
        elif action.kind in ("B", "I") and s > 0:
            consumer, key = s - 1, ("B", s, mb)
        else:
            return
        if self.schedule.stage_ranks[consumer] == rank:
            self.arrived[key] = end
        elif not self.has_comm:
            self.arrived[key] = end + self.costs.transfer
        # otherwise the send action publishes it

    def _account(self, rank: int, action: Action, start: float, end: float) -> None:
        self.intervals.append(Interval(rank, action, start, end))
        self.clock[rank] = end
        self.busy[rank] += end - start
        if self.first_start[rank] is None:
            self.first_start[rank] = start
        self.last_end[rank] = end

        activation = _per_stage(self.costs.activation_bytes, action.stage)
        weight_inputs = _per_stage(self.costs.weight_grad_bytes, action.stage)
        if action.kind == "F":
            self.stash[rank] += 1
            self._allocate(rank, activation)
        elif action.kind == "B":
            self.stash[rank] -= 1
            self.memory[rank] -= activation
        elif action.kind == "I":
            # The weight-gradient inputs are kept before the rest of the activation is freed.
            self.stash[rank] -= 1
            self._allocate(rank, weight_inputs)
            self.memory[rank] -= activation
        elif action.kind == "W":
            self.memory[rank] -= weight_inputs
        self.peak_stash[rank] = max(self.peak_stash[rank], self.stash[rank])

    def _allocate(self, rank: int, num_bytes: float) -> None:
        self.memory[rank] += num_bytes
        self.peak_bytes[rank] = max(self.peak_bytes[rank], self.memory[rank])


def _per_stage(values: Sequence[float] | None, stage: int) -> float:
    return 0.0 if values is None else values[stage]
