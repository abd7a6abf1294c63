"""GPT-2 in plain PyTorch modules, for the peers that expect nn.Linear and nn.Embedding.

The module computes the same function as microtron's single-process model: learned position
embeddings, pre-LayerNorm blocks of causal self-attention and a tanh-GELU MLP, a final LayerNorm
and an LM head tied to the token embedding. Parameter names are microtron's (and Hugging Face
GPT-2's), in nn.Linear layout, so microtron's full initial weights load unchanged.

A `PeerGPT` holds a contiguous range of blocks, with the embeddings when it is the first stage
and the final LayerNorm and head when it is the last, so that torch.distributed.pipelining can
run one per stage.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import GPTConfig
from parallel.layers import ShardSpec, shard


class PeerAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        # -1 heads: under torch's tensor parallelism each rank holds only its own heads.
        q = q.view(b, s, -1, self.head_dim).transpose(1, 2)  # (b, nh, s, hd)
        k = k.view(b, s, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, s, -1))


class PeerBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = PeerAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(config.n_embd, config.ffn_size)
        self.mlp.c_proj = nn.Linear(config.ffn_size, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        h = F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh")
        return x + self.mlp.c_proj(h)


class PeerGPT(nn.Module):
    """Blocks `layers` of GPT-2, with the embeddings if `first` and the head if `last`.

    forward(inputs): token ids (b, s) on the first stage, else the hidden state (b, s, h);
    returns the hidden state, or the logits (b, s, V) on the last stage.
    """

    def __init__(self, config: GPTConfig, layers: range, first: bool = True, last: bool = True,
                 wte: nn.Embedding | None = None):
        super().__init__()
        self.first, self.last = first, last
        self.transformer = nn.Module()
        if first or last:
            self.transformer.wte = wte if wte is not None else nn.Embedding(config.vocab_size,
                                                                            config.n_embd)
        if first:
            self.transformer.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.transformer.h = nn.ModuleDict({str(i): PeerBlock(config) for i in layers})
        if last:
            self.transformer.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.first:
            positions = torch.arange(inputs.shape[1], device=inputs.device)
            x = self.transformer.wte(inputs) + self.transformer.wpe(positions)
        for block in self.transformer.h.values():
            x = block(x)
        if not self.last:
            return x
        return F.linear(self.transformer.ln_f(x), self.transformer.wte.weight)


def load_full_weights(module: PeerGPT, full: dict[str, torch.Tensor], head_groups: int = 1) -> None:
    """Copy the full tensors of the module's parameters from `full` (missing names raise).

    With `head_groups` > 1, the rows of each fused QKV weight and bias are reordered from
    [Q | K | V] to [Q_0 K_0 V_0 | Q_1 K_1 V_1 | ...], where group i contains the i-th share of the
    heads. An even split of the output features over `head_groups` ranks, as torch's
    ColwiseParallel does, then gives each rank the query, key and value rows of the same heads.
    """
    state = {}
    for name, param in module.named_parameters():
        tensor = full[name]
        if head_groups > 1 and ".attn.c_attn." in name:
            spec = ShardSpec(dim=0, blocks=3)
            tensor = torch.cat([shard(tensor, spec, i, head_groups) for i in range(head_groups)])
        state[name] = tensor.to(param.dtype)
    module.load_state_dict(state, strict=True)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """Return the summed cross-entropy of the tokens times `scale`, microtron's micro-batch loss."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") * scale
