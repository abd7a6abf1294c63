"""GPT-2 built from tensor-parallel layers.

The architecture is GPT-2's: learned position embeddings, pre-LayerNorm blocks of causal
self-attention and a GELU MLP, a final LayerNorm, and an LM head tied to the token embedding.

A `GPTChunk` is a contiguous range of blocks, plus the embeddings when it is the first stage and
the final LayerNorm and head when it is the last. The single-process model is one chunk with every
block and both ends, on a mesh of one rank. A pipeline stage is a chunk with fewer blocks. Blocks
live in a ModuleDict keyed by their global index, so parameter names (`transformer.h.5.attn...`)
are the same whichever rank holds them, and they match the names of a Hugging Face GPT-2
checkpoint (whose Conv1D weights are the transpose of these nn.Linear-layout weights).

Options that change memory, not results:
  sequence_parallel: the residual stream, the LayerNorms and the dropouts outside attention and
    the MLP work on this TP rank's slice of the sequence, (b, s / tp, h).
  recompute: "selective" recomputes the attention core (scores, softmax, dropout and the
    attention-weighted values) in backward, which contains the terms that grow with s^2.
    "full" stores only each block's input and recomputes the whole block in backward, for the
    first `recompute_layers` blocks of each chunk (all of them when None).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.config import GPTConfig
from model.kv_cache import KVCache
from parallel.cross_entropy import vocab_parallel_cross_entropy
from parallel.dropout import GlobalSlice, dropout_key, hashed_dropout
from parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    linear_with_tp_input,
    mark_sequence_parallel,
)
from parallel.mesh import Group

# Dropout sites inside a block, part of each dropout key.
_EMBEDDING, _ATTENTION_PROBS, _ATTENTION_OUT, _MLP_OUT = range(4)

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass
class ForwardContext:
    """Inputs of a forward pass besides the tensor: the micro-batch's place in the global batch
    (for layout-invariant dropout) and the loss scale."""

    seed: int = 0
    step: int = 0
    sample_offset: int = 0  # global index of this micro-batch's first sequence
    global_batch: int = 1  # sequences in the global batch
    loss_scale: float = 1.0  # the loss is sum(token losses) * loss_scale
    position_offset: int = 0  # position of the first input token (non-zero with a KV cache)
    training: bool = True
    kv_cache: KVCache | None = None  # keys and values of earlier positions, for generation


class SequenceShard:
    """The part of the sequence that this rank's hidden states (b, s_local, h) cover: all of it,
    or with sequence parallelism the TP rank's slice."""

    def __init__(self, group: Group, sequence_parallel: bool):
        self.shards = group.size if sequence_parallel else 1
        self.rank = group.rank if sequence_parallel else 0

    def first_position(self, local_len: int, ctx: ForwardContext) -> int:
        return ctx.position_offset + self.rank * local_len

    def hidden_slice(self, x: torch.Tensor, ctx: ForwardContext) -> GlobalSlice:
        """Return the place of a local (b, s_local, h) hidden state in the global
        (batch, sequence, hidden) tensor."""
        b, s_local, h = x.shape
        return GlobalSlice(sizes=(ctx.global_batch, s_local * self.shards, h),
                           offsets=(ctx.sample_offset, self.first_position(s_local, ctx), 0))


