"""The communication of one training step as the cost model counts it, in the convention of the
communication ledger (`parallel.comm.Ledger`): bytes per (op, group) on one rank, where an
all-gather counts its gathered output and a reduce-scatter its full input.

`tests/test_planner_traffic.py` runs real steps inside a ledger and checks that these are the
collectives and transfers the trainer issues, byte for byte, so the times that the cost model
charges (`planner.estimate`) cover every one of them.
"""

from __future__ import annotations

from collections import defaultdict

from model.build import partition_layers
from planner import memory as mem
from planner.estimate import CostModel, _placement
from planner.ops import embedding_work, head_work, layer_work
from planner.workload import Candidate, Workload

SCALAR = 8  # the loss and the squared gradient norm are all-reduced as one float64


def step_traffic(model: CostModel, workload: Workload, candidate: Candidate) -> list[dict[tuple[str, str], float]]:
    """Return, per pipeline rank, the bytes per (op, group) that one of its ranks communicates
    in a training step."""
    s = candidate.strategy
    shape = model.shape(workload, candidate.micro_batch, candidate.tp, s.sequence_parallel)
    impl = model.implementation
    layer = layer_work(shape, impl, s.recompute)
    head = head_work(shape, impl)
    embed = embedding_work(shape, impl)
    num_stages = candidate.num_stages
    layers = [len(r) for r in partition_layers(workload.model.n_layer, num_stages)]
    placement = _placement(candidate.schedule_rule.placement, candidate.pp, s.virtual_stages)
    activation = shape.tokens * shape.hidden * mem._widths(shape, impl)[1] / shape.sequence_split
    params = model.rank_parameters(workload, candidate)
    grads = mem.state_bytes(workload.dtype, impl).grads
    tied = candidate.schedule_rule.embedding_copies(candidate.pp) == 2 and workload.tied_embeddings
    rows = -(-workload.model.vocab_size // candidate.tp) * workload.model.n_embd

    result = []
    for rank in range(candidate.pp):
        traffic: dict[tuple[str, str], float] = defaultdict(float)
        for stage, count in enumerate(layers):
            if placement[stage] != rank:
                continue
            pieces = [(count, layer)] + [(1, embed)] * (stage == 0) + [(1, head)] * (stage == num_stages - 1)
            for times, works in pieces:
                for work in works.values():
                    for op, size in work.collectives:
                        traffic[(op, "tp")] += candidate.micro_batches * times * size
            # A forward receives from the previous stage's rank and sends to the next one's; a
            # backward the other way round.
            for neighbour in (stage - 1, stage + 1):
                if 0 <= neighbour < num_stages and placement[neighbour] != rank:
                    traffic[("send", "pp")] += candidate.micro_batches * activation
                    traffic[("recv", "pp")] += candidate.micro_batches * activation
        if candidate.dp > 1 and s.zero1:
            # NOTE: ZeRO-1 pads each gradient bucket to a multiple of dp, a few bytes more.
            traffic[("reduce_scatter", "dp")] += params[rank] * grads
            traffic[("all_gather", "dp")] += params[rank] * mem.state_bytes(workload.dtype, impl).params
            traffic[("all_reduce", "dp")] += SCALAR
        elif candidate.dp > 1:
            traffic[("all_reduce", "dp")] += params[rank] * grads + SCALAR
        if candidate.pp > 1:
            traffic[("all_reduce", "pp")] += SCALAR
        if candidate.tp * candidate.pp > 1:
            traffic[("all_reduce", "model")] += SCALAR
        if tied and rank in (placement[0], placement[-1]):
            traffic[("all_reduce", "embedding")] += rows * grads
        result.append(dict(traffic))
    return result
