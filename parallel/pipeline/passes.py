"""Passes over schedules. `add_communication` turns compute-only action lists into runnable ones."""

from __future__ import annotations

from parallel.pipeline.actions import Action, Schedule


def add_communication(schedule: Schedule, lookahead: int = 1) -> Schedule:
    """Return a copy of `schedule` with the sends and receives that its compute actions need.

    A send follows the compute action that produces its tensor. A receive is placed `lookahead`
    compute actions before the action that consumes it, so that the runtime posts it early and
    the transfer overlaps the compute in between. Adjacent stages on the same rank pass tensors in
    memory and get no communication actions.
    """
    last = schedule.num_stages - 1
    owner = schedule.stage_ranks
    with_comm = []
    for rank, actions in enumerate(schedule.actions):
        compute = [a for a in actions if a.is_compute]
        receives_before: list[list[Action]] = [[] for _ in compute]
        sends_after: list[list[Action]] = [[] for _ in compute]
        for i, action in enumerate(compute):
            s, mb = action.stage, action.microbatch
            if action.kind == "F":
                if s > 0 and owner[s - 1] != rank:
                    receives_before[max(0, i - lookahead)].append(Action(s, "RF", mb))
                if s < last and owner[s + 1] != rank:
                    sends_after[i].append(Action(s, "SF", mb))
            elif action.kind in ("B", "I"):
                if s < last and owner[s + 1] != rank:
                    receives_before[max(0, i - lookahead)].append(Action(s, "RB", mb))
                if s > 0 and owner[s - 1] != rank:
                    sends_after[i].append(Action(s, "SB", mb))

        rank_actions = []
        for i, action in enumerate(compute):
            rank_actions += receives_before[i]
            rank_actions.append(action)
            rank_actions += sends_after[i]
        with_comm.append(rank_actions)
    return Schedule(schedule.name, schedule.num_ranks, schedule.num_microbatches,
                    schedule.stage_ranks, with_comm)
