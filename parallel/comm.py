"""Communication: the raw collectives, a ledger that counts them, and autograd-aware TP ops.

Every collective and point-to-point op that microtron issues goes through the functions in the
first half of this file, so one place decides the backend call and one place counts the traffic.
While a ledger records, it also times how long this rank is blocked in each op: the call itself
and, for a non-blocking op, the `wait()` on its work handle. That is the exposed communication
time; a transfer that runs while the rank computes costs nothing there.

The second half defines the autograd functions of Megatron-style tensor parallelism. They come in
conjugate pairs (Shoeybi et al. 2019): `copy_to_tp` is the identity forward and an all-reduce
backward, `reduce_from_tp` is an all-reduce forward and the identity backward; `split_last_dim`
and `gather_last_dim` are likewise each other's backward. Sequence parallelism (Korthikanti et al.
2022) adds `all_gather_along` and `reduce_scatter_along`, each the other's backward: together
they move the same volume as one all-reduce, split in two halves.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.mesh import Group

# torch 2.13 renamed the tensor forms of all-gather and reduce-scatter; older releases (>= 2.4,
# which setup.cfg admits) only have the old names.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ----------------------------------------------------------------------------------------------
# The ledger


@dataclass
class Ledger:
    """Counts of communication ops per (op, group), with the elements and bytes they carried.

    Elements are counted as the size of the tensor handed to the op on this rank (for an all-gather
    the gathered output, for a reduce-scatter the full input). `volume` converts them into the
    elements that a ring algorithm sends from each rank, the convention of the volume formulas in
    Narayanan et al. 2021. `seconds` is the time this rank was blocked in the op (see the module
    docstring).
    """

    calls: dict = field(default_factory=lambda: defaultdict(int))
    elements: dict = field(default_factory=lambda: defaultdict(int))
    bytes: dict = field(default_factory=lambda: defaultdict(int))
    seconds: dict = field(default_factory=lambda: defaultdict(float))
    group_sizes: dict = field(default_factory=dict)  # group name -> members

    def record(self, op: str, group_name: str, tensor: torch.Tensor, group_size: int = 2) -> None:
        key = (op, group_name)
        self.calls[key] += 1
        self.elements[key] += tensor.numel()
        self.bytes[key] += tensor.numel() * tensor.element_size()
        self.group_sizes[group_name] = group_size

    def add_time(self, op: str, group_name: str, seconds: float) -> None:
        self.seconds[(op, group_name)] += seconds

    def volume(self, op: str, group_name: str) -> float:
        """Return the elements that each rank sends for (op, group) under ring algorithms.

        An all-reduce of N elements over n ranks sends 2N(n-1)/n per rank (a reduce-scatter and an
        all-gather), an all-gather or reduce-scatter of N elements (the full tensor) sends
        N(n-1)/n, and a point-to-point op carries its N elements.
        """
        n = self.group_sizes.get(group_name, 1)
        elements = self.elements.get((op, group_name), 0)
        if op == "all_reduce":
            return 2 * elements * (n - 1) / n
        if op in ("all_gather", "reduce_scatter", "broadcast"):
            return elements * (n - 1) / n
        return float(elements)

    def total_seconds(self, op: str | None = None, group_name: str | None = None) -> float:
        return sum(
            t for (o, g), t in self.seconds.items()
            if (op is None or o == op) and (group_name is None or g == group_name)
        )

    def total_elements(self, op: str | None = None, group_name: str | None = None) -> int:
        return sum(
            n for (o, g), n in self.elements.items()
            if (op is None or o == op) and (group_name is None or g == group_name)
        )

    def total_calls(self, op: str | None = None, group_name: str | None = None) -> int:
        return sum(
            n for (o, g), n in self.calls.items()
            if (op is None or o == op) and (group_name is None or g == group_name)
        )

    def rows(self) -> list[tuple[str, str, int, int, int, float]]:
        """Return (op, group, calls, elements, bytes, seconds) rows, sorted by op and group."""
        return [
            (op, group, self.calls[(op, group)], self.elements[(op, group)], self.bytes[(op, group)],
             self.seconds.get((op, group), 0.0))
            for op, group in sorted(self.calls)
        ]


_active_ledgers: list[Ledger] = []


@contextlib.contextmanager
def recording(ledger: Ledger):
    """Record every communication op issued inside the block into `ledger`."""
    _active_ledgers.append(ledger)
    try:
        yield ledger
    finally:
        _active_ledgers.remove(ledger)


class _TimedWork:
    """A work handle whose `wait()` adds the time it blocks to the active ledgers."""

    def __init__(self, work, op: str, group_name: str):
        self._work = work
        self._key = (op, group_name)

    def wait(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            _add_time(*self._key, time.perf_counter() - start)

    def __getattr__(self, name):
        return getattr(self._work, name)


def _add_time(op: str, group_name: str, seconds: float) -> None:
    for ledger in _active_ledgers:
        ledger.add_time(op, group_name, seconds)


def _issue(op: str, group: Group, tensor: torch.Tensor, call):
    """Run `call()`, which issues one op over `group`, and record it; return its work handle.

    Without an active ledger this is `call()` alone, so that training pays for no timing.
    """
    if not _active_ledgers:
        return call()
    for ledger in _active_ledgers:
        ledger.record(op, group.name, tensor, group.size)
    start = time.perf_counter()
    work = call()
    _add_time(op, group.name, time.perf_counter() - start)
    return None if work is None else _TimedWork(work, op, group.name)


# ----------------------------------------------------------------------------------------------
# Raw collectives. A group of one member communicates nothing and records nothing.


def all_reduce(tensor: torch.Tensor, group: Group, op=dist.ReduceOp.SUM, async_op: bool = False):
    """All-reduce `tensor` in place over `group`; return the work handle when `async_op`."""
    if group.size == 1:
        return None
    return _issue("all_reduce", group, tensor,
                  lambda: dist.all_reduce(tensor, op=op, group=group.pg, async_op=async_op))


def all_gather_into(output: torch.Tensor, tensor: torch.Tensor, group: Group, async_op=False):
    """Gather `tensor` from every member into `output`, concatenated along dim 0."""
    if group.size == 1:
        output.copy_(tensor)
        return None
    return _issue("all_gather", group, output,
                  lambda: _all_gather_tensor(output, tensor, group=group.pg, async_op=async_op))


def reduce_scatter_into(output: torch.Tensor, tensor: torch.Tensor, group: Group,
                        op=dist.ReduceOp.SUM, async_op=False):
    """Sum `tensor` over `group` and keep this member's slice of dim 0 in `output`."""
    if group.size == 1:
        output.copy_(tensor)
        return None
    return _issue("reduce_scatter", group, tensor,
                  lambda: _reduce_scatter_tensor(output, tensor, op=op, group=group.pg,
                                                 async_op=async_op))


