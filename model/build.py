"""Split GPT into pipeline stages, build this rank's chunks, and initialize them.

Initialization does not depend on the layout: every parameter's full tensor is drawn from a
generator seeded by (seed, global parameter name), and each rank keeps its TP slice of it. Any
layout thus starts from the same weights as the single-process model.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterator

import torch
import torch.nn as nn

from model.config import GPTConfig
from model.gpt import GPTChunk
from parallel.layers import full_shape, shard
from parallel.mesh import Group, Layout, Mesh


def partition_layers(n_layer: int, num_stages: int,
                     layers_per_stage: list[int] | None = None) -> list[range]:
    """Return the contiguous layer range of each stage.

    Without `layers_per_stage` the layers are split as evenly as possible and the earlier stages
    take the remainder, because the last stage also runs the LM head and the loss.
    """
    if layers_per_stage is None:
        base, extra = divmod(n_layer, num_stages)
        layers_per_stage = [base + (1 if i < extra else 0) for i in range(num_stages)]
    if len(layers_per_stage) != num_stages or sum(layers_per_stage) != n_layer:
        raise ValueError(
            f"layers_per_stage={layers_per_stage} must list {num_stages} stage sizes that add up "
            f"to n_layer={n_layer}"
        )
    if min(layers_per_stage) < 0:
        raise ValueError(f"layers_per_stage={layers_per_stage} must not be negative")
    ranges, start = [], 0
    for count in layers_per_stage:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def build_chunks(config: GPTConfig, tp_group: Group, stages: list[int], layer_ranges: list[range],
                 dtype=None, device=None, **memory_options) -> dict[int, GPTChunk]:
    """Build the chunks of the given stages for one rank, sharing the embedding between them.

    The first stage embeds tokens and the last runs the head; both use the token embedding, so a
    rank that runs both (pp=1, or a V-shaped placement) keeps one copy. `memory_options`
    (sequence_parallel, recompute, recompute_layers) go to every GPTChunk.
    """
    num_stages = len(layer_ranges)
    chunks: dict[int, GPTChunk] = {}
    wte = None
    for stage in stages:
        chunk = GPTChunk(config, tp_group, layer_ranges[stage], first=stage == 0,
                         last=stage == num_stages - 1, wte=wte, dtype=dtype, device=device,
                         **memory_options)
        if hasattr(chunk.transformer, "wte"):
            wte = chunk.transformer.wte
        chunks[stage] = chunk
    return chunks


def named_parameters(chunks: dict[int, nn.Module]) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield (global name, parameter) for every parameter of the chunks, each parameter once."""
    seen = set()
    for stage in sorted(chunks):
        for name, param in chunks[stage].named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                yield name, param


def _seed_for(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode())


def full_init(name: str, shape: tuple[int, ...], config: GPTConfig, seed: int) -> torch.Tensor:
    """Return the initial full tensor of the parameter `name` (GPT-2's initialization)."""
    leaf = name.rsplit(".", 2)
    module, kind = leaf[-2], leaf[-1]
    if module.startswith("ln_"):
        return torch.ones(shape) if kind == "weight" else torch.zeros(shape)
    if kind == "bias":
        return torch.zeros(shape)
    std = config.initializer_range
    if module == "c_proj":
        # Residual-branch outputs are scaled down by the number of residual additions (GPT-2).
        std /= math.sqrt(2 * config.n_layer)
    generator = torch.Generator().manual_seed(_seed_for(seed, name))
    return torch.normal(0.0, std, size=shape, generator=generator)


@torch.no_grad()
def initialize(chunks: dict[int, nn.Module], config: GPTConfig, seed: int, tp_group: Group) -> None:
    """Set every parameter to its TP slice of the layout-independent initial tensor."""
    for name, param in named_parameters(chunks):
        full = full_init(name, full_shape(param, tp_group.size), config, seed)
        spec = getattr(param, "tp_shard", None)
        param.copy_(shard(full, spec, tp_group.rank, tp_group.size))


def full_parameter_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Return {global name: full shape} of every parameter of the single-process model."""
    tp_group = Mesh(Layout(), 0).tp
    chunks = build_chunks(config, tp_group, [0], partition_layers(config.n_layer, 1), device="meta")
    return {name: tuple(param.shape) for name, param in named_parameters(chunks)}
