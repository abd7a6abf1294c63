"""Tensor-parallel layers: column- and row-parallel linear layers and a vocab-parallel embedding.

Each parameter that TP splits carries a `ShardSpec` in the attribute `tp_shard`, which describes
how its full tensor maps onto the TP ranks. The spec is what makes parameters layout-free: `shard` cuts
this rank's slice out of a full tensor (initialization, loading a checkpoint) and `unshard` joins
the slices of all ranks back into it (saving). Parameters without the attribute are replicated
over the TP group.

Weights use the nn.Linear layout, (out_features, in_features).

With sequence parallelism (Korthikanti et al. 2022) the activations outside the tensor-parallel
regions are split along the sequence, dim `SEQUENCE_DIM` of (batch, sequence, hidden): a
column-parallel layer all-gathers the sequence of its input instead of taking a replicated input,
and a row-parallel layer reduce-scatters its output along the sequence instead of all-reducing
it. Replicated parameters that then see only this rank's part of the sequence carry
`sequence_parallel = True`; their gradients must be summed over the TP group after the backward
pass (`sum_sequence_parallel_grads`).

Under autocast (mixed precision) the linear layers cast their input, weight and bias to the
autocast dtype themselves, because they are custom autograd functions: the weights stay in their
own dtype (the fp32 master weights) and their gradients are returned in it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel import comm, weight_grad
from parallel.mesh import Group

SEQUENCE_DIM = 1  # activations are (batch, sequence, hidden)


@dataclass(frozen=True)
class ShardSpec:
    """How a parameter is split over the TP group.

    dim: the tensor dim that is split.
    blocks: the split dim is viewed as `blocks` equal blocks, and each block is split separately,
        so a rank's slice holds its part of every block. A fused QKV weight uses blocks=3, so that
        each rank gets the query, key and value rows of the same heads.
    full_size: the size of the split dim in the full tensor, when the ranks together hold a
        larger, padded size (a vocabulary padded to a multiple of tp). Padding rows are zero, and
        `unshard` drops them.
    """

    dim: int
    blocks: int = 1
    full_size: int | None = None


def shard(full: torch.Tensor, spec: ShardSpec | None, rank: int, size: int) -> torch.Tensor:
    """Return TP rank `rank`'s slice (of `size` ranks) of the full tensor."""
    if spec is None or size == 1 and spec.full_size is None:
        return full
    if spec.full_size is not None:
        padded = padded_size(spec.full_size, size)
        pad_shape = list(full.shape)
        pad_shape[spec.dim] = padded - full.shape[spec.dim]
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=spec.dim)
    blocks = full.chunk(spec.blocks, dim=spec.dim)
    return torch.cat([b.chunk(size, dim=spec.dim)[rank] for b in blocks], dim=spec.dim).contiguous()


def unshard(slices: list[torch.Tensor], spec: ShardSpec | None) -> torch.Tensor:
    """Join the slices of all TP ranks, in rank order, into the full tensor."""
    if spec is None:
        return slices[0]
    per_rank_blocks = [s.chunk(spec.blocks, dim=spec.dim) for s in slices]
    full = torch.cat(
        [torch.cat([blocks[b] for blocks in per_rank_blocks], dim=spec.dim) for b in range(spec.blocks)],
        dim=spec.dim,
    )
    if spec.full_size is not None:
        full = full.narrow(spec.dim, 0, spec.full_size)
    return full