class Attention(nn.Module):
    """Causal self-attention with whole heads split over the TP group.

    The input is (b, s, h), or (b, s / tp, h) with sequence parallelism; the QKV projection
    all-gathers the sequence, so attention itself always sees the whole sequence.
    """

    def __init__(self, config: GPTConfig, group: Group, layer: int, sequence_parallel: bool = False,
                 recompute_core: bool = False, dtype=None, device=None):
        super().__init__()
        if config.n_head % group.size != 0:
            raise ValueError(f"n_head={config.n_head} must be divisible by tp={group.size}")
        self.config = config
        self.group = group
        self.layer = layer
        self.recompute_core = recompute_core
        self.local_heads = config.n_head // group.size
        self.first_head = group.rank * self.local_heads
        h = config.n_embd
        # Fused QKV: the full weight stacks the Q, K and V rows; blocks=3 gives each rank the
        # Q, K and V rows of its own heads.
        self.c_attn = ColumnParallelLinear(h, 3 * h, group, blocks=3, sequence_parallel=sequence_parallel,
                                           dtype=dtype, device=device)
        self.c_proj = RowParallelLinear(h, h, group, sequence_parallel=sequence_parallel, dtype=dtype,
                                        device=device)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qkv = self.c_attn(x)  # (b, s, 3 h / tp), the whole sequence
        b, s, _ = qkv.shape
        nh, hd = self.local_heads, self.config.head_dim
        q, k, v = qkv.split(nh * hd, dim=-1)
        q = q.view(b, s, nh, hd).transpose(1, 2)  # (b, nh, s, hd)
        k = k.view(b, s, nh, hd).transpose(1, 2)
        v = v.view(b, s, nh, hd).transpose(1, 2)

        if ctx.kv_cache is not None:
            y = ctx.kv_cache.attend(self.layer, q, k, v, ctx.position_offset)
        elif self.recompute_core and torch.is_grad_enabled():
            # The dropout mask is a hash of indices, so recomputing needs no saved random state.
            y = checkpoint(self._core, q, k, v, ctx, use_reentrant=True, preserve_rng_state=False)
        else:
            y = self._core(q, k, v, ctx)

        y = y.transpose(1, 2).reshape(b, s, nh * hd)  # (b, s, h / tp)
        return self.c_proj(y)

    def _core(self, q, k, v, ctx: ForwardContext) -> torch.Tensor:
        """Return softmax(q k^T / sqrt(hd), causal) v, with dropout on the probabilities."""
        p = self.config.dropout if ctx.training else 0.0
        if p == 0.0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self._attention_with_dropout(q, k, v, p, ctx)

    def _attention_with_dropout(self, q, k, v, p: float, ctx: ForwardContext) -> torch.Tensor:
        b, nh, s, hd = q.shape
        scores = q.matmul(k.transpose(-2, -1)) * hd**-0.5  # (b, nh, s, s)
        causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        # The softmax keeps the dtype of the scores; PyTorch's kernels accumulate 16-bit inputs
        # in fp32. Autocast would switch it to fp32 on CUDA but not on CPU, so it is off here.
        with torch.autocast(q.device.type, enabled=False):
            probs = scores.softmax(dim=-1)
        where = GlobalSlice(
            sizes=(ctx.global_batch, self.config.n_head, s, s),
            offsets=(ctx.sample_offset, self.first_head, 0, 0),
        )
        key = dropout_key(ctx.seed, ctx.step, self.layer, _ATTENTION_PROBS)
        return hashed_dropout(probs, p, key, where).matmul(v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, group: Group, sequence_parallel: bool = False, dtype=None,
                 device=None):
        super().__init__()
        self.c_fc = ColumnParallelLinear(config.n_embd, config.ffn_size, group,
                                         sequence_parallel=sequence_parallel, dtype=dtype, device=device)
        self.c_proj = RowParallelLinear(config.ffn_size, config.n_embd, group,
                                        sequence_parallel=sequence_parallel, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU.
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig, group: Group, layer: int, sequence_parallel: bool = False,
                 recompute_attention: bool = False, dtype=None, device=None):
        super().__init__()
        self.config = config
        self.layer = layer
        self.sequence = SequenceShard(group, sequence_parallel)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, dtype=dtype, device=device)
        self.attn = Attention(config, group, layer, sequence_parallel, recompute_attention, dtype=dtype,
                              device=device)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, dtype=dtype, device=device)
        self.mlp = MLP(config, group, sequence_parallel, dtype=dtype, device=device)
        if self.sequence.shards > 1:
            mark_sequence_parallel(self.ln_1.weight, self.ln_1.bias, self.ln_2.weight, self.ln_2.bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self._dropout(self.attn(self.ln_1(x), ctx), ctx, _ATTENTION_OUT)
        x = x + self._dropout(self.mlp(self.ln_2(x)), ctx, _MLP_OUT)
        return x

    def _dropout(self, x: torch.Tensor, ctx: ForwardContext, site: int) -> torch.Tensor:
        p = self.config.dropout if ctx.training else 0.0
        if p == 0.0:
            return x
        return hashed_dropout(x, p, dropout_key(ctx.seed, ctx.step, self.layer, site),
                              self.sequence.hidden_slice(x, ctx))


class GPTChunk(nn.Module):
    """A contiguous range of blocks, with the embeddings if `first` and the head if `last`.

    forward(inputs, ctx, targets):
      inputs: token ids (b, s) on the first stage, else the hidden state (b, s, h), which is
        (b, s / tp, h) with sequence parallelism.
      returns: the hidden state unless `last`. On the last stage it returns the scaled loss sum
        when `targets` is given (computed in fp32 under 16-bit autocast), else this rank's slice
        of the logits (b, s, V_padded / tp) with padding columns at -inf.

    `wte` may be passed in to share the token embedding with another chunk on the same rank.
    """

    def __init__(self, config: GPTConfig, group: Group, layers: range, first: bool, last: bool,
                 wte: VocabParallelEmbedding | None = None, sequence_parallel: bool = False,
                 recompute: str = "none", recompute_layers: int | None = None, dtype=None, device=None):
        super().__init__()
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute={recompute!r} must be one of {RECOMPUTE_MODES}")
        self.config = config
        self.group = group
        self.layers = layers
        self.first = first
        self.last = last
        self.sequence_parallel = sequence_parallel and group.size > 1
        self.sequence = SequenceShard(group, self.sequence_parallel)
        if recompute == "full":
            self.full_recompute_layers = len(layers) if recompute_layers is None else min(recompute_layers, len(layers))
        else:
            self.full_recompute_layers = 0

        self.transformer = nn.Module()
        if first or last:
            self.transformer.wte = wte if wte is not None else VocabParallelEmbedding(
                config.vocab_size, config.n_embd, group, sequence_parallel=self.sequence_parallel,
                dtype=dtype, device=device)
        if first:
            self.transformer.wpe = nn.Embedding(config.n_positions, config.n_embd, dtype=dtype, device=device)
        self.transformer.h = nn.ModuleDict({
            str(i): Block(config, group, i, self.sequence_parallel, recompute == "selective",
                          dtype=dtype, device=device)
            for i in layers
        })
        if last:
            self.transformer.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, dtype=dtype, device=device)

        if self.sequence_parallel and first:
            mark_sequence_parallel(self.transformer.wpe.weight)
        if self.sequence_parallel and last:
            mark_sequence_parallel(self.transformer.ln_f.weight, self.transformer.ln_f.bias)

    def forward(self, inputs: torch.Tensor, ctx: ForwardContext,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(inputs, ctx) if self.first else inputs
        for index, block in enumerate(self.transformer.h.values()):
            if index < self.full_recompute_layers and torch.is_grad_enabled():
                x = checkpoint(block, x, ctx, use_reentrant=True, preserve_rng_state=False)
            else:
                x = block(x, ctx)
        if not self.last:
            return x
        logits = self.logits(x)
        if targets is None:
            return logits
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the vocabulary softmax and the loss in fp32
        wte = self.transformer.wte
        token_losses = vocab_parallel_cross_entropy(logits, targets, self.group, wte.vocab_start)
        return token_losses.sum() * ctx.loss_scale

    def embed(self, ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Return the embedded tokens (b, s, h), or with sequence parallelism this rank's slice
        (b, s / tp, h) of them."""
        s = ids.shape[1]
        if ctx.position_offset + s > self.config.n_positions:
            raise ValueError(
                f"sequence of {ctx.position_offset + s} tokens exceeds n_positions="
                f"{self.config.n_positions}"
            )
        if s % self.sequence.shards != 0:
            raise ValueError(
                f"sequence of {s} tokens does not split over tp={self.sequence.shards} ranks for "
                f"sequence parallelism; use a length that is a multiple of {self.sequence.shards}"
            )
        local_len = s // self.sequence.shards
        first = self.sequence.first_position(local_len, ctx)
        positions = torch.arange(first, first + local_len, device=ids.device)
        x = self.transformer.wte(ids) + self.transformer.wpe(positions)
        p = self.config.dropout if ctx.training else 0.0
        if p == 0.0:
            return x
        return hashed_dropout(x, p, dropout_key(ctx.seed, ctx.step, -1, _EMBEDDING),
                              self.sequence.hidden_slice(x, ctx))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the final LayerNorm and the tied head; return this rank's vocabulary slice of the
        logits of the whole sequence."""
        x = self.transformer.ln_f(x)
        wte = self.transformer.wte
        logits = linear_with_tp_input(x, wte.weight, None, self.group, self.sequence_parallel)
        padding = wte.local_vocab_mask()
        if padding is not None:
            logits = logits.masked_fill(padding, float("-inf"))
        return logits
