"""The cost model: step time, memory and their parts for one layout on one cluster.

step time = pipeline makespan + data-parallel reduction + tied-embedding reduction
            + optimizer step + small synchronizations

The pipeline makespan comes from the schedule simulator's rules (`planner.pipeline`) run on
per-stage action times: each F, I and W action costs its kernels (`planner.device`) plus its
tensor-parallel collectives, so every schedule of the zoo is covered, bubbles included. None of
the reductions after the pipeline overlaps it, which is how microtron's trainer (and Megatron-LM
in 2021) runs them. Memory is the largest over pipeline ranks of parameters, gradients,
optimizer state (divided by dp under ZeRO-1), activations at the schedule's peak and the
workspace of recomputation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from model.build import partition_layers
from planner import memory as mem
from planner.cluster import Cluster, Link
from planner.device import Device
from planner.ops import Shape, Work, embedding_work, head_work, layer_work
from planner.pipeline import compile_schedule, memory_events, peak_memory, pipeline_times, shared_core_times
from planner.workload import MICROTRON, Candidate, Implementation, Workload
from training.compat import Strategy

# The parts of a step time, in the order reports show them.
COMPONENTS = ("compute", "tp_comm", "pipeline_bubble", "dp_comm", "embedding_sync", "optimizer", "other")
COMPONENT_NAMES = {
    "compute": "compute", "tp_comm": "TP communication", "pipeline_bubble": "pipeline bubble",
    "dp_comm": "DP gradient reduction", "embedding_sync": "tied-embedding sync",
    "optimizer": "optimizer step", "other": "other",
}


@dataclass(frozen=True, eq=False)
class StageCosts:
    """Per-stage action times in seconds (collectives included) and their TP share.

    Compared and hashed by identity: `CostModel.stage_costs` caches one per setting."""

    forward: list[float]
    backward_input: list[float]
    backward_weight: list[float]
    tp_comm: list[float]  # per stage, collectives of F + I + W of one micro-batch
    transfer: float  # seconds for an activation to cross to the next pipeline rank
    flops: list[float]  # per stage, hardware FLOPs of one micro-batch


@dataclass
class Estimate:
    """The predicted step of one layout."""

    candidate: Candidate
    step_s: float
    components: dict[str, float]  # seconds, keyed by COMPONENTS; they add up to step_s
    memory: mem.MemoryBreakdown
    memory_limit: float
    model_flops: float  # per step, without recomputation (for MFU)
    hardware_flops: float  # per step, what the devices execute, recomputation included
    peak_flops: float  # of all devices together
    bubble_fraction: float
    tokens: int

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.memory_limit

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_s * self.peak_flops)

    @property
    def hfu(self) -> float:
        return self.hardware_flops / (self.step_s * self.peak_flops)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s

    @property
    def comm_share(self) -> float:
        comm = self.components["tp_comm"] + self.components["dp_comm"] + self.components["embedding_sync"]
        return comm / self.step_s

    def flops_per_device(self, flops: float) -> float:
        return flops / (self.step_s * self.candidate.devices)


class CostModel:
    """The step time and memory of layouts on `cluster`, run by `implementation`."""

    def __init__(self, cluster: Cluster, implementation: Implementation = MICROTRON):
        self.cluster = cluster
        self.implementation = implementation
        self.device = Device(cluster)

    # ------------------------------------------------------------------------------------------
    # The estimate

    def estimate(self, workload: Workload, candidate: Candidate) -> Estimate:
        """Return the predicted step time, its parts and the memory of `candidate`."""
        stages = self.stage_costs(workload, candidate)
        s = candidate.strategy
        compiled = compile_schedule(s.schedule, candidate.pp, candidate.micro_batches, s.virtual_stages)
        times = pipeline_times(compiled, stages.forward, stages.backward_input,
                               stages.backward_weight, stages.transfer)
        if self.cluster.speed_by_active:
            group = candidate.tp * candidate.dp
            times = shared_core_times(compiled, times, [self.cluster.slowdown(k * group)
                                                        for k in range(candidate.pp + 1)])
        critical = max(range(candidate.pp), key=lambda r: times.busy[r])
        rank_stages = [st for st, r in enumerate(compiled.stage_ranks) if r == critical]
        tp_comm = candidate.micro_batches * sum(stages.tp_comm[st] for st in rank_stages)

        dp_comm, embedding_sync, optimizer, other = self._step_tail(
            workload, candidate.tp, candidate.pp, candidate.dp, s.schedule, s.virtual_stages, s.zero1)
        components = {
            "compute": times.busy[critical] - tp_comm,
            "tp_comm": tp_comm,
            "pipeline_bubble": times.makespan - times.busy[critical],
            "dp_comm": dp_comm,
            "embedding_sync": embedding_sync,
            "optimizer": optimizer,
            "other": other,
        }
        memory = self.memory(workload, candidate)
        hardware = candidate.dp * candidate.micro_batches * sum(stages.flops)
        return Estimate(
            candidate=candidate,
            step_s=sum(components.values()),
            components=components,
            memory=memory,
            memory_limit=self.cluster.memory_bytes,
            model_flops=workload.model_flops(),
            hardware_flops=hardware,
            peak_flops=self.cluster.peak(workload.dtype) * candidate.devices,
            bubble_fraction=times.bubble_fraction,
            tokens=workload.tokens,
        )

    def lower_bound(self, workload: Workload, candidate: Candidate) -> float:
        """Return a lower bound of the step time that needs no pipeline evaluation.

        Every rank computes its actions of every micro-batch, and cannot start before the first
        micro-batch's forward has reached its first stage. With full backward passes it also
        cannot finish before the last micro-batch's backward has gone back from its first stage
        to stage 0. The bound is the largest over ranks, plus the reductions after the pipeline.
        """
        s = candidate.strategy
        stages = self.stage_costs(workload, candidate)
        pipeline = _pipeline_bound(stages, candidate.schedule_rule.placement, candidate.schedule_rule.split_backward,
                                   candidate.pp, s.virtual_stages, candidate.micro_batches)
        if self.cluster.speed_by_active:
            # Shared cores run faster while fewer ranks compute: bound with the fastest.
            group = candidate.tp * candidate.dp
            pipeline *= min(self.cluster.slowdown(k * group) for k in range(1, candidate.pp + 1))
        return pipeline + sum(self._step_tail(workload, candidate.tp, candidate.pp, candidate.dp,
                                              s.schedule, s.virtual_stages, s.zero1))

    @functools.lru_cache(maxsize=65536)
    def _step_tail(self, workload: Workload, tp: int, pp: int, dp: int, schedule: str,
                   virtual_stages: int, zero1: bool) -> tuple[float, float, float, float]:
        """Return the step's parts after the pipeline: dp reduction, tied-embedding sync,
        optimizer step and the rest."""
        candidate = Candidate(tp, pp, dp, 1, 1, Strategy(schedule=schedule, virtual_stages=virtual_stages,
                                                         zero1=zero1))
        # Every device computes the optimizer step and the small work at once.
        slowdown = self.cluster.slowdown(candidate.devices)
        return (self.dp_time(workload, candidate), self.embedding_sync_time(workload, candidate),
                self.optimizer_time(workload, candidate) * slowdown, self.other_time(workload, candidate) * slowdown)

    # ------------------------------------------------------------------------------------------
    # Pipeline stages

    def stage_costs(self, workload: Workload, candidate: Candidate) -> StageCosts:
        return self._stage_costs(workload, candidate.tp, candidate.pp, candidate.dp, candidate.micro_batch,
                                 candidate.strategy.virtual_stages, candidate.strategy.sequence_parallel,
                                 candidate.strategy.recompute)

    @functools.lru_cache(maxsize=65536)
    def _stage_costs(self, workload: Workload, tp: int, pp: int, dp: int, micro_batch: int,
                     virtual_stages: int, sequence_parallel: bool, recompute: str) -> StageCosts:
        layer, head, embed = self._piece_times(workload, tp, pp, dp, micro_batch, sequence_parallel, recompute)
        num_stages = pp * virtual_stages
        layers = [len(r) for r in partition_layers(workload.model.n_layer, num_stages)]
        transfer = self.transfer_time(workload, tp, pp, dp, micro_batch, sequence_parallel)
        blocking = transfer if self.implementation.p2p_blocking and pp > 1 else 0.0

        # Per stage: its layers, plus the embeddings on the first stage and the head on the last.
        forward = [count * layer.forward + blocking for count in layers]
        backward_input = [count * layer.backward_input + blocking for count in layers]
        backward_weight = [count * layer.backward_weight for count in layers]
        tp_comm = [count * layer.comm for count in layers]
        flops = [count * layer.flops for count in layers]
        for stage, piece in ((0, embed), (num_stages - 1, head)):
            forward[stage] += piece.forward
            backward_input[stage] += piece.backward_input
            backward_weight[stage] += piece.backward_weight
            tp_comm[stage] += piece.comm
            flops[stage] += piece.flops
        return StageCosts(tuple(forward), tuple(backward_input), tuple(backward_weight), tuple(tp_comm),
                          0.0 if blocking else transfer, tuple(flops))

    @functools.lru_cache(maxsize=16384)
    def _piece_times(self, workload: Workload, tp: int, pp: int, dp: int, micro_batch: int,
                     sequence_parallel: bool, recompute: str):
        """Return the times of a layer, the head and the embeddings for one micro-batch."""
        shape = self.shape(workload, micro_batch, tp, sequence_parallel)
        link = self._tp_link(tp, pp, dp)
        impl = self.implementation
        return (self._piece(layer_work(shape, impl, recompute), tp, link),
                self._piece(head_work(shape, impl), tp, link),
                self._piece(embedding_work(shape, impl), tp, link))

    def _piece(self, works: dict[str, Work], tp: int, link: Link) -> "_Piece":
        times = {kind: self._work_time(work, tp, link) for kind, work in works.items()}
        return _Piece(forward=sum(times["F"]), backward_input=sum(times["I"]),
                      backward_weight=sum(times["W"]), comm=sum(t[1] for t in times.values()),
                      flops=sum(work.flops for work in works.values()))

    def shape(self, workload: Workload, micro_batch: int, tp: int, sequence_parallel: bool) -> Shape:
        m = workload.model
        return Shape(micro_batch=micro_batch, seq_len=workload.seq_len, hidden=m.n_embd,
                     heads=m.n_head, ffn=m.ffn_size, vocab=m.vocab_size, tp=tp,
                     sequence_parallel=sequence_parallel and tp > 1, dtype=workload.dtype,
                     dropout=m.dropout > 0)

    def _work_time(self, work: Work, tp: int, link: Link) -> tuple[float, float]:
        """Return (kernel seconds, collective seconds) of one action's work."""
        device = self.device
        compute = sum(count * device.gemm(m, n, k, dtype) for m, n, k, dtype, count in work.gemms)
        compute += sum(device.attention(bh, s, hd, dtype, backward) for bh, s, hd, backward, dtype in work.attention)
        compute += sum(device.elementwise(kernel, n, dtype) for kernel, n, dtype in work.kernels)
        compute += work.ops * self.cluster.op_overhead
        comm = sum(self.cluster.collective_time(op, size, tp, link) for op, size in work.collectives)
        return compute, comm

    # ------------------------------------------------------------------------------------------
    # Communication

    @functools.lru_cache(maxsize=4096)
    def _tp_link(self, tp: int, pp: int, dp: int) -> Link:
        groups = [[base + i for i in range(tp)] for base in range(0, min(tp * dp, 64 * tp), tp)]
        return self._slowest(groups)

    @functools.lru_cache(maxsize=4096)
    def _dp_link(self, tp: int, pp: int, dp: int) -> Link:
        groups = [[d * tp + t for d in range(dp)] for t in range(min(tp, 64))]
        return self._slowest(groups)

    def _slowest(self, groups: list[list[int]]) -> Link:
        links = [self.cluster.group_link(g) for g in groups]
        return min(links, key=lambda link: link.bandwidth)

    def transfer_time(self, workload: Workload, tp: int, pp: int, dp: int, micro_batch: int,
                      sequence_parallel: bool) -> float:
        """Return the seconds an activation (b, s, h) takes to reach the next pipeline rank."""
        if pp == 1:
            return 0.0
        shape = self.shape(workload, micro_batch, tp, sequence_parallel)
        width = mem._widths(shape, self.implementation)[1]
        size = shape.tokens * shape.hidden * width / shape.sequence_split
        stride = tp * dp  # ranks between neighbouring pipeline ranks
        link = max((self.cluster.pair_link(r, r + stride) for r in range(min(stride, self.cluster.devices_per_node))),
                   key=lambda l: 1.0 / l.bandwidth)
        if self.implementation.scatter_gather and not shape.sequence_parallel and tp > 1:
            gather = self.cluster.collective_time("all_gather", size, tp, self._tp_link(tp, pp, dp))
            return self.cluster.collective_time("send", size / tp, 2, link) + gather
        return self.cluster.collective_time("send", size, 2, link)

    def dp_time(self, workload: Workload, candidate: Candidate) -> float:
        """Return the gradient reduction over dp: an all-reduce, or under ZeRO-1 a
        reduce-scatter of the gradients and an all-gather of the updated parameters."""
        if candidate.dp == 1:
            return 0.0
        params = max(self.rank_parameters(workload, candidate))
        state = mem.state_bytes(workload.dtype, self.implementation)
        link = self._dp_link(candidate.tp, candidate.pp, candidate.dp)
        if candidate.strategy.zero1:
            return (self.cluster.collective_time("reduce_scatter", params * state.grads, candidate.dp, link)
                    + self.cluster.collective_time("all_gather", params * state.params, candidate.dp, link))
        return self.cluster.collective_time("all_reduce", params * state.grads, candidate.dp, link)

    def embedding_sync_time(self, workload: Workload, candidate: Candidate) -> float:
        """Return the all-reduce of the tied embedding's gradient between the first and last
        pipeline ranks, when they are different ranks."""
        if not workload.tied_embeddings or candidate.schedule_rule.embedding_copies(candidate.pp) == 1:
            return 0.0
        m = workload.model
        rows = -(-m.vocab_size // candidate.tp) * m.n_embd
        state = mem.state_bytes(workload.dtype, self.implementation)
        last = (candidate.pp - 1) * candidate.tp * candidate.dp
        return self.cluster.collective_time("all_reduce", rows * state.grads, 2, self.cluster.pair_link(0, last))

    def optimizer_time(self, workload: Workload, candidate: Candidate) -> float:
        params = max(self.rank_parameters(workload, candidate))
        if candidate.strategy.zero1:
            params /= candidate.dp
        return self.device.optimizer_step(params, mem.state_bytes(workload.dtype, self.implementation).params)

    def other_time(self, workload: Workload, candidate: Candidate) -> float:
        """Return the small work of every step: zeroing the gradients and three scalar
        all-reduces (the loss over pp and dp, the gradient norm over tp x pp)."""
        params = max(self.rank_parameters(workload, candidate))
        grads = mem.state_bytes(workload.dtype, self.implementation).grads
        zero = self.device.elementwise("reduce", params * grads / 4, "float32")
        groups = ((candidate.pp, self.cluster.inter_node if candidate.pp > 1 else self.cluster.intra_node),
                  (candidate.dp, self._dp_link(candidate.tp, candidate.pp, candidate.dp)),
                  (candidate.tp * candidate.pp, self.cluster.inter_node))
        scalars = sum(self.cluster.collective_time("all_reduce", 8, n, link) for n, link in groups if n > 1)
        return zero + scalars

    # ------------------------------------------------------------------------------------------
    # Memory

    def rank_parameters(self, workload: Workload, candidate: Candidate) -> list[float]:
        """Return the parameters each pipeline rank holds on one TP rank."""
        return self._rank_parameters(workload, candidate.tp, candidate.pp,
                                     candidate.strategy.schedule, candidate.strategy.virtual_stages)

    @functools.lru_cache(maxsize=4096)
    def _rank_parameters(self, workload: Workload, tp: int, pp: int, schedule: str,
                         virtual_stages: int) -> list[float]:
        m = workload.model
        h = m.n_embd
        num_stages = pp * virtual_stages
        layers = [len(r) for r in partition_layers(m.n_layer, num_stages)]
        placement = _placement(_schedule_placement(schedule), pp, virtual_stages)
        vocab_rows = -(-m.vocab_size // tp) * h
        counts = [0.0] * pp
        for stage, count in enumerate(layers):
            counts[placement[stage]] += count * mem.layer_parameters(h, m.ffn_size, tp)
        counts[placement[0]] += vocab_rows + m.n_positions * h
        if placement[-1] != placement[0]:
            counts[placement[-1]] += vocab_rows
        counts[placement[-1]] += 2 * h  # final LayerNorm
        return counts

    def memory(self, workload: Workload, candidate: Candidate) -> mem.MemoryBreakdown:
        """Return the memory of the pipeline rank that needs the most."""
        s = candidate.strategy
        events = memory_events(s.schedule, candidate.pp, candidate.micro_batches, s.virtual_stages)
        activation, weight_grads, workspace = self._activation_bytes(workload, candidate)
        peaks = peak_memory(events, activation, weight_grads)
        return self._breakdown(workload, candidate, peaks, workspace)

    def memory_lower_bound(self, workload: Workload, candidate: Candidate) -> mem.MemoryBreakdown:
        """Return a lower bound of `memory` that needs no schedule: at some point every rank
        keeps one micro-batch's activations of its largest stage."""
        activation, _, workspace = self._activation_bytes(workload, candidate)
        placement = _placement(candidate.schedule_rule.placement, candidate.pp,
                               candidate.strategy.virtual_stages)
        peaks = [max(activation[st] for st, r in enumerate(placement) if r == rank)
                 for rank in range(candidate.pp)]
        return self._breakdown(workload, candidate, peaks, workspace)

    def _activation_bytes(self, workload: Workload, candidate: Candidate):
        """Return per-stage activation and weight-gradient bytes of one micro-batch, and the
        recomputation workspace."""
        s = candidate.strategy
        shape = self.shape(workload, candidate.micro_batch, candidate.tp, s.sequence_parallel)
        impl = self.implementation
        layers = [len(r) for r in partition_layers(workload.model.n_layer, candidate.num_stages)]
        per_layer = mem.layer_activation_bytes(shape, impl, s.recompute)
        activation = [count * per_layer for count in layers]
        activation[0] += mem.embedding_activation_bytes(shape)
        activation[-1] += mem.head_activation_bytes(shape, impl)
        weight_grads = None
        if candidate.schedule_rule.split_backward:
            weight_grads = [count * mem.layer_weight_grad_bytes(shape, impl) for count in layers]
        return activation, weight_grads, mem.recompute_workspace_bytes(shape, impl, s.recompute)

    def _breakdown(self, workload: Workload, candidate: Candidate, peaks: list[float],
                   workspace: float) -> mem.MemoryBreakdown:
        params = self.rank_parameters(workload, candidate)
        state = mem.state_bytes(workload.dtype, self.implementation)
        optimizer_share = candidate.dp if candidate.strategy.zero1 else 1
        totals = [params[r] * (state.params + state.grads + state.optimizer / optimizer_share)
                  + peaks[r] + workspace for r in range(candidate.pp)]
        rank = max(range(candidate.pp), key=lambda r: totals[r])
        return mem.MemoryBreakdown(params=params[rank] * state.params, grads=params[rank] * state.grads,
                                   optimizer=params[rank] * state.optimizer / optimizer_share,
                                   activations=peaks[rank], workspace=workspace, rank=rank)


@dataclass(frozen=True)
class _Piece:
    """Seconds of F, I and W (collectives included) of a part of a stage, their collectives,
    and its hardware FLOPs, for one micro-batch."""

    forward: float
    backward_input: float
    backward_weight: float
    comm: float
    flops: float


@functools.lru_cache(maxsize=65536)
def _pipeline_bound(stages: StageCosts, placement_kind: str, split_backward: bool, pp: int,
                    virtual_stages: int, micro_batches: int) -> float:
    """Return the pipeline part of `CostModel.lower_bound`."""
    placement = _placement(placement_kind, pp, virtual_stages)
    fill_forward = _prefix_sums(stages.forward)
    fill_backward = _prefix_sums([i + w for i, w in zip(stages.backward_input, stages.backward_weight)])
    busy = [0.0] * pp
    first = [len(placement)] * pp
    for stage, rank in enumerate(placement):
        busy[rank] += stages.forward[stage] + stages.backward_input[stage] + stages.backward_weight[stage]
        first[rank] = min(first[rank], stage)
    best = 0.0
    for rank in range(pp):
        hops = _hops(placement_kind, pp, virtual_stages, first[rank]) * stages.transfer
        fill = fill_forward[first[rank]] + hops
        drain = 0.0 if split_backward else fill_backward[first[rank]] + hops
        best = max(best, fill + micro_batches * busy[rank] + drain)
    return best


def _prefix_sums(values: list[float]) -> list[float]:
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    return sums


def _schedule_placement(schedule: str) -> str:
    from training.compat import SCHEDULE_RULES
    return SCHEDULE_RULES[schedule].placement


def _placement(kind: str, pp: int, virtual_stages: int) -> list[int]:
    """Return the pipeline rank of each stage under a placement of `training.compat`."""
    if kind == "contiguous":
        return list(range(pp))
    if kind == "round-robin":
        return [s % pp for s in range(pp * virtual_stages)]
    return list(range(pp)) + list(reversed(range(pp)))


@functools.lru_cache(maxsize=65536)
def _hops(placement_kind: str, pp: int, virtual_stages: int, stage: int) -> int:
    """Return how many rank-to-rank transfers the forward path takes to reach `stage`."""
    placement = _placement(placement_kind, pp, virtual_stages)
    return sum(1 for s in range(stage) if placement[s] != placement[s + 1])