def padded_size(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def full_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    """Return the shape of the full tensor of which `param` is one TP rank's slice."""
    shape = list(param.shape)
    spec = getattr(param, "tp_shard", None)
    if spec is not None:
        shape[spec.dim] = spec.full_size if spec.full_size is not None else shape[spec.dim] * tp_size
    return tuple(shape)


# ----------------------------------------------------------------------------------------------
# Linear layers


# Input layouts of a linear layer over the TP group.
LOCAL = "local"  # nothing to communicate: a row-parallel layer's split input, or tp=1
REPLICATED = "replicated"  # the same full input on every rank
SEQUENCE_SHARDED = "sequence"  # each rank has its slice of the sequence (dim SEQUENCE_DIM)


class _ParallelLinear(torch.autograd.Function):
    """y = x W^T + b, with the backward that tensor, sequence and pipeline parallelism need.

    REPLICATED input: backward all-reduces the input gradient (the `f` operator) and overlaps that
    all-reduce with the weight-gradient matmul, which does not depend on it.
    SEQUENCE_SHARDED input: forward all-gathers the sequence but saves only this rank's slice.
    Backward all-gathers the slices again while it computes the input gradient, then
    reduce-scatters the input gradient while it computes the weight gradient.
    Inside `deferring_weight_grads` the weight and bias gradients are queued instead of computed.
    The queued work keeps the gathered input, so it needs no communication when it runs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group, input_mode):
        x, compute_weight, compute_bias = _cast_for_autocast(x, weight, bias)
        total_x = x
        if input_mode == SEQUENCE_SHARDED:
            total_x, _ = comm.start_all_gather(x, SEQUENCE_DIM, group, async_op=False)
        ctx.save_for_backward(x, weight)
        ctx.bias = bias
        ctx.group = group
        ctx.input_mode = input_mode
        return F.linear(total_x, compute_weight, compute_bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        group, mode = ctx.group, ctx.input_mode
        gather_work = None
        total_x = x
        if mode == SEQUENCE_SHARDED:
            total_x, gather_work = comm.start_all_gather(x, SEQUENCE_DIM, group)

        grad_x = grad_out.matmul(weight.to(grad_out.dtype))
        grad_work = None
        if mode == REPLICATED:
            grad_work = comm.all_reduce(grad_x, group, async_op=True)
        elif mode == SEQUENCE_SHARDED:
            if gather_work is not None:
                gather_work.wait()
            grad_x, grad_work = comm.start_reduce_scatter(grad_x, SEQUENCE_DIM, group)

        queue = weight_grad.active_queue()
        if queue is None:
            grad_weight, grad_bias = _weight_grads(grad_out, total_x, ctx.bias is not None)
        else:
            queue.append(functools.partial(_accumulate_weight_grads, grad_out, total_x, weight, ctx.bias))
            grad_weight = grad_bias = None

        if grad_work is not None:
            grad_work.wait()
        return grad_x, grad_weight, grad_bias, None, None


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """Return the dtype autocast computes in on this device type, or None when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast_for_autocast(x, weight, bias):
    """Cast the operands of a linear layer as autocast would for F.linear.

    Autocast leaves float64 alone, as PyTorch's autocast does.
    """
    dtype = _autocast_dtype(x.device.type)
    if dtype is None:
        return x, weight, bias

    def cast(t):
        if t is None or not t.is_floating_point() or t.dtype == torch.float64:
            return t
        return t.to(dtype)

    return cast(x), cast(weight), cast(bias)


def _weight_grads(grad_out: torch.Tensor, x: torch.Tensor, has_bias: bool):
    grad_out_2d = grad_out.reshape(-1, grad_out.shape[-1])
    grad_weight = grad_out_2d.t().matmul(x.reshape(-1, x.shape[-1]))
    # A 16-bit gradient is summed over the tokens in fp32.
    grad_bias = grad_out_2d.sum(0, dtype=torch.promote_types(grad_out.dtype, torch.float32)) if has_bias else None
    return grad_weight, grad_bias


def _accumulate_weight_grads(grad_out, x, weight, bias) -> None:
    grad_weight, grad_bias = _weight_grads(grad_out, x, bias is not None)
    weight_grad.accumulate_grad(weight, grad_weight)
    if bias is not None:
        weight_grad.accumulate_grad(bias, grad_bias)


def linear_with_tp_input(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         group: Group, sequence_parallel: bool = False) -> torch.Tensor:
    """Return x W^T + b for a weight split by output rows over `group`.

    x is replicated over `group`: the identity forward and an all-reduce of its gradient backward
    (the `f` operator). With `sequence_parallel`, x is this rank's slice of the sequence instead,
    which is all-gathered first, so the output covers the whole sequence.
    """
    if group.size == 1:
        mode = LOCAL
    else:
        mode = SEQUENCE_SHARDED if sequence_parallel else REPLICATED
    return _ParallelLinear.apply(x, weight, bias, group, mode)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Return x W^T + b with no communication (whose weight gradients can be deferred)."""
    return _ParallelLinear.apply(x, weight, bias, None, LOCAL)


def mark_sequence_parallel(*params: nn.Parameter | None) -> None:
    """Mark replicated parameters that see only this rank's part of the sequence."""
    for param in params:
        if param is not None:
            param.sequence_parallel = True


def sum_sequence_parallel_grads(params, group: Group) -> None:
    """Sum the gradients of parameters marked `sequence_parallel` over the TP group.

    Each TP rank's gradient covers only its part of the sequence, so the sum is the gradient of
    the whole sequence, the same on every rank. The gradients are flattened into one all-reduce.
    """
    grads = [p.grad for p in params if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if group.size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce(flat, group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


class ColumnParallelLinear(nn.Module):
    """Linear layer whose output features are split over the TP group.

    The input is replicated on every TP rank, or with `sequence_parallel` split along the
    sequence and all-gathered. Each rank computes its slice of the output for the whole sequence.
    With `gather_output` the slices are all-gathered into the full output. `blocks` > 1 splits
    fused weights block by block (see ShardSpec).
    """

    def __init__(self, in_features: int, out_features: int, group: Group, bias: bool = True,
                 gather_output: bool = False, blocks: int = 1, sequence_parallel: bool = False,
                 dtype=None, device=None):
        super().__init__()
        if out_features % (group.size * blocks) != 0:
            raise ValueError(
                f"out_features={out_features} must split into {blocks} block(s) over "
                f"tp={group.size} ranks; choose sizes divisible by {blocks * group.size}"
            )
        self.group = group
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        local_out = out_features // group.size
        self.weight = nn.Parameter(torch.empty(local_out, in_features, dtype=dtype, device=device))
        self.weight.tp_shard = ShardSpec(dim=0, blocks=blocks)
        if bias:
            self.bias = nn.Parameter(torch.empty(local_out, dtype=dtype, device=device))
            self.bias.tp_shard = ShardSpec(dim=0, blocks=blocks)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear_with_tp_input(x, self.weight, self.bias, self.group, self.sequence_parallel)
        if self.gather_output:
            y = comm.gather_last_dim(y, self.group)
        return y


class RowParallelLinear(nn.Module):
    """Linear layer whose input features are split over the TP group.

    The input arrives already split along its last dim, as a column-parallel layer outputs it.
    Each rank computes a partial sum of the output, the partial sums are all-reduced (the `g`
    operator), and the replicated bias is added once, after the reduction. With
    `sequence_parallel` the partial sums are reduce-scattered along the sequence instead, so each
    rank gets the sum for its slice of the sequence, and the bias is marked `sequence_parallel`.
    """

    def __init__(self, in_features: int, out_features: int, group: Group, bias: bool = True,
                 sequence_parallel: bool = False, dtype=None, device=None):
        super().__init__()
        if in_features % group.size != 0:
            raise ValueError(
                f"in_features={in_features} must be divisible by tp={group.size}"
            )
        self.group = group
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features // group.size, dtype=dtype, device=device)
        )
        self.weight.tp_shard = ShardSpec(dim=1)
        self.sequence_parallel = sequence_parallel
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
            if sequence_parallel and group.size > 1:
                mark_sequence_parallel(self.bias)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = linear(x, self.weight)
        if self.sequence_parallel:
            y = comm.reduce_scatter_along(partial, SEQUENCE_DIM, self.group)
        else:
            y = comm.reduce_from_tp(partial, self.group)
        if self.bias is not None:
            y = y + self.bias
        return y


# ----------------------------------------------------------------------------------------------
# Embedding


class _MaskedEmbeddingLookup(torch.autograd.Function):
    """Look up token ids in this rank's vocabulary rows; ids outside them give zero rows."""

    @staticmethod
    def forward(ctx, ids, weight, start):
        local = ids - start
        outside = (local < 0) | (local >= weight.shape[0])
        local = local.masked_fill(outside, 0)
        out = weight[local]
        out[outside] = 0
        ctx.save_for_backward(local, outside)
        ctx.weight_shape = weight.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        local, outside = ctx.saved_tensors
        grad_out = grad_out.masked_fill(outside.unsqueeze(-1), 0)
        grad_weight = grad_out.new_zeros(ctx.weight_shape)
        grad_weight.index_add_(0, local.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1]))
        return None, grad_weight, None


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose vocabulary rows are split over the TP group.

    The vocabulary is padded with zero rows up to a multiple of tp. Padding rows are never looked
    up (token ids stay below `num_embeddings`), so they never receive a gradient, and the LM head
    masks their logits, so they are never predicted. Each rank looks up the ids that fall in its
    rows and the partial embeddings are all-reduced, or with `sequence_parallel` reduce-scattered
    along the sequence, so that each rank gets its slice of the sequence.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Group,
                 sequence_parallel: bool = False, dtype=None, device=None):
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.num_embeddings = num_embeddings
        padded = padded_size(num_embeddings, group.size)
        self.rows_per_rank = padded // group.size
        self.vocab_start = group.rank * self.rows_per_rank
        self.weight = nn.Parameter(
            torch.empty(self.rows_per_rank, embedding_dim, dtype=dtype, device=device)
        )
        self.weight.tp_shard = ShardSpec(dim=0, full_size=num_embeddings)

    @property
    def padded_vocab_size(self) -> int:
        return self.rows_per_rank * self.group.size

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(ids, self.weight)
        partial = _MaskedEmbeddingLookup.apply(ids, self.weight, self.vocab_start)
        if self.sequence_parallel:
            return comm.reduce_scatter_along(partial, SEQUENCE_DIM, self.group)
        return comm.reduce_from_tp(partial, self.group)

    def local_vocab_mask(self) -> torch.Tensor | None:
        """Return a bool mask of this rank's rows that are padding, or None when there are none."""
        rows = torch.arange(self.vocab_start, self.vocab_start + self.rows_per_rank,
                            device=self.weight.device)
        padding = rows >= self.num_embeddings
        return padding if bool(padding.any()) else None
