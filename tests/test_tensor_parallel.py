"""Tensor-parallel ops and layers on real gloo ranks, against their single-process definitions.

Each rank builds the full tensors from a fixed seed, runs the parallel version on its slices, and
reports the largest difference from the full computation for every check.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallel import comm
from parallel.cross_entropy import vocab_parallel_cross_entropy
from parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, shard
from parallel.mesh import Layout, Mesh
from tests.helpers import run_job

DTYPE = torch.float64


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _conjugate_ops(group, rank, size) -> dict:
    checks = {}
    x = torch.randn(3, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    weights = [torch.full((3, 8), float(r + 1), dtype=DTYPE) for r in range(size)]

    # copy_to_tp: identity forward, all-reduce backward.
    leaf = x.clone().requires_grad_()
    out = comm.copy_to_tp(leaf, group)
    (out * weights[rank]).sum().backward()
    checks["copy forward is identity"] = _max_diff(out.detach(), x)
    checks["copy backward all-reduces"] = _max_diff(leaf.grad, sum(weights))

    # reduce_from_tp: all-reduce forward, identity backward.
    leaf = (x * (rank + 1)).detach().requires_grad_()
    out = comm.reduce_from_tp(leaf, group)
    (out * weights[rank]).sum().backward()
    checks["reduce forward all-reduces"] = _max_diff(out.detach(), x * sum(range(1, size + 1)))
    checks["reduce backward is identity"] = _max_diff(leaf.grad, weights[rank])

    # split / gather along the last dim are each other's backward.
    leaf = x.clone().requires_grad_()
    part = comm.split_last_dim(leaf, group)
    gathered = comm.gather_last_dim(part, group)
    (gathered * weights[0]).sum().backward()
    checks["split keeps own slice"] = _max_diff(part.detach(), x.chunk(size, -1)[rank])
    checks["gather restores full"] = _max_diff(gathered.detach(), x)
    checks["split-gather backward"] = _max_diff(leaf.grad, weights[0])
    return checks


def _linear_layers(group, rank, size) -> dict:
    checks = {}
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 8, dtype=DTYPE, generator=g)
    w1, b1 = torch.randn(12, 8, dtype=DTYPE, generator=g), torch.randn(12, dtype=DTYPE, generator=g)
    w2, b2 = torch.randn(8, 12, dtype=DTYPE, generator=g), torch.randn(8, dtype=DTYPE, generator=g)

    # Full reference: two linear layers, column then row.
    ref = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    ref_out = F.linear(F.gelu(F.linear(ref[0], ref[1], ref[2])), ref[3], ref[4])
    ref_out.square().sum().backward()

    column = ColumnParallelLinear(8, 12, group, dtype=DTYPE)
    row = RowParallelLinear(12, 8, group, dtype=DTYPE)
    with torch.no_grad():
        column.weight.copy_(shard(w1, column.weight.tp_shard, rank, size))
        column.bias.copy_(shard(b1, column.bias.tp_shard, rank, size))
        row.weight.copy_(shard(w2, row.weight.tp_shard, rank, size))
        row.bias.copy_(b2)
    leaf = x.clone().requires_grad_()
    out = row(F.gelu(column(leaf)))
    out.square().sum().backward()

    checks["column-row forward"] = _max_diff(out.detach(), ref_out.detach())
    checks["input grad"] = _max_diff(leaf.grad, ref[0].grad)
    checks["column weight grad"] = _max_diff(column.weight.grad, shard(ref[1].grad, column.weight.tp_shard, rank, size))
    checks["column bias grad"] = _max_diff(column.bias.grad, shard(ref[2].grad, column.bias.tp_shard, rank, size))
    checks["row weight grad"] = _max_diff(row.weight.grad, shard(ref[3].grad, row.weight.tp_shard, rank, size))
    checks["row bias grad"] = _max_diff(row.bias.grad, ref[4].grad)

    gathering = ColumnParallelLinear(8, 12, group, gather_output=True, dtype=DTYPE)
    with torch.no_grad():
        gathering.weight.copy_(shard(w1, gathering.weight.tp_shard, rank, size))
        gathering.bias.copy_(shard(b1, gathering.bias.tp_shard, rank, size))
    checks["gathered column output"] = _max_diff(gathering(x).detach(), F.linear(x, w1, b1))
    return checks


def _vocab_parallel(group, rank, size) -> dict:
    checks = {}
    vocab, hidden = 61, 6  # 61 is prime: every tp > 1 pads the vocabulary
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(vocab, hidden, dtype=DTYPE, generator=g)
    ids = torch.randint(0, vocab, (3, 7), generator=g)
    targets = torch.randint(0, vocab, (3, 7), generator=g)
    targets[0, 0], targets[0, 1] = 0, vocab - 1  # targets on the first and the last rank

    ref_weight = weight.clone().requires_grad_()
    ref_hidden = F.embedding(ids, ref_weight)
    ref_logits = ref_hidden @ ref_weight.T
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, vocab), targets.reshape(-1), reduction="none")
    ref_loss.sum().backward()

    embedding = VocabParallelEmbedding(vocab, hidden, group, dtype=DTYPE)
    with torch.no_grad():
        embedding.weight.copy_(shard(weight, embedding.weight.tp_shard, rank, size))
    hidden_states = embedding(ids)
    logits = comm.copy_to_tp(hidden_states, group) @ embedding.weight.T
    padding = embedding.local_vocab_mask()
    if padding is not None:
        logits = logits.masked_fill(padding, float("-inf"))
    loss = vocab_parallel_cross_entropy(logits, targets, group, embedding.vocab_start)
    loss.sum().backward()

    checks["embedding forward"] = _max_diff(hidden_states.detach(), ref_hidden.detach())
    checks["cross-entropy per token"] = _max_diff(loss.detach(), ref_loss.detach().view(3, 7))
    expected_grad = shard(ref_weight.grad, embedding.weight.tp_shard, rank, size)
    checks["tied embedding grad"] = _max_diff(embedding.weight.grad, expected_grad)
    rows_per_rank = embedding.rows_per_rank
    real_rows = max(0, min(rows_per_rank, vocab - rank * rows_per_rank))
    pad_grad = embedding.weight.grad[real_rows:]
    checks["padding rows get no gradient"] = pad_grad.abs().max().item() if pad_grad.numel() else 0.0
    local_logits = logits.detach()
    if padding is not None:
        checks["padding never predicted"] = float(torch.isfinite(local_logits[..., padding]).any())
    return checks


def _tp_ops_job(rank, world_size):
    torch.manual_seed(0)
    mesh = Mesh(Layout(tp=world_size), rank)
    group = mesh.tp
    checks = {}
    for part in (_conjugate_ops, _linear_layers, _vocab_parallel):
        checks.update(part(group, rank, world_size))
    return checks


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_ops_match_single_process(tp):
    results = run_job(_tp_ops_job, Layout(tp=tp))
    for rank, checks in enumerate(results):
        for name, diff in checks.items():
            assert diff < 1e-10, f"tp={tp} rank {rank}: {name} differs by {diff}"


def test_same_ops_in_one_process():
    checks = _tp_ops_job(0, 1)
    for name, diff in checks.items():
        assert diff < 1e-10, f"{name} differs by {diff}"
