"""Cross-entropy over logits whose vocabulary is split across the TP group.

No rank ever holds the full logits. With z the logits of one token, t its target and z_j split
into slices over the ranks r, the loss is

    loss = L - z_t,   L = log(sum_j exp(z_j)) = log(sum_r exp(L_r)),

where L_r is the log-sum-exp of rank r's slice. Each rank computes its slice's log-softmax
z_j - L_r in one fused kernel and reads L_r off it (the largest z_j less the largest z_j - L_r,
both exact to float rounding). Two all-reduces over the TP group then give L:

    1. M = max_r L_r, with MAX (it only keeps exp() in range);
    2. sum_r exp(L_r - M), with SUM, in the same all-reduce as z_t, which the rank that owns t
       contributes and the others contribute as zero.

The gradient with respect to the logits is softmax(z) - onehot(t). Each rank keeps its slice's
log-softmax and turns it into exp(z_j - L) = exp((z_j - L_r) + (L_r - L)) in place in backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel import comm
from parallel.mesh import Group


def _target_logit(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int):
    """Return the logit of each target on the rank that owns it (zero elsewhere),
    the local target index, and the mask of targets that another rank owns."""
    local = targets - vocab_start
    outside = (local < 0) | (local >= logits.shape[-1])
    local = local.masked_fill(outside, 0)
    picked = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(outside, 0.0), local, outside


def _global_log_sum_exp(local_lse: torch.Tensor, target_logit: torch.Tensor, group: Group):
    """Return log(sum_r exp(L_r)) over the group and the target logits summed over the group."""
    if group.size == 1:
        return local_lse, target_logit
    top = local_lse.clone()
    comm.all_reduce(top, group, op=dist.ReduceOp.MAX)
    sums = torch.stack([target_logit, (local_lse - top).exp()])
    comm.all_reduce(sums, group)
    return top + sums[1].log(), sums[0]


class _VocabParallelCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start):
        log_softmax = torch.log_softmax(logits, dim=-1)
        local_lse = logits.amax(dim=-1) - log_softmax.amax(dim=-1)
        target_logit, local_targets, outside = _target_logit(logits, targets, vocab_start)
        lse, target_logit = _global_log_sum_exp(local_lse, target_logit, group)
        ctx.save_for_backward(log_softmax, local_lse - lse, local_targets, outside)
        ctx.split = group.size > 1
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        log_softmax, lse_gap, local_targets, outside = ctx.saved_tensors
        # The log-softmax is not needed after this, so the gradient is built in its storage.
        grad = log_softmax
        if ctx.split:  # with one rank, L_r - L is zero
            grad.add_(lse_gap.unsqueeze(-1))
        grad.exp_()
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
