"""Check a schedule before any rank runs it.

`verify` raises ScheduleError at the first rule a schedule breaks, with the step-by-rank grid of
its action lists, the offending actions marked, and the rule. The rules, in the order checked:

  placement: every action names a stage and micro-batch that exist, on the rank that holds the
    stage;
  completeness: every micro-batch runs its forward on every stage exactly once, and, when
    training, either one full backward B or one input backward I and one weight backward W;
  order: on its rank, a stage's forward of a micro-batch comes before its backward, and I before
    W;
  communication (when the lists hold sends and receives): every tensor that crosses ranks is sent
    once, after the action that produces it, and received once, before the action that consumes
    it, and there are no other sends or receives;
  pair order: any two ranks post the transfers between them in the same order (NCCL matches
    sends and receives by that order);
  stash bound: no rank holds more than `max_stash` micro-batch activations at once (counted from
    a forward until its B or I);
  no deadlock: executing the lists, with each rank waiting only for inputs that another rank sends,
    finishes.
"""

from __future__ import annotations

from collections import Counter

from parallel.pipeline.actions import Action, Schedule, format_grid
from parallel.pipeline.passes import pair_sequence
from parallel.pipeline.schedules import ScheduleError
from parallel.pipeline.simulate import Costs, Deadlock, simulate

_GRID_ROWS = 40  # rows of the grid printed around the first offending action


def verify(schedule: Schedule, train: bool = True, max_stash: int | None = None) -> None:
    """Raise ScheduleError if `schedule` breaks a rule; see the module docstring."""
    if len(schedule.actions) != schedule.num_ranks:
        raise ScheduleError(f"schedule {schedule.name!r} has action lists for "
                            f"{len(schedule.actions)} ranks, but num_ranks={schedule.num_ranks}")
    bad_ranks = sorted({r for r in schedule.stage_ranks if not 0 <= r < schedule.num_ranks})
    if bad_ranks:
        raise ScheduleError(f"schedule {schedule.name!r} places stages on ranks {bad_ranks}, "
                            f"outside 0..{schedule.num_ranks - 1}")

    checks = [_check_placement, lambda s: _check_completeness(s, train), _check_order,
              _check_communication, _check_pair_order, lambda s: _check_stash(s, max_stash),
              _check_deadlock]
    for check in checks:
        failure = check(schedule)
        if failure is not None:
            rule, marks, fix = failure
            grid = format_grid(schedule.actions, marks, max_rows=_GRID_ROWS)
            raise ScheduleError(
                f"schedule {schedule.name!r} (pp={schedule.num_ranks}, micro-batches="
                f"{schedule.num_microbatches}, {schedule.num_stages} stages) breaks the rule: "
                f"{rule}\n{grid}\n{fix}"
            )


Failure = tuple[str, dict[tuple[int, int], str], str]  # rule, marked cells, how to fix


def _positions(schedule: Schedule) -> dict[Action, list[tuple[int, int]]]:
    """Return where each action occurs, as (rank, position) pairs."""
    where: dict[Action, list[tuple[int, int]]] = {}
    for rank, actions in enumerate(schedule.actions):
        for pos, action in enumerate(actions):
            where.setdefault(action, []).append((rank, pos))
    return where


def _check_placement(schedule: Schedule) -> Failure | None:
    marks = {}
    for rank, actions in enumerate(schedule.actions):
        for pos, a in enumerate(actions):
            if not 0 <= a.stage < schedule.num_stages:
                marks[(rank, pos)] = f"stage {a.stage} does not exist (0..{schedule.num_stages - 1})"
            elif not 0 <= a.microbatch < schedule.num_microbatches:
                marks[(rank, pos)] = (f"micro-batch {a.microbatch} does not exist "
                                      f"(0..{schedule.num_microbatches - 1})")
            elif schedule.stage_ranks[a.stage] != rank:
                marks[(rank, pos)] = f"stage {a.stage} is on rank {schedule.stage_ranks[a.stage]}"
    if marks:
        return ("every action names an existing stage and micro-batch and runs on the rank that "
                "holds its stage", marks,
                "fix: move the action to its stage's rank, or change the stage placement")
    return None


