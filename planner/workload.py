"""The planner's inputs: the workload (model, batch, dtype), the implementation that runs it,
and a candidate layout."""

from __future__ import annotations

from dataclasses import dataclass, field

from model.config import GPTConfig
from training.compat import COMPUTE_BYTES, SCHEDULE_RULES, Strategy


@dataclass(frozen=True)
class Workload:
    """A model trained on `global_batch` sequences of `seq_len` tokens per step in `dtype`
    (an axis value of `training.compat`: float32, float64, bf16 or fp16)."""

    model: GPTConfig
    seq_len: int
    global_batch: int
    dtype: str = "float32"
    tied_embeddings: bool = True

    @property
    def tokens(self) -> int:
        return self.global_batch * self.seq_len

    def model_flops(self) -> float:
        """Return the model FLOPs of one step: 3 times the forward pass (forward, backward for
        inputs, backward for weights), without recomputation and with no causal halving of the
        attention scores (Megatron-LM's count). For an MLP of width 4h this is
        72 B s l h^2 (1 + s / (6 h) + V / (12 h l)) of Korthikanti et al. 2022, eq. 7."""
        m = self.model
        h, f, s = m.n_embd, m.ffn_size, self.seq_len
        per_token_layer = 2 * (3 * h * h + h * h + 2 * h * f) + 4 * s * h
        per_token = m.n_layer * per_token_layer + 2 * h * m.vocab_size
        return 3.0 * per_token * self.tokens

    def megatron_flops(self) -> float:
        """Return the FLOPs per step that Narayanan et al. 2021 count (eq. 3): full recomputation
        included, 96 B s l h^2 (1 + s / (6 h) + V / (16 l h)) for an MLP of width 4h."""
        m = self.model
        h, f, s = m.n_embd, m.ffn_size, self.seq_len
        per_token_layer = 2 * (3 * h * h + h * h + 2 * h * f) + 4 * s * h
        return (4.0 * m.n_layer * per_token_layer + 6.0 * h * m.vocab_size) * self.tokens


@dataclass(frozen=True)
class Implementation:
    """The properties of a training code that change a layout's time or memory.

    fused_kernels: bias-GELU, bias-dropout-add and scale-mask-softmax run as single kernels.
    attention: "flash" (fused, no s x s scores kept), "materialized" (scores in memory), or
        "auto": flash without dropout, materialized with it (what microtron's GPT does).
    p2p_blocking: a pipeline transfer holds up the compute of both ranks (a blocking send and
        receive between actions), instead of overlapping it.
    scatter_gather: a pipeline transfer sends 1/tp of the activation from each TP rank and
        all-gathers it on the receiver, as in Narayanan et al. 2021.
    residual_in_param_dtype: the residual stream, the LayerNorms and the tensors passed between
        stages keep the parameter dtype under mixed precision (microtron's autocast), rather
        than the 16-bit compute dtype.
    grads_in_param_dtype: gradients accumulate and are reduced over dp in the parameter dtype;
        else in the compute dtype.
    mask_bytes: bytes per element of stored dropout masks (0 when masks are regenerated).
    compute_param_copy: under mixed precision the model keeps 16-bit parameters for compute
        beside the float32 master weights of the optimizer.
    ops_per_layer: framework ops of a layer's F, I and W actions, each of which costs the
        cluster's per-op overhead (an estimate from counting the ops of the code).
    """

    name: str
    fused_kernels: bool = False
    attention: str = "auto"
    p2p_blocking: bool = False
    scatter_gather: bool = False
    residual_in_param_dtype: bool = True
    grads_in_param_dtype: bool = True
    mask_bytes: int = 0
    compute_param_copy: bool = False
    ops_per_layer: tuple[int, int, int] = (20, 30, 12)


MICROTRON = Implementation("microtron")

# Megatron-LM as run for the published tables of Narayanan et al. 2021 and Korthikanti et al.
# 2022: fused kernels, attention scores in memory (dropout 0.1), blocking transfers of 1/tp of the
# activation, everything in 16 bits but the optimizer.
MEGATRON = Implementation("megatron", fused_kernels=True, attention="materialized",
                          p2p_blocking=True, scatter_gather=True, residual_in_param_dtype=False,
                          grads_in_param_dtype=False, mask_bytes=1, compute_param_copy=True,
                          ops_per_layer=(0, 0, 0))

IMPLEMENTATIONS = {impl.name: impl for impl in (MICROTRON, MEGATRON)}


@dataclass(frozen=True, order=True)
class Candidate:
    """One layout the planner considers: mesh sizes, micro-batching and strategy."""

    tp: int
    pp: int
    dp: int
    micro_batch: int  # sequences per micro-batch
    micro_batches: int  # per dp replica and step
    strategy: Strategy = field(default_factory=Strategy)

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_stages(self) -> int:
        return self.pp * self.strategy.virtual_stages

    @property
    def schedule_rule(self):
        return SCHEDULE_RULES[self.strategy.schedule]

    def describe(self) -> str:
        return (f"tp={self.tp} pp={self.pp} dp={self.dp} b={self.micro_batch} "
                f"m={self.micro_batches} {self.strategy.describe()}")

    def overrides(self) -> dict[str, object]:
        """Return the run config overrides that select this layout (for scripts/train.py)."""
        return {"layout.tp": self.tp, "layout.pp": self.pp, "layout.dp": self.dp,
                "layout.micro_batches": self.micro_batches, **self.strategy.settings()}


def compute_bytes(dtype: str) -> int:
    return COMPUTE_BYTES[dtype]


def param_bytes(dtype: str) -> int:
    """Bytes of a parameter: 8 in float64, else 4 (mixed precision keeps float32 weights)."""
    return 8 if dtype == "float64" else 4
