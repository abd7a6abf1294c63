"""Schedule generators. Each returns a `Schedule` of compute actions only (F, B, I, W).

A generator takes the number of pipeline ranks p, the number of micro-batches m and the number of
virtual stages per rank v, and returns the stage placement and each rank's action list. Sends and
receives are added afterwards by `parallel.pipeline.passes.add_communication`, and
`parallel.pipeline.verify.verify` checks the result before any rank runs it.

The placement decides which layers a rank holds: `contiguous` puts stage i on rank i,
`round_robin` puts stage s on rank s mod p (interleaved schedules), and `v_shape` puts stages r
and 2p - 1 - r on rank r, so that rank 0 holds both the first and the last stage.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from parallel.pipeline.actions import Action, B, F, I, Schedule, W


class ScheduleError(ValueError):
    """A schedule that cannot be built for the requested layout, or that breaks a rule."""


# ----------------------------------------------------------------------------------------------
# Placements


def contiguous_placement(num_ranks: int) -> tuple[int, ...]:
    """Return the placement of one stage per rank, stage i on rank i."""
    return tuple(range(num_ranks))


def round_robin_placement(num_ranks: int, virtual_stages: int) -> tuple[int, ...]:
    """Stage s on rank s mod p: rank r holds stages r, r + p, r + 2p, ..."""
    return tuple(s % num_ranks for s in range(num_ranks * virtual_stages))


def v_shape_placement(num_ranks: int) -> tuple[int, ...]:
    """Two stages per rank in a V: stage s on rank s for s < p, else on rank 2p - 1 - s."""
    return tuple(range(num_ranks)) + tuple(reversed(range(num_ranks)))


# ----------------------------------------------------------------------------------------------
# One stage per rank


def gpipe(num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> Schedule:
    """GPipe (Huang et al. 2019): every forward, then every backward.

    Stage i stashes the activations of all m micro-batches before its first backward.
    """
    _require_virtual_stages("gpipe", virtual_stages, 1)
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
    _require_virtual_stages("1f1b", virtual_stages, 1)
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


def zb_h1(num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> Schedule:
    """ZB-H1 (Qi et al. 2024, "Zero Bubble Pipeline Parallelism"): 1F1B with the backward split.

    Each backward is an input-gradient action I, which the previous rank waits for, and a
    weight-gradient action W, which nobody waits for. Rank i has 1F1B's warm-up of p - i - 1
    forwards, then runs F, I and W in turn, but keeps i weight backwards pending: the gradients
    travel back to rank 0 through I actions only, and the pending W actions fill the cool-down.
    Peak activations are 1F1B's (p - i micro-batches on rank i); the bubble shrinks from
    (p - 1)(T_F + T_I + T_W) to (p - 1)(T_F + T_I - T_W).
    """
    _require_virtual_stages("zb-h1", virtual_stages, 1)
    return _split_backward_1f1b("zb-h1", num_ranks, num_microbatches,
                                warmup=lambda r: num_ranks - r - 1, deferred=lambda r: r)


def zb_h2(num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> Schedule:
    """ZB-H2 (Qi et al. 2024): ZB-H1 with a longer warm-up that leaves no bubble.

    Rank i runs 2(p - i) - 2 warm-up forwards and keeps 2i weight backwards pending, so that it
    holds up to 2(p - i) - 1 micro-batches (2p - 1 on rank 0, against p for 1F1B). With
    T_F = T_I = T_W and m >= 2p - 1 every rank computes without a gap from its first action to
    its last: the bubble is (p - 1)(T_F + T_I - 2 T_W), zero for equal times. The ranks start
    and finish T_F apart, which the paper removes by not synchronizing before the optimizer step;
    here the step still waits for the last rank.
    """
    _require_virtual_stages("zb-h2", virtual_stages, 1)
    return _split_backward_1f1b("zb-h2", num_ranks, num_microbatches,
                                warmup=lambda r: 2 * (num_ranks - r) - 2, deferred=lambda r: 2 * r)


def _split_backward_1f1b(name: str, num_ranks: int, num_microbatches: int,
                         warmup: Callable[[int], int], deferred: Callable[[int], int]) -> Schedule:
    """Rank r: warm-up forwards, then F, I and W in turn with `deferred(r)` W actions pending,
    then the pending W actions."""
    p, m = num_ranks, num_microbatches
    actions = []
    for rank in range(p):
        num_warmup = min(warmup(rank), m)
        pending: deque[int] = deque()
        rank_actions = []

        # warm-up
        for mb in range(num_warmup):
            rank_actions.append(F(rank, mb))

        # steady state and cool-down: the next forward (while any is left), the next input
        # backward, and the oldest weight backward once more than deferred(rank) are pending
        next_forward = num_warmup
        for mb in range(m):
            if next_forward < m:
                rank_actions.append(F(rank, next_forward))
                next_forward += 1
            rank_actions.append(I(rank, mb))
            pending.append(mb)
            if len(pending) > deferred(rank):
                rank_actions.append(W(rank, pending.popleft()))

        # the weight backwards still pending
        rank_actions += [W(rank, mb) for mb in pending]
        actions.append(rank_actions)
    return Schedule(name, p, m, contiguous_placement(p), actions)


# ----------------------------------------------------------------------------------------------
# Several stages per rank


def interleaved_1f1b(num_ranks: int, num_microbatches: int, virtual_stages: int = 2) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021) with v virtual stages per rank, placed round-robin.

    Micro-batches go through the chunks in groups of g >= p (m // p groups, or one group of m when
    m < p): a rank runs the forwards of one group on its first chunk, then on its second chunk,
    and so on, then the next group; backwards follow the same order with the chunks reversed.
    Rank i runs three phases:
      warm-up: min(2(p - i - 1) + (v - 1) g, m v) forwards, with g the first group's size;
      steady state: one forward then one backward;
      cool-down: the remaining backwards.
    For m >= p the bubble is (p - 1) / (v m) of the ideal time with equal stages, v times smaller
    than 1F1B's, for v times as many point-to-point transfers. Megatron-LM's implementation
    requires m to be a multiple of p; the groups of size g lift that restriction.
    """
    if virtual_stages < 2:
        raise ScheduleError(
            f"schedule 'interleaved-1f1b' needs virtual_stages >= 2, got {virtual_stages}; "
            f"set virtual_stages to 2 or more, or use '1f1b' for one stage per rank"
        )
    p, m, v = num_ranks, num_microbatches, virtual_stages
    forward_order = _chunk_major_order(p, m, v, reverse_chunks=False)
    backward_order = _chunk_major_order(p, m, v, reverse_chunks=True)
    total = m * v
    group_size = len(_microbatch_groups(p, m)[0])
    actions = []
    for rank in range(p):
        warmup = min(2 * (p - rank - 1) + (v - 1) * group_size, total)
        rank_actions = []

        # warm-up
        for chunk, mb in forward_order[:warmup]:
            rank_actions.append(F(chunk * p + rank, mb))

        # steady state
        for i in range(total - warmup):
            chunk, mb = forward_order[warmup + i]
            rank_actions.append(F(chunk * p + rank, mb))
            chunk, mb = backward_order[i]
            rank_actions.append(B(chunk * p + rank, mb))

        # cool-down
        for chunk, mb in backward_order[total - warmup:]:
            rank_actions.append(B(chunk * p + rank, mb))

        actions.append(rank_actions)
    return Schedule("interleaved-1f1b", p, m, round_robin_placement(p, v), actions)


