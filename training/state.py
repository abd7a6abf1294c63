"""Move model and optimizer state between this rank's slices and full, layout-free tensors.

Full tensors are keyed by the global names of the single-process model. Gathering joins TP slices
with their ShardSpec and collects the pipeline stages on global rank 0; scattering cuts each rank's
slice out of the full tensors. Data-parallel replicas are identical, so only dp rank 0 takes part
in the gather, except that a distributed optimizer (ZeRO-1) first all-gathers its state shards
over dp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel import comm
from parallel.distributed_optimizer import DistributedOptimizer
from parallel.layers import shard, unshard
from parallel.mesh import Mesh

OPTIMIZER_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _tp_gather(tensor: torch.Tensor, spec, mesh: Mesh) -> torch.Tensor:
    if mesh.tp.size == 1:
        return unshard([tensor.detach()], spec).clone()
    flat = tensor.detach().contiguous().view(-1)
    gathered = torch.empty(mesh.tp.size * flat.numel(), dtype=flat.dtype, device=flat.device)
    comm.all_gather_into(gathered, flat, mesh.tp)
    slices = [s.view_as(tensor) for s in gathered.chunk(mesh.tp.size)]
    return unshard(slices, spec)


def _collect_on_rank0(local: dict, mesh: Mesh) -> dict | None:
    """Merge the per-stage dicts of the dp-0, tp-0 ranks into one dict on global rank 0."""
    if mesh.dp_rank != 0 or mesh.tp_rank != 0:
        return None
    if mesh.pp.size == 1:
        return local
    parts = [None] * mesh.pp.size if mesh.pp_rank == 0 else None
    dist.gather_object(local, parts, dst=mesh.pp.global_rank(0), group=mesh.pp.pg)
    if mesh.pp_rank != 0:
        return None
    merged = {}
    for part in reversed(parts):  # the first stage's copy of the tied embedding wins
        merged.update(part)
    return merged


def gather_model(named_params: list[tuple[str, nn.Parameter]], mesh: Mesh) -> dict | None:
    """Return {global name: full CPU tensor} on global rank 0, None on other ranks."""
    local = {}
    for name, param in named_params:
        full = _tp_gather(param, getattr(param, "tp_shard", None), mesh)
        local[name] = full.cpu()
    return _collect_on_rank0(local, mesh)


def gather_gradients(named_params: list[tuple[str, nn.Parameter]], mesh: Mesh) -> dict | None:
    """Return {global name: full CPU gradient} on global rank 0, None on other ranks."""
    local = {}
    for name, param in named_params:
        full = _tp_gather(param.grad, getattr(param, "tp_shard", None), mesh)
        local[name] = full.cpu()
    return _collect_on_rank0(local, mesh)


def gather_optimizer(optimizer, named_params, mesh: Mesh) -> dict | None:
    """Return {"<name>.<state>": full tensor, "step": step} for AdamW, on global rank 0.

    `optimizer` is a torch AdamW or a DistributedOptimizer running AdamW.
    """
    states, step = _local_param_states(optimizer, named_params)
    local = {}
    for name, param in named_params:
        spec = getattr(param, "tp_shard", None)
        for key in OPTIMIZER_STATE_KEYS:
            local[f"{name}.{key}"] = _tp_gather(states[name][key], spec, mesh).cpu()
    local["step"] = torch.tensor(step)
    return _collect_on_rank0(local, mesh)


def _local_param_states(optimizer, named_params) -> tuple[dict, int]:
    """Return ({name: {key: this rank's TP slice of the state}}, step)."""
    if isinstance(optimizer, DistributedOptimizer):
        by_id, step = optimizer.gather_param_states(OPTIMIZER_STATE_KEYS)
        return {name: by_id[id(param)] for name, param in named_params}, step
    states, step = {}, 0
    for name, param in named_params:
        state = optimizer.state.get(param, {})
        states[name] = {key: state.get(key, torch.zeros_like(param)) for key in OPTIMIZER_STATE_KEYS}
        if "step" in state:
            step = int(state["step"])
    return states, step


@torch.no_grad()
def load_model(named_params, full: dict, mesh: Mesh) -> None:
    """Copy this rank's slice of each full tensor into the parameters."""
    missing = [name for name, _ in named_params if name not in full]
    if missing:
        raise KeyError(f"state has no tensor for parameter(s) {missing[:5]}")
    for name, param in named_params:
        spec = getattr(param, "tp_shard", None)
        param.copy_(shard(full[name], spec, mesh.tp.rank, mesh.tp.size))


@torch.no_grad()
def load_optimizer(optimizer, named_params, full: dict, mesh: Mesh) -> None:
    """Set AdamW's state from full tensors, slicing each like its parameter.

    `optimizer` is a torch AdamW or a DistributedOptimizer, which keeps only its shard.
    """
    step = int(full["step"])
    sliced = {}
    for name, param in named_params:
        spec = getattr(param, "tp_shard", None)
        sliced[id(param)] = {
            key: shard(full[f"{name}.{key}"], spec, mesh.tp.rank, mesh.tp.size).to(
                device=param.device, dtype=param.dtype).clone()
            for key in OPTIMIZER_STATE_KEYS
        }
    if isinstance(optimizer, DistributedOptimizer):
        optimizer.load_param_states(sliced, step)
        return
    for name, param in named_params:
        state = optimizer.state[param]
        state.update(sliced[id(param)])
        state["step"] = torch.tensor(float(step))
