"""Text generation with a single-process model (used for the sample at the end of training)."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from model.build import build_chunks, partition_layers
from model.config import GPTConfig
from model.gpt import ForwardContext, GPTChunk
from parallel.mesh import Layout, Mesh
from training import state


def single_process_model(config: GPTConfig, full_state: dict, dtype=torch.float32) -> GPTChunk:
    """Build the whole model on a one-rank mesh and load full tensors into it."""
    mesh = Mesh(Layout(), 0)
    chunk = build_chunks(config, mesh.tp, [0], partition_layers(config.n_layer, 1), dtype=dtype)[0]
    state.load_model(list(chunk.named_parameters()), full_state, mesh)
    return chunk.eval()


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> int:
    """Pick the next token from one row of logits; temperature 0 means greedy."""
    if temperature == 0.0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set of tokens whose probability mass reaches top_p.
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: GPTChunk, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 40, top_p: float = 1.0, seed: int = 0) -> Iterator[int]:
    """Yield new token ids one by one, recomputing the last n_positions tokens each time."""
    generator = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    limit = model.config.n_positions
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-limit:]])
        logits = model(context, ForwardContext(training=False))[0, -1, :model.config.vocab_size]
        token = sample_next(logits.float(), temperature, top_k, top_p, generator)
        ids.append(token)
        yield token
