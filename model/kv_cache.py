"""A key-value cache for generating one token at a time.

Attention at a new position needs the keys and values of every earlier position. Without a cache
each new token recomputes them for the whole prefix, so generating n tokens costs O(n^2) forward
positions. With the cache each position is computed once. The cache stores each layer's keys and
values in buffers of n_positions slots, allocated when the layer first writes, and holds only
the layers and heads of this rank (a TP rank caches its own heads, a pipeline rank its own
layers).

The cache serves inference only: attention dropout is not applied to cached attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of positions [0, length) per layer, each (batch, local heads, n_positions,
    head_dim)."""

    def __init__(self, max_positions: int):
        self.max_positions = max_positions
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               start: int) -> torch.Tensor:
        """Store k and v at positions [start, start + s) and return causal attention of q over
        positions [0, start + s). q, k, v: (b, nh, s, hd), their first position at `start`."""
        s = q.shape[2]
        end = start + s
        if end > self.max_positions:
            raise ValueError(f"positions up to {end} exceed the cache of {self.max_positions}")
        if layer not in self._keys:
            shape = (k.shape[0], k.shape[1], self.max_positions, k.shape[3])
            self._keys[layer] = k.new_zeros(shape)
            self._values[layer] = v.new_zeros(shape)
        self._keys[layer][:, :, start:end] = k
        self._values[layer][:, :, start:end] = v
        keys = self._keys[layer][:, :, :end]  # (b, nh, end, hd)
        values = self._values[layer][:, :, :end]

        if start == 0:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        if s == 1:
            return F.scaled_dot_product_attention(q, keys, values)  # one query attends to all keys
        # Query i is at position start + i and attends to keys 0 .. start + i.
        mask = torch.ones(s, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
