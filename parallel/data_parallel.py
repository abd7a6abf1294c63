"""Data-parallel gradient reduction over flat, bucketed gradient buffers.

All gradients of one dtype live in one flat buffer, and each parameter's `.grad` is a view into
it. Autograd accumulates into those views in place across micro-batches, so averaging over the dp
group is one collective per bucket with no packing or copying. Buckets are contiguous slices of
the buffer, filled in reverse parameter order (the order in which backward produces gradients).

Two reductions:
  `average`: all-reduce every bucket; every replica ends with the whole averaged gradient.
    After `overlap_with_backward`, a bucket's all-reduce starts during backward, as soon as
    every gradient in it has received its last contribution of the step, and `average` only
    starts the rest and waits. The first step counts how many contributions each parameter
    receives and reduces everything at the end. The schedule and the model give the same count
    every step, so every replica launches its buckets in the same order.
  `reduce_scatter_average`: for the distributed optimizer (ZeRO-1). Each bucket is padded to a
    multiple of dp and viewed as dp equal chunks. Member i of the dp group ends with the average
    of chunk i of every bucket (its shard), and the rest of its buffer stays unreduced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

from parallel import comm
from parallel.mesh import Group


@dataclass(frozen=True)
class Bucket:
    """A contiguous range [start, end) of the flat buffer `buffer_index`."""

    buffer_index: int
    start: int
    end: int

    def chunk(self, index: int, num_chunks: int) -> tuple[int, int]:
        """Return the flat range of chunk `index` when the bucket is split into `num_chunks`."""
        size = (self.end - self.start) // num_chunks
        return self.start + index * size, self.start + (index + 1) * size


class GradientBuffer:
    """Flat gradient storage for `params`, reduced over `group` in buckets of about
    `bucket_bytes` bytes.

    With `pad_buckets` every bucket's length is padded to a multiple of the group size, as
    `reduce_scatter_average` needs. Padding elements belong to no parameter and stay zero.
    """

    def __init__(self, params: list[nn.Parameter], group: Group, bucket_bytes: int = 4 * 2**20,
                 pad_buckets: bool = False):
        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self.buffers: list[torch.Tensor] = []
        self.buckets: list[torch.Tensor] = []
        self.bucket_ranges: list[Bucket] = []
        self.offsets: dict[int, tuple[int, int]] = {}  # id(param) -> (buffer index, flat offset)
        multiple = group.size if pad_buckets else 1

        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for param in reversed(self.params):
            by_dtype.setdefault(param.dtype, []).append(param)
        for buffer_index, (dtype, group_params) in enumerate(by_dtype.items()):
            element_size = torch.empty((), dtype=dtype).element_size()
            offset, bucket_start = 0, 0
            for param in group_params:
                self.offsets[id(param)] = (buffer_index, offset)
                offset += param.numel()
                if (offset - bucket_start) * element_size >= bucket_bytes:
                    offset = bucket_start + _round_up(offset - bucket_start, multiple)
                    self.bucket_ranges.append(Bucket(buffer_index, bucket_start, offset))
                    bucket_start = offset
            if offset > bucket_start:
                offset = bucket_start + _round_up(offset - bucket_start, multiple)
                self.bucket_ranges.append(Bucket(buffer_index, bucket_start, offset))

            buffer = torch.zeros(offset, dtype=dtype, device=group_params[0].device)
            self.buffers.append(buffer)
            for param in group_params:
                param.grad = self.view_of(param, buffer)
        self.buckets = [self.buffers[b.buffer_index][b.start:b.end] for b in self.bucket_ranges]
        self._overlap: _Overlap | None = None

    def view_of(self, param: nn.Parameter, buffer: torch.Tensor) -> torch.Tensor:
        """Return the view of `param`'s range in `buffer` (this buffer, or one laid out like it)."""
        _, offset = self.offsets[id(param)]
        return buffer[offset:offset + param.numel()].view_as(param)

    def zero(self) -> None:
        for buffer in self.buffers:
            buffer.zero_()
        if self._overlap is not None:
            self._overlap.start_step()

    @property
    def buckets_started_in_backward(self) -> int:
        """Return how many buckets of the last step started their all-reduce during backward."""
        return 0 if self._overlap is None else self._overlap.early

    def overlap_with_backward(self, held_back: Iterable[nn.Parameter] = ()) -> None:
        """All-reduce each bucket during backward once its gradients are final (see the module
        doc). Buckets that hold a parameter of `held_back`, whose gradient is still changed
        after backward (the tied embedding, sequence-parallel LayerNorms), wait for `average`."""
        if self.group.size == 1 or self._overlap is not None:
            return
        self._overlap = _Overlap(self, {id(p) for p in held_back})

    def check_views(self) -> None:
        """Raise if something replaced a `.grad` view (for example zero_grad(set_to_none=True))."""
        for param in self.params:
            if param.grad is None or param.grad.untyped_storage().data_ptr() not in {
                    b.untyped_storage().data_ptr() for b in self.buffers}:
                raise RuntimeError(
                    "a parameter's .grad no longer points into the gradient buffer; zero gradients "
                    "with GradientBuffer.zero(), not optimizer.zero_grad()"
                )

    def average(self) -> None:
        """Average every gradient over the dp group: all buckets in flight at once, then wait."""
        if self.group.size == 1:
            return
        if self._overlap is not None:
            works = self._overlap.finish_step()
        else:
            works = [comm.all_reduce(bucket, self.group, async_op=True) for bucket in self.buckets]
        for work in works:
            work.wait()
        for buffer in self.buffers:
            buffer.mul_(1.0 / self.group.size)

    def reduce_scatter_average(self) -> None:
        """Average this member's chunk of every bucket over the dp group (see the module doc).

        Chunks owned by other members keep this replica's unreduced gradients afterwards.
        """
        if self.group.size == 1:
            return
        pending = []
        for bucket, flat in zip(self.bucket_ranges, self.buckets):
            out = torch.empty(flat.numel() // self.group.size, dtype=flat.dtype, device=flat.device)
            work = comm.reduce_scatter_into(out, flat, self.group, async_op=True)
            pending.append((bucket, out, work))
        for bucket, out, work in pending:
            work.wait()
            start, end = bucket.chunk(self.group.rank, self.group.size)
            self.buffers[bucket.buffer_index][start:end].copy_(out).mul_(1.0 / self.group.size)


class _Overlap:
    """A per-step count of each parameter's gradient contributions, which starts a bucket's
    all-reduce once every gradient in it has had its last contribution."""

    def __init__(self, grads: GradientBuffer, held_back: set[int]):
        self.grads = grads
        self.bucket_of: dict[int, int] = {}
        for param in grads.params:
            buffer_index, offset = grads.offsets[id(param)]
            self.bucket_of[id(param)] = next(
                i for i, b in enumerate(grads.bucket_ranges)
                if b.buffer_index == buffer_index and b.start <= offset < b.end)
            # Autograd calls the hook after it adds a gradient; `weight_grad.accumulate_grad`
            # calls the attribute after it adds a deferred weight gradient.
            param.register_post_accumulate_grad_hook(self.accumulated)
            param.on_grad_accumulated = self.accumulated
        self.deferred_buckets = {self.bucket_of[i] for i in held_back if i in self.bucket_of}
        self.expected: dict[int, int] | None = None  # contributions per parameter, once counted
        self.start_step()

    def start_step(self) -> None:
        self.seen = dict.fromkeys(self.bucket_of, 0)
        self.works: dict[int, object] = {}
        self.early = 0
        if self.expected is not None:
            self.waiting = [0] * len(self.grads.buckets)
            for key, count in self.expected.items():
                if count > 0:
                    self.waiting[self.bucket_of[key]] += 1

    def accumulated(self, param: nn.Parameter) -> None:
        key = id(param)
        self.seen[key] += 1
        if self.expected is None:
            return
        bucket = self.bucket_of[key]
        if self.seen[key] > self.expected[key]:
            raise RuntimeError(
                f"unexpected gradient: the parameter of shape {tuple(param.shape)} received "
                f"contribution {self.seen[key]} in this step, but only {self.expected[key]} in the "
                f"first step, so its bucket's all-reduce may have started without it. Every step must "
                f"run the same backward passes (the same schedule and micro-batches).")
        if self.seen[key] == self.expected[key]:
            self.waiting[bucket] -= 1
            if self.waiting[bucket] == 0 and bucket not in self.deferred_buckets:
                self.works[bucket] = comm.all_reduce(self.grads.buckets[bucket], self.grads.group,
                                                     async_op=True)
                self.early += 1

    def finish_step(self) -> list:
        """Start the buckets that have not started, in bucket order; return every bucket's work."""
        if self.expected is None:
            self.expected = dict(self.seen)
        for index, bucket in enumerate(self.grads.buckets):
            if index not in self.works:
                self.works[index] = comm.all_reduce(bucket, self.grads.group, async_op=True)
        return list(self.works.values())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
