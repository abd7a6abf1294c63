"""Move model and optimizer state between this rank's slices and full, layout-free tensors.

Full tensors are keyed by the global names of the single-process model. Gathering joins TP slices
with their ShardSpec and collects the pipeline stages on global rank 0; scattering cuts each rank's
slice out of the full tensors. Data-parallel replicas are identical, so only dp rank 0 takes part
in the gather.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel import comm
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


def gather_optimizer(optimizer: torch.optim.Optimizer, named_params, mesh: Mesh) -> dict | None:
    """Return {"<name>.<state>": full tensor, "step": step} for AdamW, on global rank 0."""
    local = {}
    step = 0
    for name, param in named_params:
        state = optimizer.state.get(param, {})
        spec = getattr(param, "tp_shard", None)
        for key in OPTIMIZER_STATE_KEYS:
            value = state.get(key, torch.zeros_like(param))
            local[f"{name}.{key}"] = _tp_gather(value, spec, mesh).cpu()
        if "step" in state:
            step = int(state["step"])
    local["step"] = torch.tensor(step)
    return _collect_on_rank0(local, mesh)


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
def load_optimizer(optimizer: torch.optim.Optimizer, named_params, full: dict, mesh: Mesh) -> None:
    """Set AdamW's state from full tensors, slicing each like its parameter."""
    step = int(full["step"])
    for name, param in named_params:
        spec = getattr(param, "tp_shard", None)
        state = optimizer.state[param]
        for key in OPTIMIZER_STATE_KEYS:
            state[key] = shard(full[f"{name}.{key}"], spec, mesh.tp.rank, mesh.tp.size).to(
                device=param.device, dtype=param.dtype).clone()
        state["step"] = torch.tensor(float(step))
