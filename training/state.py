"""Move model and optimizer state between this rank's slices and full, layout-free tensors.

Full tensors are keyed by the global names of the single-process model. Gathering joins TP slices
with their ShardSpec and collects the pipeline stages on global rank 0; scattering cuts each rank's
slice out of the full tensors. Data-parallel replicas are identical, so only dp rank 0 takes part
in the gather, except that a distributed optimizer (ZeRO-1) first all-gathers its state shards
over dp.

The random-generator states of each rank (torch CPU and CUDA, numpy's global generator, Python's
`random`) are gathered too, so that a resumed run continues every stream where it stopped.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from parallel import comm
from parallel.distributed_optimizer import DistributedOptimizer
from parallel.layers import full_shape, shard, unshard
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


def _check_full_tensors(named_params, full: dict, mesh: Mesh, suffixes: tuple[str, ...]) -> None:
    """Raise KeyError or ValueError when `full` lacks a tensor or has one of the wrong shape."""
    missing, wrong = [], []
    for name, param in named_params:
        expected = full_shape(param, mesh.tp.size)
        for suffix in suffixes:
            key = name + suffix
            if key not in full:
                missing.append(key)
            elif tuple(full[key].shape) != expected:
                wrong.append(f"{key}: {tuple(full[key].shape)} instead of {expected}")
    if missing:
        raise KeyError(f"state has no tensor for {len(missing)} key(s), such as {missing[:5]}")
    if wrong:
        raise ValueError(f"state has {len(wrong)} tensor(s) of the wrong shape: {wrong[:5]}")


@torch.no_grad()
def load_model(named_params, full: dict, mesh: Mesh) -> None:
    """Copy this rank's slice of each full tensor into the parameters."""
    _check_full_tensors(named_params, full, mesh, ("",))
    for name, param in named_params:
        spec = getattr(param, "tp_shard", None)
        param.copy_(shard(full[name], spec, mesh.tp.rank, mesh.tp.size))


@torch.no_grad()
def load_optimizer(optimizer, named_params, full: dict, mesh: Mesh) -> None:
    """Set AdamW's state from full tensors, slicing each like its parameter.

    `optimizer` is a torch AdamW or a DistributedOptimizer, which keeps only its shard.
    """
    if "step" not in full:
        raise KeyError("optimizer state has no 'step' entry")
    _check_full_tensors(named_params, full, mesh, tuple(f".{key}" for key in OPTIMIZER_STATE_KEYS))
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


# ----------------------------------------------------------------------------------------------
# Random-generator states


def capture_rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """Return this process's random-generator states as tensors (loadable without pickle)."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    _, keys, position, has_gauss, gauss = np.random.get_state()
    states["numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
    states["numpy.position"] = torch.tensor([position, has_gauss], dtype=torch.int64)
    states["numpy.gauss"] = torch.tensor(gauss, dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    states["python.internal"] = torch.tensor(internal, dtype=torch.int64)
    states["python.version"] = torch.tensor(version, dtype=torch.int64)
    if gauss_next is not None:
        states["python.gauss"] = torch.tensor(gauss_next, dtype=torch.float64)
    return states


def restore_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    """Set this process's random generators to states from `capture_rng_states`."""
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
    position, has_gauss = (int(v) for v in states["numpy.position"])
    np.random.set_state(("MT19937", states["numpy.keys"].numpy().astype(np.uint32), position,
                         has_gauss, float(states["numpy.gauss"])))
    gauss = float(states["python.gauss"]) if "python.gauss" in states else None
    random.setstate((int(states["python.version"]),
                     tuple(int(v) for v in states["python.internal"]), gauss))


def gather_rng_states(mesh: Mesh, device: torch.device) -> dict | None:
    """Return {"rank<r>.<generator>": state} of every rank of the job on global rank 0, None on
    other ranks. Every rank of the job must call it."""
    local = capture_rng_states(device)
    if mesh.layout.world_size == 1:
        return {f"rank0.{key}": value for key, value in local.items()}
    parts = [None] * mesh.layout.world_size if mesh.rank == 0 else None
    dist.gather_object(local, parts, dst=0)  # over the default group: every rank of the job
    if mesh.rank != 0:
        return None
    return {f"rank{rank}.{key}": value for rank, part in enumerate(parts) for key, value in part.items()}


def rank_rng_states(full: dict, rank: int) -> dict | None:
    """Return the states that global rank `rank` saved, or None when it saved none."""
    prefix = f"rank{rank}."
    states = {key[len(prefix):]: value for key, value in full.items() if key.startswith(prefix)}
    return states or None
