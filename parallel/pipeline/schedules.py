"""Schedule generators. Each returns a `Schedule` of compute actions only (F, B, I, W).

A generator takes the number of pipeline ranks p, the number of micro-batches m and the number of
virtual stages per rank v, and returns the stage placement and each rank's action list. Sends and
receives are added afterwards by `parallel.pipeline.passes.add_communication`.
"""

from __future__ import annotations

from typing import Callable

from parallel.pipeline.actions import B, F, Schedule


def contiguous_placement(num_ranks: int) -> tuple[int, ...]:
    """Return the placement of one stage per rank, stage i on rank i."""
    return tuple(range(num_ranks))


def gpipe(num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> Schedule:
    """GPipe (Huang et al. 2019): every forward, then every backward.

    Stage i stashes the activations of all m micro-batches before its first backward.
    """
    _require_single_virtual_stage("gpipe", virtual_stages)
    actions = []
    for rank in range(num_ranks):
        forwards = [F(rank, mb) for mb in range(num_microbatches)]
        backwards = [B(rank, mb) for mb in range(num_microbatches)]
        actions.append(forwards + backwards)
    return Schedule("gpipe", num_ranks, num_microbatches, contiguous_placement(num_ranks), actions)


def one_f_one_b(num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> Schedule:
    """1F1B, also called PipeDream-Flush (Narayanan et al. 2021).

    Rank i runs three phases:
      warm-up: min(p - i - 1, m) forwards, filling the pipeline below it;
      steady state: one forward then one backward, until every forward has run;
      cool-down: the remaining backwards.
    At most p - i micro-batches are in flight on rank i, against m for GPipe, and the bubble is
    the same, (p - 1) / m of the ideal time.
    """
    _require_single_virtual_stage("1f1b", virtual_stages)
    p, m = num_ranks, num_microbatches
    actions = []
    for rank in range(p):
        warmup = min(p - rank - 1, m)
        steady = m - warmup
        rank_actions = []

        # warm-up
        for mb in range(warmup):
            rank_actions.append(F(rank, mb))

        # steady state: forward of micro-batch warmup + i, backward of micro-batch i
        for i in range(steady):
            rank_actions.append(F(rank, warmup + i))
            rank_actions.append(B(rank, i))

        # cool-down
        for mb in range(steady, m):
            rank_actions.append(B(rank, mb))

        actions.append(rank_actions)
    return Schedule("1f1b", p, m, contiguous_placement(p), actions)


def forward_only(num_ranks: int, num_microbatches: int, stage_ranks: tuple[int, ...] | None = None) -> Schedule:
    """Return the schedule that runs every stage's forward of every micro-batch, in order.

    Evaluation and generation use it.
    """
    stage_ranks = stage_ranks or contiguous_placement(num_ranks)
    actions = [[] for _ in range(num_ranks)]
    for mb in range(num_microbatches):
        for stage, rank in enumerate(stage_ranks):
            actions[rank].append(F(stage, mb))
    return Schedule("forward-only", num_ranks, num_microbatches, tuple(stage_ranks), actions)


def _require_single_virtual_stage(name: str, virtual_stages: int) -> None:
    if virtual_stages != 1:
        raise ValueError(
            f"schedule {name!r} runs one stage per rank, but virtual_stages={virtual_stages}; "
            f"set virtual_stages to 1 or pick an interleaved schedule"
        )


SCHEDULES: dict[str, Callable[[int, int, int], Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
}


def build_schedule(name: str, num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> Schedule:
    """Return the schedule `name` from the registry, with compute actions only."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](num_ranks, num_microbatches, virtual_stages)
