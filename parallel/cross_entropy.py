"""Cross-entropy over logits whose vocabulary is split across the TP group.

No rank ever holds the full logits. With z the logits of one token, t its target and z_j split
into slices over the ranks, the loss is

    loss = log(sum_j exp(z_j - M)) - (z_t - M),   M = max_j z_j

and each term is a local reduction followed by an all-reduce over the TP group:

    1. M: the local max, all-reduced with MAX (it only keeps exp() in range);
    2. z_t - M: taken on the rank that owns t, zero elsewhere, all-reduced with SUM;
    3. sum_j exp(z_j - M): the local sum, all-reduced with SUM (in the same all-reduce as step 2).

The gradient with respect to the logits is softmax(z) - onehot(t), which each rank computes for
its own slice from the saved softmax.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel import comm
from parallel.mesh import Group


def _global_max(logits: torch.Tensor, group: Group) -> torch.Tensor:
    logits_max = logits.max(dim=-1).values
    comm.all_reduce(logits_max, group, op=dist.ReduceOp.MAX)
    return logits_max


def _target_logit(shifted: torch.Tensor, targets: torch.Tensor, vocab_start: int):
    """Return the shifted logit of each target on the rank that owns it (zero elsewhere),
    the local target index, and the mask of targets that another rank owns."""
    local = targets - vocab_start
    outside = (local < 0) | (local >= shifted.shape[-1])
    local = local.masked_fill(outside, 0)
    picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(outside, 0.0), local, outside


class _VocabParallelCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start):
        shifted = logits - _global_max(logits, group).unsqueeze(-1)
        target_logit, local_targets, outside = _target_logit(shifted, targets, vocab_start)

        exp = shifted.exp()
        sums = torch.stack([target_logit, exp.sum(dim=-1)])
        comm.all_reduce(sums, group)
        target_logit, sum_exp = sums[0], sums[1]

        loss = sum_exp.log() - target_logit
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_targets, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_targets, outside = ctx.saved_tensors
        # The softmax is not needed after this, so the gradient is built in its storage.
        grad = softmax
        owned = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_targets.unsqueeze(-1), -owned)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group: Group,
                                 vocab_start: int) -> torch.Tensor:
    """Return the per-token loss (same shape as `targets`) for logits split over `group`.

    logits: (..., V / tp), this rank's vocabulary slice starting at id `vocab_start`. Padding
        columns must already be -inf.
    targets: (...), global token ids.
    """
    return _VocabParallelCrossEntropy.apply(logits, targets, group, vocab_start)
