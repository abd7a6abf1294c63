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


def _transfer(action: Action, stage_ranks) -> tuple[tuple[str, int, int], int, int]:
    """Return (message, sender rank, receiver rank) of a send or receive action.

    A message is named by its direction and the stage and micro-batch that produce it.
    """
    s, mb = action.stage, action.microbatch
    if action.kind == "SF":
        return ("F", s, mb), stage_ranks[s], stage_ranks[s + 1]
    if action.kind == "RF":
        return ("F", s - 1, mb), stage_ranks[s - 1], stage_ranks[s]
    if action.kind == "SB":
        return ("B", s, mb), stage_ranks[s], stage_ranks[s - 1]
    return ("B", s + 1, mb), stage_ranks[s + 1], stage_ranks[s]


def pair_sequence(actions: list[Action], rank: int, peer: int, stage_ranks) -> list[tuple[str, tuple]]:
    """Return the sends and receives between `rank` and `peer` in `rank`'s list, in order, as
    ("send" | "recv", message) pairs."""
    sequence = []
    for action in actions:
        if action.is_compute:
            continue
        message, sender, receiver = _transfer(action, stage_ranks)
        if {sender, receiver} == {rank, peer}:
            sequence.append(("send" if action.kind in ("SF", "SB") else "recv", message))
    return sequence


def order_transfers_by_pair(schedule: Schedule) -> Schedule:
    """Return a copy of `schedule` (with communication) whose receives are moved so that any two
    ranks post the transfers between them in one common order.

    NCCL ignores tags: it matches the sends and receives between two ranks in the order each rank
    posts them, and runs them in that order on one stream per pair. Both ranks must therefore post
    the transfers between them in the same order, or they wait on each other for ever. gloo
    matches by tag and accepts any order, so this pass only matters on NCCL, but every backend
    runs its result so that one code path is tested.

    The common order is the order of the sends in a simulation with unit costs (a send is posted
    when its producer ends). Sends stay where they are. Each receive stays where the
    communication pass put it when that fits the order, and otherwise moves as little as
    possible: after the transfer that precedes it, and before both the next send of the pair and
    the action that consumes it. That slot always exists, because a rank runs its own sends and
    consumers in time order.
    """
    from parallel.pipeline.simulate import Costs, simulate  # the simulator imports this module

    compute_only = schedule.compute_only()
    timeline = simulate(compute_only, Costs.uniform(schedule.num_stages))
    produced = {interval.action: interval.end for interval in timeline.intervals}
    owner = schedule.stage_ranks

    def send_time(message) -> tuple:
        direction, stage, mb = message
        producer = Action(stage, "F", mb) if direction == "F" else (
            Action(stage, "B", mb) if Action(stage, "B", mb) in produced else Action(stage, "I", mb))
        return (produced[producer], owner[stage], direction, stage, mb)

    ordered = []
    for rank, actions in enumerate(schedule.actions):
        ordered.append(_order_rank(actions, rank, owner, send_time))
    return Schedule(schedule.name, schedule.num_ranks, schedule.num_microbatches,
                    schedule.stage_ranks, ordered)


def _order_rank(actions: list[Action], rank: int, owner, send_time) -> list[Action]:
    skeleton = [a for a in actions if a.kind not in ("RF", "RB")]
    index = {a: i for i, a in enumerate(skeleton)}
    # The slot of a receive is the skeleton index it is inserted before.
    original_slot, slot_count = {}, 0
    for action in actions:
        if action.kind in ("RF", "RB"):
            original_slot[action] = slot_count
        else:
            slot_count += 1

    by_peer: dict[int, list[tuple[tuple, Action]]] = {}
    for action in actions:
        if action.is_compute:
            continue
        message, sender, receiver = _transfer(action, owner)
        peer = receiver if sender == rank else sender
        by_peer.setdefault(peer, []).append((send_time(message), action))

    slot_of: dict[Action, int] = {}
    for peer, transfers in by_peer.items():
        transfers.sort(key=lambda item: item[0])
        lower = 0
        for position, (_, action) in enumerate(transfers):
            if action.kind in ("SF", "SB"):
                lower = index[action] + 1
                continue
            consumer_kinds = ("F",) if action.kind == "RF" else ("B", "I")
            consumer = next(index[Action(action.stage, k, action.microbatch)] for k in consumer_kinds
                            if Action(action.stage, k, action.microbatch) in index)
            next_send = next((index[a] for _, a in transfers[position + 1:]
                              if a.kind in ("SF", "SB")), len(skeleton))
            upper = min(consumer, next_send)
            if lower > upper:
                raise AssertionError(f"no slot for {action} on rank {rank}: {lower=}, {upper=}")
            slot_of[action] = min(max(original_slot[action], lower), upper)
            lower = slot_of[action]

    receives_at: dict[int, list[Action]] = {}
    for peer, transfers in by_peer.items():  # keep each pair's order inside a shared slot
        for _, action in transfers:
            if action in slot_of:
                receives_at.setdefault(slot_of[action], []).append(action)
    result = []
    for i, action in enumerate(skeleton):
        result += receives_at.get(i, [])
        result.append(action)
    result += receives_at.get(len(skeleton), [])
    return result
