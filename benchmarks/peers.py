"""The PyTorch peers: the workload trained with PyTorch's own tools, one job per point.

  torch: plain PyTorch in one process, with gradient accumulation over the micro-batches.
  torch-pipelining: torch.distributed.pipelining with one of its schedules (PIPELINING_SCHEDULES).
  torch-tp: torch.distributed.tensor.parallel, with ColwiseParallel and RowwiseParallel on the
    linear layers of every block, over a one-axis DeviceMesh.

Each step does what microtron's step does: the micro-batches' forward and backward, the tied
embedding's gradients summed where it has two copies, the global gradient norm, clipping, and
AdamW with microtron's parameter groups and learning-rate schedule. Every job returns the losses
of every step, so the runner can check them against microtron's before it reports a time.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from benchmarks.peer_model import PeerGPT, load_full_weights, token_loss_sum
from benchmarks.workload import Workload, batches, full_weights, peak_memory_mib, reset_peak_memory, run_steps
from model.build import partition_layers
from training.optim import learning_rate, parameter_groups

# name -> (class name in torch.distributed.pipelining, stages per rank, placement)
PIPELINING_SCHEDULES = {
    "gpipe": ("ScheduleGPipe", 1, "loop"),
    "1f1b": ("Schedule1F1B", 1, "loop"),
    "interleaved-1f1b": ("ScheduleInterleaved1F1B", 2, "loop"),
    "interleaved-zb": ("ScheduleInterleavedZeroBubble", 2, "loop"),
    "zb-v": ("ScheduleZBVZeroBubble", 2, "v"),
    "dualpipev": ("ScheduleDualPipeV", 2, "v"),
}

CPU = torch.device("cpu")


class _Step:
    """The optimizer half of a step, shared by the peers: clip by a global norm, then AdamW."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], workload: Workload):
        self.config = workload.run_config().train
        self.params = [p for _, p in named_params]
        self.optimizer = _adamw(named_params, self.config)

    def finish(self, index: int, squared_norm: torch.Tensor) -> None:
        norm = float(squared_norm.sqrt())
        if self.config.grad_clip > 0 and norm > 0:
            scale = self.config.grad_clip / (norm + 1e-6)
            if scale < 1.0:
                for param in self.params:
                    if param.grad is not None:
                        param.grad.mul_(scale)
        lr = learning_rate(index, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _adamw(named_params, config) -> torch.optim.AdamW:
    """AdamW as a PyTorch user writes it: microtron's parameter groups and hyperparameters, and
    PyTorch's default choice of implementation (on CPU, a loop over the tensors). microtron's own
    trainer uses the fused implementation, which is the same update computed faster."""
    return torch.optim.AdamW(parameter_groups(named_params, config.weight_decay), lr=config.lr,
                             betas=(config.beta1, config.beta2), eps=config.eps)


def _is_dtensor(tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def _squared_sum(tensors) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for tensor in tensors:
        total += tensor.detach().double().square().sum()
    return total


def _result(seconds, cpu_seconds, losses, memory) -> dict:
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "losses": losses,
            "peak_memory_mib": memory}


# ----------------------------------------------------------------------------------------------
# Plain PyTorch in one process


def _accumulate_gradients(model, inputs, targets, micro_batches: int, scale: float) -> float:
    """Run forward and backward over `micro_batches` equal slices of the batch, accumulating
    gradients; return the summed, scaled loss."""
    total = 0.0
    for ids, tgt in zip(inputs.chunk(micro_batches), targets.chunk(micro_batches)):
        loss = token_loss_sum(model(ids), tgt, scale)
        loss.backward()
        total += loss.item()
    return total


def torch_job(rank: int, world_size: int, point: dict, workload_dict: dict) -> dict:
    workload = Workload.from_dict(workload_dict)
    config = workload.run_config(micro_batches=point.get("micro_batches"))
    model = PeerGPT(workload.model, range(workload.model.n_layer))
    load_full_weights(model, full_weights(workload))
    optimizer = _Step(list(model.named_parameters()), workload)
    data = batches(config)
    m = config.layout.micro_batches
    scale = 1.0 / (workload.global_batch * workload.seq_len)
    losses = []

    def step(index: int) -> None:
        inputs, targets = data.train_batch(index, workload.global_batch)
        total = _accumulate_gradients(model, inputs, targets, m, scale)
        optimizer.finish(index, _squared_sum(p.grad for p in model.parameters()))
        losses.append(total)

    reset_peak_memory(CPU)
    seconds, cpu_seconds = run_steps(step, workload)
    return _result(seconds, cpu_seconds, losses, peak_memory_mib(CPU))


# ----------------------------------------------------------------------------------------------
# torch.distributed.pipelining


def _stage_ids(placement: str, rank: int, num_ranks: int, per_rank: int) -> list[int]:
    if placement == "v":
        return [rank, 2 * num_ranks - 1 - rank]
    return [rank + i * num_ranks for i in range(per_rank)]


def pipelining_job(rank: int, world_size: int, point: dict, workload_dict: dict) -> dict:
    from torch.distributed import pipelining

    workload = Workload.from_dict(workload_dict)
    config = workload.run_config(micro_batches=point.get("micro_batches"))
    class_name, per_rank, placement = PIPELINING_SCHEDULES[point["schedule"]]
    num_stages = world_size * per_rank
    layer_ranges = partition_layers(workload.model.n_layer, num_stages, point.get("layers_per_stage"))
    owners = [0] * num_stages
    for r in range(world_size):
        for s in _stage_ids(placement, r, world_size, per_rank):
            owners[s] = r
    my_stages = sorted(_stage_ids(placement, rank, world_size, per_rank))
    last = num_stages - 1

    full = full_weights(workload)
    modules, wte = {}, None
    for s in my_stages:
        module = PeerGPT(workload.model, layer_ranges[s], first=s == 0, last=s == last, wte=wte)
        load_full_weights(module, full)
        if s in (0, last):
            wte = module.transformer.wte
        modules[s] = module
    stages = [pipelining.PipelineStage(modules[s], s, num_stages, CPU) for s in my_stages]

    scale = 1.0 / (workload.global_batch * workload.seq_len)
    schedule_class = getattr(pipelining, class_name)
    schedule = schedule_class(stages if per_rank > 1 else stages[0],
                              n_microbatches=config.layout.micro_batches,
                              loss_fn=lambda logits, targets: token_loss_sum(logits, targets, scale),
                              scale_grads=False)

    # The tied embedding has a copy on the first and on the last stage's rank.
    tied_ranks = sorted({owners[0], owners[last]})
    tied_group = dist.new_group(tied_ranks) if len(tied_ranks) > 1 else None
    named = _unique_named_parameters(modules)
    optimizer = _Step(named, workload)
    counted = [p for name, p in named if not (name == "transformer.wte.weight" and 0 not in modules)]
    data = batches(config)
    losses = []

    def step(index: int) -> None:
        inputs, targets = data.train_batch(index, workload.global_batch)
        micro_losses = []
        args = (inputs,) if 0 in modules else ()
        kwargs = {"target": targets, "losses": micro_losses} if last in modules else {}
        schedule.step(*args, **kwargs)
        if tied_group is not None and rank in tied_ranks:
            dist.all_reduce(wte.weight.grad, group=tied_group)
        squared = _squared_sum(p.grad for p in counted if p.grad is not None)
        dist.all_reduce(squared)
        optimizer.finish(index, squared)
        loss = torch.tensor(sum(x.item() for x in micro_losses), dtype=torch.float64)
        dist.all_reduce(loss)
        losses.append(float(loss))

    reset_peak_memory(CPU)
    seconds, cpu_seconds = run_steps(step, workload)
    return _result(seconds, cpu_seconds, losses, peak_memory_mib(CPU))


def _unique_named_parameters(modules: dict[int, nn.Module]) -> list[tuple[str, nn.Parameter]]:
    seen, named = set(), []
    for s in sorted(modules):
        for name, param in modules[s].named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                named.append((name, param))
    return named


# ----------------------------------------------------------------------------------------------
# torch.distributed.tensor.parallel


def tensor_parallel_job(rank: int, world_size: int, point: dict, workload_dict: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    workload = Workload.from_dict(workload_dict)
    config = workload.run_config(micro_batches=point.get("micro_batches"))
    mesh = init_device_mesh("cpu", (world_size,))
    model = PeerGPT(workload.model, range(workload.model.n_layer))
    load_full_weights(model, full_weights(workload), head_groups=world_size)
    # NOTE: the embeddings and the tied LM head stay replicated, so every rank computes the
    # whole head; the blocks are what this peer splits.
    plan = {"attn.c_attn": ColwiseParallel(), "attn.c_proj": RowwiseParallel(),
            "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()}
    for block in model.transformer.h.values():
        parallelize_module(block, mesh, plan)

    named = list(model.named_parameters())
    optimizer = _Step(named, workload)
    data = batches(config)
    m = config.layout.micro_batches
    scale = 1.0 / (workload.global_batch * workload.seq_len)
    losses = []

    def step(index: int) -> None:
        inputs, targets = data.train_batch(index, workload.global_batch)
        total = _accumulate_gradients(model, inputs, targets, m, scale)
        optimizer.finish(index, _tensor_parallel_squared_norm(named))
        losses.append(total)

    reset_peak_memory(CPU)
    seconds, cpu_seconds = run_steps(step, workload)
    return _result(seconds, cpu_seconds, losses, peak_memory_mib(CPU))


def _tensor_parallel_squared_norm(named) -> torch.Tensor:
    """Return the squared gradient norm of the whole model: split gradients summed over the
    ranks, replicated ones counted once."""
    split, replicated = [], []
    for _, param in named:
        grad = param.grad
        if _is_dtensor(grad):
            if any(placement.is_shard() for placement in grad.placements):
                split.append(grad.to_local())
            else:
                replicated.append(grad.to_local())
        elif grad is not None:
            replicated.append(grad)
    squared = _squared_sum(split)
    dist.all_reduce(squared)
    return squared + _squared_sum(replicated)


JOBS = {
    "torch": torch_job,
    "torch-pipelining": pipelining_job,
    "torch-tp": tensor_parallel_job,
}
