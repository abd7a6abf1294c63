"""Dropout whose mask does not depend on the layout.

A random generator gives each rank a different stream, so a mask drawn from it changes when the
same tensor is split differently over ranks. Replicated activations (after a row-parallel
all-reduce) would also need generators kept in step across the TP group. Here the keep/drop decision
of an element is a hash of a key and the element's index in the *global* tensor (the whole global
batch, all heads, the full sequence). Any layout, recomputation or device therefore draws the
same mask, and there is no generator state to save or synchronise.

The hash is MurmurHash3's 32-bit finalizer (Appleby, public domain), computed on int64 tensors
that hold uint32 values; products are masked back to 32 bits, which wraps exactly as uint32
arithmetic does.

Because the mask is a pure function of the key and the indices, backward recomputes it instead of
saving it: dropout stores no activation bytes at all, at the cost of hashing every element twice.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def dropout_key(*parts) -> int:
    """Return a 32-bit key for one dropout site, from values such as (seed, step, layer, site)."""
    return zlib.crc32(repr(parts).encode()) & _MASK32


@dataclass(frozen=True)
class GlobalSlice:
    """Position of a local tensor inside its global tensor: per dim, the global size and the
    offset of the local slice."""

    sizes: tuple[int, ...]
    offsets: tuple[int, ...]


def global_indices(local_shape, where: GlobalSlice, device) -> torch.Tensor:
    """Return the row-major index of each local element in the global tensor, as int64."""
    assert len(local_shape) == len(where.sizes) == len(where.offsets), (
        f"{tuple(local_shape)=}, {where=}"
    )
    index = torch.zeros((), dtype=torch.int64, device=device)
    for dim, (n, size, offset) in enumerate(zip(local_shape, where.sizes, where.offsets)):
        shape = [1] * len(local_shape)
        shape[dim] = n
        coord = torch.arange(offset, offset + n, dtype=torch.int64, device=device).view(shape)
        index = index * size + coord
    return index


def keep_mask(key: int, local_shape, where: GlobalSlice, p: float, device) -> torch.Tensor:
    """Return the bool mask of elements that dropout with probability `p` keeps."""
    index = global_indices(local_shape, where, device)
    low = index & _MASK32
    high = index >> 32
    hashed = _fmix32(low ^ key)
    if math.prod(where.sizes) > 2**32:
        hashed = _fmix32(hashed ^ _fmix32(high ^ (key ^ 0x9E3779B9)))
    threshold = int(p * 2**32)
    return hashed >= threshold


def _apply_mask(x: torch.Tensor, p: float, key: int, where: GlobalSlice) -> torch.Tensor:
    mask = keep_mask(key, x.shape, where, p, x.device)
    return x * mask.to(x.dtype) * (1.0 / (1.0 - p))


class _HashedDropout(torch.autograd.Function):
    """Inverted dropout whose backward regenerates the mask instead of saving it."""

    @staticmethod
    def forward(ctx, x, p, key, where):
        ctx.p, ctx.key, ctx.where = p, key, where
        return _apply_mask(x, p, key, where)

    @staticmethod
    def backward(ctx, grad):
        return _apply_mask(grad, ctx.p, ctx.key, ctx.where), None, None, None


def hashed_dropout(x: torch.Tensor, p: float, key: int, where: GlobalSlice) -> torch.Tensor:
    """Apply inverted dropout with a layout-invariant mask; identity when p == 0."""
    if p == 0.0:
        return x
    return _HashedDropout.apply(x, p, key, where)
