"""Data-parallel gradient averaging over flat, bucketed gradient buffers.

All gradients of one dtype live in one flat buffer, and each parameter's `.grad` is a view into
it. Autograd accumulates into those views in place across micro-batches, so averaging over the dp
group is one all-reduce per bucket with no packing or copying. Buckets are contiguous slices of
the buffer, filled in reverse parameter order (the order in which backward produces gradients).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from parallel import comm
from parallel.mesh import Group


class GradientBuffer:
    """Flat gradient storage for `params`, averaged over `group` in buckets of about
    `bucket_bytes` bytes."""

    def __init__(self, params: list[nn.Parameter], group: Group, bucket_bytes: int = 4 * 2**20):
        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self.buffers: list[torch.Tensor] = []
        self.buckets: list[torch.Tensor] = []

        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for param in reversed(self.params):
            by_dtype.setdefault(param.dtype, []).append(param)
        for dtype, group_params in by_dtype.items():
            total = sum(p.numel() for p in group_params)
            buffer = torch.zeros(total, dtype=dtype, device=group_params[0].device)
            self.buffers.append(buffer)
            offset, bucket_start = 0, 0
            for param in group_params:
                param.grad = buffer[offset:offset + param.numel()].view_as(param)
                offset += param.numel()
                if (offset - bucket_start) * buffer.element_size() >= bucket_bytes:
                    self.buckets.append(buffer[bucket_start:offset])
                    bucket_start = offset
            if offset > bucket_start:
                self.buckets.append(buffer[bucket_start:offset])

    def zero(self) -> None:
        for buffer in self.buffers:
            buffer.zero_()

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
        works = [comm.all_reduce(bucket, self.group, async_op=True) for bucket in self.buckets]
        for work in works:
            work.wait()
        for buffer in self.buffers:
            buffer.mul_(1.0 / self.group.size)
