"""Text generation with a KV cache, on one process or on a tp x pp mesh.

`Decoder` runs the model chunks that one rank holds. For each new token it walks the stages in
order: the first stage embeds the new token ids, each stage passes its hidden state to the rank
of the next stage, and the last stage all-gathers its vocabulary slice of the logits over the TP
group. The last stage's ranks pick the token, and a broadcast over the pipeline group hands it to
every stage for the next step. Every rank therefore returns the same token ids; TP ranks agree
because they pick from identical gathered logits with identically seeded generators.

Greedy decoding gives the same ids under every layout as long as no two top logits are closer
than the rounding differences between layouts (about 1e-6 relative in float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from model.build import build_chunks, named_parameters, partition_layers
from model.config import GPTConfig
from model.gpt import ForwardContext, GPTChunk
from model.kv_cache import KVCache
from parallel import comm
from parallel.mesh import Layout, Mesh
from parallel.pipeline.schedules import contiguous_placement
from training import state


@dataclass(frozen=True)
class SamplingConfig:
    """Settings for picking the next token from the logits."""

    temperature: float = 0.8  # 0 picks the most likely token (greedy decoding)
    top_k: int = 40  # sample among the k most likely tokens; 0 turns the cut off
    top_p: float = 1.0  # sample among the most likely tokens whose probabilities add up to p
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be 0 (greedy) or more")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be 0 (off) or more")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p={self.top_p} must be in (0, 1]; 1 turns the cut off")
        if problems:
            raise ValueError("invalid sampling settings: " + "; ".join(problems))


def sample_next(logits: torch.Tensor, sampling: SamplingConfig,
                generator: torch.Generator | None) -> int:
    """Pick the next token from one row of logits."""
    if sampling.temperature == 0.0:
        return int(logits.argmax())
    logits = logits.float() / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set of tokens whose probability mass reaches top_p.
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class Decoder:
    """The chunks of one rank, run stage by stage to compute the logits of the next token.

    chunks: {stage: chunk} of the stages this rank holds; stage_ranks[s] is the pipeline rank of
    stage s.
    """

    def __init__(self, chunks: dict[int, GPTChunk], stage_ranks: tuple[int, ...], mesh: Mesh,
                 config: GPTConfig, dtype: torch.dtype, device):
        self.chunks = chunks
        self.stage_ranks = tuple(stage_ranks)
        self.mesh = mesh
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)

    @classmethod
    def from_trainer(cls, trainer) -> "Decoder":
        """Return a decoder over a trainer's chunks, in the trainer's layout."""
        return cls(trainer.chunks, trainer.schedule.stage_ranks, trainer.mesh, trainer.config.model,
                   trainer.dtype, trainer.device)

    @classmethod
    def load(cls, config: GPTConfig, full_state: dict, mesh: Mesh, dtype=torch.float32,
             device="cpu") -> "Decoder":
        """Build this rank's stage (one per pipeline rank) and load its slice of full tensors."""
        num_stages = mesh.layout.pp
        chunks = build_chunks(config, mesh.tp, [mesh.pp_rank], partition_layers(config.n_layer, num_stages),
                              dtype=dtype, device=device)
        state.load_model(list(named_parameters(chunks)), full_state, mesh)
        for chunk in chunks.values():
            chunk.eval()
        return cls(chunks, contiguous_placement(num_stages), mesh, config, dtype, device)

    @classmethod
    def single_process(cls, config: GPTConfig, full_state: dict, dtype=torch.float32) -> "Decoder":
        return cls.load(config, full_state, Mesh(Layout(), 0), dtype)

    @property
    def holds_last_stage(self) -> bool:
        return self.stage_ranks[-1] == self.mesh.pp_rank

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, position: int = 0,
               cache: KVCache | None = None) -> torch.Tensor | None:
        """Return the full-vocabulary logits (b, s, vocab_size) of token ids (b, s) on the ranks
        of the last stage, None on the others."""
        local = self._run_stages(tokens, position, cache)
        if local is None:
            return None
        return comm.gather_last_dim(local, self.mesh.tp)[..., :self.config.vocab_size]

    @torch.no_grad()
    def next_logits(self, ids: list[int], position: int, cache: KVCache) -> torch.Tensor | None:
        """Run `ids` (at positions from `position` on) through every stage; return the full-vocabulary
        logits after the last id on the ranks of the last stage, None on the others."""
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        local = self._run_stages(tokens, position, cache)
        if local is None:
            return None
        last = comm.gather_last_dim(local[:, -1], self.mesh.tp)  # (1, V_padded)
        return last[0, :self.config.vocab_size]

    def _run_stages(self, tokens: torch.Tensor, position: int,
                    cache: KVCache | None) -> torch.Tensor | None:
        """Run this rank's stages in stage order, passing hidden states between pipeline ranks;
        return this TP rank's logit slice (b, s, V_padded / tp) on the last stage, else None."""
        ctx = ForwardContext(training=False, position_offset=position, kv_cache=cache)
        last = len(self.stage_ranks) - 1
        hidden = None
        for stage in self._stages_here():
            inputs = tokens if stage == 0 else self._stage_input(stage, hidden, tokens.shape)
            hidden = self.chunks[stage](inputs, ctx)
            if stage < last and self.stage_ranks[stage + 1] != self.mesh.pp_rank:
                peer = self.mesh.pp.global_rank(self.stage_ranks[stage + 1])
                comm.isend(hidden.contiguous(), peer, self.mesh.pp, tag=stage).wait()
        return hidden if self.holds_last_stage else None

    def _stages_here(self) -> list[int]:
        return [s for s, rank in enumerate(self.stage_ranks) if rank == self.mesh.pp_rank]

    def _stage_input(self, stage: int, hidden: torch.Tensor | None, token_shape) -> torch.Tensor:
        """Return the previous stage's output: in memory when this rank ran it, else received."""
        if self.stage_ranks[stage - 1] == self.mesh.pp_rank:
            return hidden
        buffer = torch.empty((*token_shape, self.config.n_embd), dtype=self.dtype, device=self.device)
        peer = self.mesh.pp.global_rank(self.stage_ranks[stage - 1])
        comm.irecv(buffer, peer, self.mesh.pp, tag=stage - 1).wait()
        return buffer

    def share_token(self, token: int | None) -> int:
        """Broadcast the token that the last stage picked to every pipeline rank."""
        value = torch.tensor([-1 if token is None else token], dtype=torch.long, device=self.device)
        comm.broadcast(value, self.stage_ranks[-1], self.mesh.pp)
        return int(value)


