"""The distributed optimizer (ZeRO stage 1, Rajbhandari et al. 2020): optimizer state sharded
over the dp group.

Every dp replica keeps the whole model and the whole gradient buffer, but updates only its shard:
the chunk of every gradient bucket that `GradientBuffer.reduce_scatter_average` reduces for it.
The parameters are moved into flat buffers laid out exactly like the gradient buffers, so after
the update one all-gather per bucket gives every replica all the updated parameters.

A shard cuts through parameters. Each piece of a parameter that falls into this rank's shard is
a *segment*: a 1-D view of the flat parameter buffer whose `.grad` is the matching view of the
flat gradient buffer. A standard torch optimizer runs on the segments, so its state (AdamW's two
moments) exists only for this rank's shard, 1/dp of a replicated optimizer's. Splitting a tensor
this way is exact for optimizers whose update is elementwise (SGD, Adam, AdamW), not for ones
that use whole-tensor statistics (LAMB, Adafactor).

The parameters are the master weights: under autocast (mixed precision) they stay in fp32 and
each forward casts them, so every rank keeps them whole and only their update is sharded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel import comm
from parallel.data_parallel import GradientBuffer
from parallel.mesh import Group


@dataclass(frozen=True)
class Segment:
    """The part [start, end) of a flattened parameter that this rank updates."""

    param: nn.Parameter
    start: int
    end: int
    tensor: torch.Tensor  # 1-D view of the flat parameter buffer; the optimizer's parameter


class DistributedOptimizer:
    """An elementwise torch optimizer (such as torch.optim.AdamW) run on this rank's shard.

    param_groups: torch-style groups ({"params": [...], option: value}). Each option applies to
        the segments of that group's parameters.
    Use `grads` as the gradient buffer: backward accumulates into it, `reduce_gradients` averages
    this rank's shard, `step` updates the shard and all-gathers the parameters.
    """

    def __init__(self, param_groups: list[dict], group: Group, optimizer_class, *,
                 bucket_bytes: int = 4 * 2**20, **defaults):
        self.group = group
        params = [p for g in param_groups for p in g["params"]]
        self.grads = GradientBuffer(params, group, bucket_bytes, pad_buckets=True)
        self.param_buffers = [torch.zeros_like(buffer) for buffer in self.grads.buffers]
        self._move_params_into_buffers()
        self.segments = self._make_segments()

        segment_groups = []
        for param_group in param_groups:
            members = {id(p) for p in param_group["params"]}
            options = {key: value for key, value in param_group.items() if key != "params"}
            tensors = [s.tensor for s in self.segments if id(s.param) in members]
            segment_groups.append({**options, "params": tensors})
        self.optimizer = optimizer_class(segment_groups, **defaults)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def reduce_gradients(self) -> None:
        """Average this rank's shard of the gradients over the dp group."""
        self.grads.reduce_scatter_average()

    def local_grads(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Return (parameter, gradient of its segment) for every segment of this rank's shard."""
        return [(s.param, s.tensor.grad) for s in self.segments]

    @torch.no_grad()
    def step(self) -> None:
        """Update this rank's shard, then all-gather the parameters over the dp group."""
        self.optimizer.step()
        self._all_gather_shards(self.param_buffers)

    def state_bytes(self) -> int:
        """Return the bytes of optimizer state that this rank holds."""
        return sum(value.numel() * value.element_size()
                   for state in self.optimizer.state.values()
                   for value in state.values() if torch.is_tensor(value))

    # ------------------------------------------------------------------------------------------
    # Full, layout-free state

    @torch.no_grad()
    def gather_param_states(self, keys: tuple[str, ...]) -> tuple[dict, int]:
        """Return ({id(param): {key: tensor shaped like the param}}, step) on every dp rank.

        Collective over the dp group. A state that is missing (before the first step) is zero.
        """
        full = {key: [torch.zeros_like(buffer) for buffer in self.param_buffers] for key in keys}
        step = torch.zeros(1, dtype=torch.float64, device=self.param_buffers[0].device)
        for segment in self.segments:
            state = self.optimizer.state.get(segment.tensor, {})
            buffer_index, offset = self.grads.offsets[id(segment.param)]
            for key in keys:
                if key in state:
                    full[key][buffer_index][offset + segment.start:offset + segment.end].copy_(state[key])
            if "step" in state:
                step[0] = float(state["step"])
        for key in keys:
            self._all_gather_shards(full[key])
        # A rank whose shard is only padding has no state, so it takes the step from the others.
        comm.all_reduce(step, self.group, op=dist.ReduceOp.MAX)

        states = {}
        for param in self.grads.params:
            buffer_index, _ = self.grads.offsets[id(param)]
            states[id(param)] = {key: self.grads.view_of(param, full[key][buffer_index]).clone()
                                 for key in keys}
        return states, int(step[0])

    @torch.no_grad()
    def load_param_states(self, states: dict, step: int) -> None:
        """Set the state of this rank's segments from ({id(param): {key: tensor}}, step), where
        each tensor is shaped like its parameter."""
        for segment in self.segments:
            state = self.optimizer.state[segment.tensor]
            for key, value in states[id(segment.param)].items():
                piece = value.reshape(-1)[segment.start:segment.end]
                state[key] = piece.to(device=segment.tensor.device, dtype=segment.tensor.dtype).clone()
            state["step"] = torch.tensor(float(step))

    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _move_params_into_buffers(self) -> None:
        for param in self.grads.params:
            buffer_index, _ = self.grads.offsets[id(param)]
            view = self.grads.view_of(param, self.param_buffers[buffer_index])
            view.copy_(param)
            param.data = view

    def _make_segments(self) -> list[Segment]:
        segments = []
        rank, size = self.group.rank, self.group.size
        for bucket in self.grads.bucket_ranges:
            low, high = bucket.chunk(rank, size)
            for param in self.grads.params:
                buffer_index, offset = self.grads.offsets[id(param)]
                start, end = max(low, offset), min(high, offset + param.numel())
                if buffer_index != bucket.buffer_index or start >= end:
                    continue
                tensor = self.param_buffers[buffer_index][start:end]
                tensor.grad = self.grads.buffers[buffer_index][start:end]
                segments.append(Segment(param, start - offset, end - offset, tensor))
        return segments

    def _all_gather_shards(self, buffers: list[torch.Tensor]) -> None:
        """Give every dp rank the chunks that the other ranks own, bucket by bucket."""
        if self.group.size == 1:
            return
        works = []
        for bucket in self.grads.bucket_ranges:
            low, high = bucket.chunk(self.group.rank, self.group.size)
            buffer = buffers[bucket.buffer_index]
            local = buffer[low:high].clone()  # the collective must not read and write one storage
            works.append(comm.all_gather_into(buffer[bucket.start:bucket.end], local, self.group,
                                              async_op=True))
        for work in works:
            work.wait()
