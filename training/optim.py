"""AdamW, the learning-rate schedule, and gradient clipping by the global norm over all ranks."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from parallel import comm
from parallel.distributed_optimizer import DistributedOptimizer
from parallel.mesh import Group, Mesh
from training.config import TrainConfig


def parameter_groups(named_params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Return AdamW's parameter groups as in GPT-2 training: weight decay on matrices (weights
    and embeddings) only, none on biases and LayerNorm parameters."""
    return [
        {"params": [p for _, p in named_params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in named_params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], config: TrainConfig,
                    dp_group: Group | None = None):
    """AdamW over `parameter_groups`, in PyTorch's fused implementation: one kernel updates
    every tensor of a group. On CPU it steps about five times faster than the multi-tensor
    (foreach) path and twice as fast as the default loop over tensors, with the same update.

    With `config.distributed_optimizer` it is a DistributedOptimizer over `dp_group` (ZeRO-1),
    which moves the parameters into its flat buffers and owns the gradient buffer.
    """
    groups = parameter_groups(named_params, config.weight_decay)
    options = {"lr": config.lr, "betas": (config.beta1, config.beta2), "eps": config.eps, "fused": True}
    if config.distributed_optimizer:
        if dp_group is None:
            raise ValueError("the distributed optimizer needs the dp group")
        return DistributedOptimizer(groups, dp_group, torch.optim.AdamW,
                                    bucket_bytes=int(config.grad_bucket_mb * 2**20), **options)
    return torch.optim.AdamW(groups, **options)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then cosine decay to `min_lr` at the
    last step. `step` counts from 0."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))


def counted_once(name: str, param: nn.Parameter, mesh: Mesh, holds_first_stage: bool) -> bool:
    """Whether this rank's copy of `param` enters the global gradient norm.

    Each parameter of the model must count exactly once over the whole model-parallel group:
    a TP-split parameter counts on every TP rank (each has a different slice), a parameter
    replicated over TP counts on TP rank 0 only, and the tied embedding counts on the rank that
    holds the first stage, not again as the head's copy on the last stage.
    """
    if name == "transformer.wte.weight" and not holds_first_stage:
        return False
    if getattr(param, "tp_shard", None) is None and mesh.tp_rank != 0:
        return False
    return True


def global_grad_norm(named_params, mesh: Mesh, holds_first_stage: bool, optimizer=None) -> torch.Tensor:
    """Return the L2 norm of the gradient of the whole model, identical on every rank.

    Gradients are already averaged over dp, so the replicas agree and only the model-parallel
    group (tp x pp) takes part in the sum. With a DistributedOptimizer each dp rank has the
    averaged gradient of its shard only, so the sum runs over the shards and the dp group too.
    """
    counted = {id(p) for name, p in named_params if counted_once(name, p, mesh, holds_first_stage)}
    sharded = isinstance(optimizer, DistributedOptimizer)
    if sharded:
        grads = [grad for param, grad in optimizer.local_grads() if id(param) in counted]
    else:
        grads = [p.grad for _, p in named_params if id(p) in counted]
    # A ZeRO-1 shard may hold no gradient at all, so the device comes from the parameters.
    device = named_params[0][1].device if named_params else torch.device("cpu")
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for grad in grads:
        total += grad.detach().double().square().sum()
    comm.all_reduce(total, mesh.model)
    if sharded:
        comm.all_reduce(total, mesh.dp)
    return total.sqrt()[0]


def update_gradients(params, optimizer) -> list[torch.Tensor]:
    """Return the gradients that `optimizer.step()` reads on this rank (a shard with ZeRO-1)."""
    if isinstance(optimizer, DistributedOptimizer):
        return [grad for _, grad in optimizer.local_grads()]
    return [p.grad for p in params if p.grad is not None]


def clip_and_unscale(grads: list[torch.Tensor], norm: float, max_norm: float, loss_scale: float = 1.0) -> None:
    """Scale gradients so that their global norm is at most `max_norm` (0 turns clipping off).

    `norm` is the norm of the true gradients. The gradients themselves may still be multiplied
    by `loss_scale` (fp16 loss scaling), and this function divides it out in the same pass.
    """
    scale = 1.0 / loss_scale
    if max_norm > 0:
        scale *= min(1.0, max_norm / (norm + 1e-6))
    if scale != 1.0 and grads:
        torch._foreach_mul_(grads, scale)