def _microbatch_groups(p: int, m: int) -> list[range]:
    """Split the m micro-batches into max(1, m // p) groups of consecutive micro-batches whose
    sizes differ by at most one, the larger first, so that no group but a lone one is smaller
    than p."""
    num_groups = max(1, m // p)
    base, extra = divmod(m, num_groups)
    groups, start = [], 0
    for g in range(num_groups):
        size = base + (1 if g < extra else 0)
        groups.append(range(start, start + size))
        start += size
    return groups


def _chunk_major_order(p: int, m: int, v: int, reverse_chunks: bool) -> list[tuple[int, int]]:
    """Return (chunk, micro-batch) pairs, group by group, each group chunk by chunk."""
    chunks = list(reversed(range(v))) if reverse_chunks else list(range(v))
    order = []
    for group in _microbatch_groups(p, m):
        for chunk in chunks:
            order += [(chunk, mb) for mb in group]
    return order


def zb_v(num_ranks: int, num_microbatches: int, virtual_stages: int = 2) -> Schedule:
    """ZB-V (Qi et al. 2024): two stages per rank in a V, with the backward split into I and W.

    Rank i holds stage i (chunk 0) and stage 2p - 1 - i (chunk 1); a micro-batch goes down the
    ranks on chunk 0 and back up on chunk 1, so rank 0 computes the loss. Phases of rank i:
      warm-up: 2(p - i) - 1 forwards of chunk 0; then i pairs (chunk 1, chunk 0) of forwards;
        then p - i rounds of F, I, W on chunk 1;
      steady state: F, I, W on chunk 0, then F, I, W on chunk 1, until every forward has run;
      cool-down: i pairs of input backwards (chunk 0, chunk 1); p - i rounds of I, W on chunk 0;
        then the pending weight backwards, chunk 1 first.
    The phases are laid out for m >= 2p - 1 micro-batches; with fewer, the actions of the
    micro-batches that do not exist are dropped. For T_F = T_I = T_W and enough micro-batches the
    bubble is zero with peak activations of p micro-batches of a full rank, like 1F1B.
    """
    _require_virtual_stages("zb-v", virtual_stages, 2)
    p, m = num_ranks, num_microbatches
    n = max(m, 2 * p - 1)  # the phases assume at least 2p - 1 micro-batches
    actions = []
    for rank in range(p):
        down, up = rank, 2 * p - 1 - rank
        counters = {(s, kind): 0 for s in (down, up) for kind in "FIW"}
        rank_actions: list[Action] = []

        def emit(stage: int, kind: str) -> None:
            mb = counters[(stage, kind)]
            counters[(stage, kind)] += 1
            rank_actions.append(Action(stage, kind, mb))

        # warm-up
        for _ in range(2 * (p - rank) - 1):
            emit(down, "F")
        for _ in range(rank):
            emit(up, "F")
            emit(down, "F")
        for _ in range(p - rank):
            emit(up, "F")
            emit(up, "I")
            emit(up, "W")

        # steady state
        while counters[(up, "F")] < counters[(down, "F")] or counters[(down, "F")] < n:
            if counters[(down, "F")] < n:
                emit(down, "F")
            emit(down, "I")
            emit(down, "W")
            emit(up, "F")
            emit(up, "I")
            emit(up, "W")

        # cool-down
        for _ in range(rank):
            emit(down, "I")
            emit(up, "I")
        for _ in range(p - rank):
            emit(down, "I")
            emit(down, "W")
        while counters[(up, "W")] < counters[(up, "I")]:
            emit(up, "W")
        while counters[(down, "W")] < counters[(down, "I")]:
            emit(down, "W")

        actions.append([a for a in rank_actions if a.microbatch < m])
    return Schedule("zb-v", p, m, v_shape_placement(p), actions)


def dualpipe_v(num_ranks: int, num_microbatches: int, virtual_stages: int = 2) -> Schedule:
    """DualPipeV: DeepSeek's DualPipe (DeepSeek-V3 report, 2024) folded onto p ranks in a V.

    Rank i holds stage i (chunk 0) and stage 2p - 1 - i (chunk 1), as in ZB-V. DualPipe pairs a
    forward of one chunk with a backward of the other so that, on GPUs, one's communication hides
    behind the other's compute; this runtime runs each pair in order, forward first. Phases of
    rank i, with deferred weight backwards run oldest first:
      1. 2(p - i - 1) forwards of chunk 0;
      2. i + 1 pairs of forwards (chunk 0, chunk 1);
      3. p - i - 1 rounds of: input backward of chunk 1, a deferred W, forward of chunk 1;
      4. m - 2p + i + 1 rounds of: forward chunk 0 with full backward chunk 1, then forward
         chunk 1 with full backward chunk 0 (the main phase);
      5. p - i - 1 rounds of: full backward chunk 1, forward chunk 1 with full backward chunk 0;
      6. i + 1 rounds of backwards (chunk 1, chunk 0), full in the first half and split into I
         and W from the middle round on;
      7. p - i - 1 rounds of a deferred W and an input backward of chunk 0;
      8. the remaining deferred weight backwards.
    Phase 4 needs m >= 2p - 1 micro-batches on rank 0.
    """
    _require_virtual_stages("dualpipev", virtual_stages, 2)
    p, m = num_ranks, num_microbatches
    if m < 2 * p - 1:
        raise ScheduleError(
            f"schedule 'dualpipev' needs micro_batches >= 2 * pp - 1 = {2 * p - 1}, got "
            f"micro_batches={m} with pp={p}; use at least {2 * p - 1} micro-batches or 'zb-v'"
        )
    return Schedule("dualpipev", p, m, v_shape_placement(p),
                    [_dualpipe_v_rank(p, m, rank) for rank in range(p)])


def _dualpipe_v_rank(p: int, m: int, rank: int) -> list[Action]:
    down, up = rank, 2 * p - 1 - rank
    next_forward = {down: 0, up: 0}
    next_backward = {down: 0, up: 0}
    deferred: deque[Action] = deque()
    actions: list[Action] = []

    def forward(stage: int) -> None:
        actions.append(F(stage, next_forward[stage]))
        next_forward[stage] += 1

    def backward(stage: int, split: bool = False) -> None:
        mb = next_backward[stage]
        next_backward[stage] += 1
        if split:
            actions.append(I(stage, mb))
            deferred.append(W(stage, mb))
        else:
            actions.append(B(stage, mb))

    def run_deferred_weight() -> None:
        if deferred:
            actions.append(deferred.popleft())

    # 1. chunk-0 forwards
    for _ in range(2 * (p - rank - 1)):
        forward(down)

    # 2. forwards of both chunks
    for _ in range(rank + 1):
        forward(down)
        forward(up)

    # 3. input backward chunk 1, deferred W, forward chunk 1
    for _ in range(p - rank - 1):
        backward(up, split=True)
        run_deferred_weight()
        forward(up)

    # 4. main phase: F0 with B1, then F1 with B0
    for _ in range(m - 2 * p + rank + 1):
        forward(down)
        backward(up)
        forward(up)
        backward(down)

    # 5. B1, then F1 with B0
    for _ in range(p - rank - 1):
        backward(up)
        forward(up)
        backward(down)

    # 6. backwards of both chunks, split from the middle round on
    rounds = rank + 1
    split = False
    for i in range(rounds):
        if i == rounds // 2 and rank % 2 == 1:
            split = True
        backward(up, split)
        if i == rounds // 2 and rank % 2 == 0:
            split = True
        backward(down, split)

    # 7. deferred W, input backward chunk 0
    for _ in range(p - rank - 1):
        run_deferred_weight()
        backward(down, split=True)

    # 8. the remaining deferred weight backwards
    while deferred:
        run_deferred_weight()
    return actions


# ----------------------------------------------------------------------------------------------
# Evaluation


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


def _require_virtual_stages(name: str, virtual_stages: int, required: int) -> None:
    if virtual_stages != required:
        what = "one stage per rank" if required == 1 else f"{required} stages per rank"
        raise ScheduleError(
            f"schedule {name!r} runs {what}, but virtual_stages={virtual_stages}; set "
            f"virtual_stages to {required}"
            + (" or pick 'interleaved-1f1b', 'zb-v' or 'dualpipev'" if required == 1 else "")
        )


SCHEDULES: dict[str, Callable[[int, int, int], Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved-1f1b": interleaved_1f1b,
    "zb-h1": zb_h1,
    "zb-h2": zb_h2,
    "zb-v": zb_v,
    "dualpipev": dualpipe_v,
}

# Virtual stages per rank that each schedule of the zoo runs with (None: any v >= 2).
VIRTUAL_STAGES = {"gpipe": 1, "1f1b": 1, "interleaved-1f1b": None, "zb-h1": 1, "zb-h2": 1,
                  "zb-v": 2, "dualpipev": 2}


def build_schedule(name: str, num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> Schedule:
    """Return the schedule `name` from the registry, with compute actions only."""
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](num_ranks, num_microbatches, virtual_stages)