def check_prompt(prompt: list[int], config: GPTConfig) -> None:
    """Raise ValueError for an empty prompt or one longer than the model's context."""
    if not prompt:
        raise ValueError("the prompt is empty; generation needs at least one token to start from")
    if len(prompt) > config.n_positions:
        raise ValueError(f"the prompt has {len(prompt)} tokens, more than the model's context of "
                         f"n_positions={config.n_positions}; shorten the prompt (it is not cut "
                         f"silently, because the model would not see its beginning)")
    bad = [t for t in prompt if not 0 <= t < config.vocab_size]
    if bad:
        raise ValueError(f"the prompt contains token ids {bad[:5]} outside the vocabulary "
                         f"[0, {config.vocab_size})")


@torch.no_grad()
def generate(decoder: Decoder, prompt: list[int], max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig()) -> Iterator[int]:
    """Yield `max_new_tokens` new token ids, the same on every rank.

    Once prompt and output fill the context of n_positions tokens, each further token is
    predicted from the last n_positions tokens (a sliding window), recomputed without the cache.
    """
    config = decoder.config
    check_prompt(prompt, config)
    generator = torch.Generator().manual_seed(sampling.seed)
    cache = KVCache(config.n_positions)
    ids = list(prompt)
    inputs, position = list(prompt), 0
    for _ in range(max_new_tokens):
        if position + len(inputs) > config.n_positions:
            cache = KVCache(config.n_positions)
            inputs, position = ids[-config.n_positions:], 0
        logits = decoder.next_logits(inputs, position, cache)
        token = sample_next(logits, sampling, generator) if logits is not None else None
        token = decoder.share_token(token)
        ids.append(token)
        yield token
        position += len(inputs)
        inputs = [token]