def broadcast(tensor: torch.Tensor, src_index: int, group: Group):
    """Broadcast `tensor` in place from the member at index `src_index` of `group`."""
    if group.size == 1:
        return None
    return _issue("broadcast", group, tensor,
                  lambda: dist.broadcast(tensor, src=group.global_rank(src_index), group=group.pg))


def isend(tensor: torch.Tensor, peer: int, group: Group, tag: int):
    """Post a non-blocking send of `tensor` to the global rank `peer`; return its work handle."""
    return _issue("send", group, tensor,
                  lambda: dist.isend(tensor, dst=peer, group=group.pg, tag=tag))


def irecv(tensor: torch.Tensor, peer: int, group: Group, tag: int):
    """Post a non-blocking receive into `tensor` from the global rank `peer`."""
    return _issue("recv", group, tensor,
                  lambda: dist.irecv(tensor, src=peer, group=group.pg, tag=tag))


# ----------------------------------------------------------------------------------------------
# Autograd-aware ops for tensor parallelism


class _CopyToGroup(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient backward (Megatron's `f`)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        all_reduce(grad, ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce forward, identity backward (Megatron's `g`)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        all_reduce(x, group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _split_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    size = x.shape[-1] // group.size
    return x[..., group.rank * size:(group.rank + 1) * size].contiguous()


def _gather_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    gathered, _ = start_all_gather(x, -1, group, async_op=False)
    return gathered


def start_all_gather(x: torch.Tensor, dim: int, group: Group, async_op: bool = True):
    """Start gathering the slices of every member along `dim`, in member order.

    Returns (gathered, work). `gathered` is valid once `work` has been waited for; work is None
    when the gather has already completed (sync, or a group of one).
    """
    # The tensor all-gather concatenates along dim 0, so gather with `dim` moved first.
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((group.size * moved.shape[0], *moved.shape[1:]), dtype=x.dtype, device=x.device)
    work = all_gather_into(out, moved, group, async_op=async_op)
    return out.movedim(0, dim), work


def start_reduce_scatter(x: torch.Tensor, dim: int, group: Group, async_op: bool = True):
    """Start summing `x` over the group and keeping this member's slice of `dim`.

    Returns (slice, work). `slice` is valid once `work` has been waited for; work is None when
    the reduce-scatter has already completed.
    """
    if x.shape[dim] % group.size != 0:
        raise ValueError(f"dim {dim} of shape {tuple(x.shape)} does not split over the "
                         f"{group.size} ranks of group {group.name}")
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // group.size, *moved.shape[1:]), dtype=x.dtype,
                      device=x.device)
    work = reduce_scatter_into(out, moved, group, async_op=async_op)
    return out.movedim(0, dim), work


def _gather_along(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    gathered, _ = start_all_gather(x, dim, group, async_op=False)
    return gathered


def _reduce_scatter_along(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    reduced, _ = start_reduce_scatter(x, dim, group, async_op=False)
    return reduced


class _SplitLastDim(torch.autograd.Function):
    """Keep this rank's slice of the last dim forward, all-gather the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim forward, keep this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _AllGatherAlong(torch.autograd.Function):
    """All-gather along a dim forward, reduce-scatter of the gradient along it backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather_along(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_along(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterAlong(torch.autograd.Function):
    """Reduce-scatter along a dim forward, all-gather of the gradient along it backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter_along(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along(grad, ctx.dim, ctx.group), None, None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group.size == 1 else _CopyToGroup.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group.size == 1 else _ReduceFromGroup.apply(x, group)


def split_last_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group.size == 1 else _SplitLastDim.apply(x, group)


def gather_last_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group.size == 1 else _GatherLastDim.apply(x, group)


def all_gather_along(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Join the slices of `x` that the group's members hold along `dim` (differentiable)."""
    return x if group.size == 1 else _AllGatherAlong.apply(x, dim, group)


def reduce_scatter_along(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Sum `x` over the group and keep this member's slice of `dim` (differentiable)."""
    return x if group.size == 1 else _ReduceScatterAlong.apply(x, dim, group)