def _check_completeness(schedule: Schedule, train: bool) -> Failure | None:
    where = _positions(schedule)
    count = Counter({a: len(places) for a, places in where.items() if a.is_compute})
    marks = {}
    for stage, rank in enumerate(schedule.stage_ranks):
        end = (rank, len(schedule.actions[rank]))
        for mb in range(schedule.num_microbatches):
            f, b, i, w = (count[Action(stage, kind, mb)] for kind in "FBIW")
            if f != 1:
                _mark_all(marks, where, Action(stage, "F", mb), end,
                          f"forward runs {f} times; it must run once")
            if not train:
                for kind in "BIW":
                    if count[Action(stage, kind, mb)]:
                        _mark_all(marks, where, Action(stage, kind, mb), end,
                                  "a forward-only schedule has no backward")
            elif not ((b, i, w) == (1, 0, 0) or (b, i, w) == (0, 1, 1)):
                for kind, n in zip("BIW", (b, i, w)):
                    _mark_all(marks, where, Action(stage, kind, mb), end,
                              f"backward of stage {stage}, micro-batch {mb}: B runs {b}, I {i} "
                              f"and W {w} times; it needs one B, or one I and one W")
    if marks:
        rule = ("every micro-batch runs its forward on every stage exactly once"
                + (", and one B or one I and one W" if train else ", and no backward"))
        return rule, marks, "fix: add the missing actions or remove the duplicates"
    return None


def _mark_all(marks, where, action: Action, end: tuple[int, int], note: str) -> None:
    """Mark every occurrence of `action`, or the end of its rank's list when it never occurs."""
    for place in where.get(action, [end]):
        marks.setdefault(place, f"{action}: {note}" if place == end else note)


def _check_order(schedule: Schedule) -> Failure | None:
    marks = {}
    for rank, actions in enumerate(schedule.actions):
        seen = set()
        for pos, a in enumerate(actions):
            if a.kind in ("B", "I") and (a.stage, "F", a.microbatch) not in seen:
                marks[(rank, pos)] = f"runs before {Action(a.stage, 'F', a.microbatch)}"
            if a.kind == "W" and (a.stage, "I", a.microbatch) not in seen:
                marks[(rank, pos)] = f"runs before {Action(a.stage, 'I', a.microbatch)}"
            seen.add((a.stage, a.kind, a.microbatch))
    if marks:
        return ("a stage's forward of a micro-batch comes before its backward, and I before W",
                marks, "fix: move the marked actions after the ones they depend on")
    return None


def _required_transfers(schedule: Schedule) -> dict[Action, tuple[Action, Action]]:
    """Return each communication action the compute actions need -> (producer, consumer)."""
    last, owner = schedule.num_stages - 1, schedule.stage_ranks
    present = {a for actions in schedule.actions for a in actions}
    needed = {}
    for actions in schedule.actions:
        for a in actions:
            s, mb = a.stage, a.microbatch
            if a.kind == "F" and s < last and owner[s + 1] != owner[s]:
                consumer = Action(s + 1, "F", mb)
                needed[Action(s, "SF", mb)] = (a, consumer)
                needed[Action(s + 1, "RF", mb)] = (a, consumer)
            elif a.kind in ("B", "I") and s > 0 and owner[s - 1] != owner[s]:
                consumer = next((Action(s - 1, k, mb) for k in ("B", "I")
                                 if Action(s - 1, k, mb) in present), Action(s - 1, "B", mb))
                needed[Action(s, "SB", mb)] = (a, consumer)
                needed[Action(s - 1, "RB", mb)] = (a, consumer)
    return needed


def _check_communication(schedule: Schedule) -> Failure | None:
    if all(a.is_compute for actions in schedule.actions for a in actions):
        return None  # compute-only lists; the communication pass adds the rest
    needed = _required_transfers(schedule)
    where = _positions(schedule)
    marks = {}
    for action, places in where.items():
        if action.is_compute:
            continue
        if action not in needed:
            for place in places:
                marks[place] = "no transfer of this tensor is needed"
        elif len(places) > 1:
            for place in places[1:]:
                marks[place] = "duplicate"
    for comm, (producer, consumer) in needed.items():
        if comm not in where:
            rank = schedule.stage_ranks[comm.stage]
            marks[(rank, len(schedule.actions[rank]))] = f"{comm} is missing"
            continue
        rank, pos = where[comm][0]
        if comm.kind in ("SF", "SB"):
            anchor = next((p for r, p in where.get(producer, []) if r == rank), None)
            if anchor is not None and pos < anchor:
                marks[(rank, pos)] = f"sends before {producer} has produced the tensor"
        else:
            anchor = next((p for r, p in where.get(consumer, []) if r == rank), None)
            if anchor is not None and pos > anchor:
                marks[(rank, pos)] = f"is posted after {consumer}, which needs it"
    if marks:
        return ("every tensor that crosses ranks is sent once after its producer and received "
                "once before its consumer", marks,
                "fix: write compute actions only and let the communication pass add the rest")
    return None


def _check_pair_order(schedule: Schedule) -> Failure | None:
    """Check that any two ranks post the transfers between them in one common order (NCCL
    matches them by that order, ignoring tags)."""
    if all(a.is_compute for actions in schedule.actions for a in actions):
        return None
    for rank in range(schedule.num_ranks):
        for peer in range(rank + 1, schedule.num_ranks):
            mine = _pair_positions(schedule, rank, peer)
            theirs = _pair_positions(schedule, peer, rank)
            for (kind, message, pos), (peer_kind, peer_message, peer_pos) in zip(mine, theirs):
                if message != peer_message or kind == peer_kind:
                    marks = {(rank, pos): f"rank {rank} posts {kind} of {_describe(message)} here",
                             (peer, peer_pos): f"rank {peer} posts {peer_kind} of "
                                               f"{_describe(peer_message)} here"}
                    return ("any two ranks post the sends and receives between them in the same "
                            "order, because NCCL matches them by order and not by tag", marks,
                            "fix: run the lists through parallel.pipeline.passes."
                            "order_transfers_by_pair")
    return None


def _pair_positions(schedule: Schedule, rank: int, peer: int) -> list[tuple[str, tuple, int]]:
    positions = [pos for pos, a in enumerate(schedule.actions[rank]) if not a.is_compute]
    sequence = []
    for pos in positions:
        found = pair_sequence([schedule.actions[rank][pos]], rank, peer, schedule.stage_ranks)
        if found:
            kind, message = found[0]
            sequence.append((kind, message, pos))
    return sequence


def _describe(message: tuple) -> str:
    direction, stage, mb = message
    what = "activations" if direction == "F" else "gradients"
    return f"the {what} of stage {stage}, micro-batch {mb}"


def _check_stash(schedule: Schedule, max_stash: int | None) -> Failure | None:
    if max_stash is None:
        return None
    marks = {}
    for rank, actions in enumerate(schedule.actions):
        stashed = 0
        for pos, a in enumerate(actions):
            stashed += (a.kind == "F") - (a.kind in ("B", "I"))
            if stashed > max_stash:
                marks[(rank, pos)] = f"{stashed} micro-batch activations stashed"
                break
    if marks:
        peak = max(_peak_stash(actions) for actions in schedule.actions)
        return (f"no rank stashes more than max_stash={max_stash} micro-batch activations",
                marks, f"fix: raise max_stash to at least {peak}, or pick a schedule that stashes "
                       f"fewer (1F1B stashes at most pp on rank 0, GPipe all micro-batches)")
    return None


def _peak_stash(actions: list[Action]) -> int:
    stashed = peak = 0
    for a in actions:
        stashed += (a.kind == "F") - (a.kind in ("B", "I"))
        peak = max(peak, stashed)
    return peak


def _check_deadlock(schedule: Schedule) -> Failure | None:
    try:
        simulate(schedule, Costs.uniform(schedule.num_stages))
    except Deadlock as deadlock:
        marks = {(rank, pos): "waits here forever" for rank, pos in deadlock.blocked.items()}
        return ("the ranks never wait for each other in a cycle (the lists cannot deadlock)",
                marks, "fix: reorder the marked actions so that each input is produced before a "
                       "rank waits for it")
    return None
