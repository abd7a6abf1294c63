"""Analytic memory of one rank: parameters, gradients, optimizer state and activations.

Three activation counts live here:
  `korthikanti_layer_bytes`: the published per-layer counts with their TP, sequence-parallel and
      recomputation variants (16-bit activations).
  `activation_bytes_per_layer` and `weight_grad_bytes_per_layer`: the pipeline simulator's
      estimate, the published count at a chosen byte width, and what a split backward keeps from
      its I action until its W action.
  `layer_activation_bytes` and `stage_activation_bytes`: the count derived below for this
      implementation, which `training.memory_report` and benchmarks/memory.md check against
      measured bytes.

Activations are the tensors that autograd saves for the backward pass. Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", arXiv 2205.05198) count them
per transformer layer, assuming 16-bit activations, 1-byte dropout masks and attention that
materializes the s x s scores. `korthikanti_layer_bytes` returns their counts:

    no parallelism                 s b h (34 + 5 a s / h)
    tensor parallel                s b h (10 + 24 / t + 5 a s / (h t))
    tensor + sequence parallel     s b h (34 + 5 a s / h) / t
    selective recompute            s b h (10 + 24 / t), or 34 s b h / t with SP
    full recompute                 2 s b h (the block input)

NOTE: these published counts were taken from secondary summaries of the paper; its text was not
checked here.

This implementation saves different tensors, so `layer_activation_bytes` derives the count for
it. Notation: b micro-batch, s sequence, h hidden, a heads, f MLP size (4h in GPT-2), t tp, and
d = t with sequence parallelism, else 1. Byte widths:
    r  the residual stream: the parameter dtype (4, or 8 in float64). It stays 4 under autocast,
       because LayerNorm and the residual additions run in fp32.
    c  matmul operands: 2 under bf16 or fp16 autocast, else r.
    w  LayerNorm statistics, the attention log-sum-exp and the loss softmax: 8 if r == 8, else 4.

Per layer, with no recomputation, autograd saves:

    LayerNorm 1 and 2: the input (r s b h / d each), and the mean and 1/std (w b s / d each)
    QKV and MLP-up inputs: the LayerNorm outputs cast to c (c s b h / d each). With sequence
        parallelism only this rank's slice is saved, and backward all-gathers it again.
    q, k, v: c 3 s b h / t (views of the QKV output, or the contiguous copies that torch.matmul
        takes of them when it folds several heads and sequences into one batch dim)
    attention core with dropout off (F.scaled_dot_product_attention, a flash kernel): its output
        c s b h / t, which is also the input of the output projection, and the log-sum-exp
        w b a s / t
    attention core with dropout on (scores materialized): the softmax output and the dropped
        probabilities 2 c b a s^2 / t, the causal mask s^2 (bool), and the output projection's
        input c s b h / t
    MLP: the GELU input and the MLP-down input, 2 c b s f / t
    dropout masks: nothing, because backward regenerates the hashed masks

    layer = 2 (r + c) s b h / d + 4 c s b h / t + 2 c b s f / t + 4 w b s / d + core
    fp32, f = 4h, dropout off:  s b h (16 / d + 48 / t) + 16 b s / d + 4 b a s / t

Compared with the published 34 + 5 a s / h: the widths differ (fp32 doubles everything, and bf16
autocast keeps 4-byte LayerNorm inputs), no dropout masks are stored, and with dropout off the
flash kernel removes the s^2 terms altogether.

Selective recomputation checkpoints the attention core. It saves q, k, v (already counted) and
drops the core's own tensors, which leaves 4 c s b h / t for attention. Full recomputation saves
only each block's input, r s b h / d. Recomputation also costs memory for a moment during
backward: one recomputed core (selective) or one recomputed block (full), which
`stage_activation_bytes` adds to the peak.

Outside the layers, the first stage saves the token ids (int64, plus a bool mask when t > 1) and
the positions. The last stage saves the final LayerNorm's input and statistics, the head's input
(c s b h / d), and the loss's log-softmax over this rank's vocabulary slice (w b s V / t) with
the gap between each token's local and global log-sum-exp (w b s) and its targets.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import GPTConfig

INT64 = 8
BOOL = 1


def korthikanti_layer_bytes(config: GPTConfig, b: int, s: int, t: int = 1, sequence_parallel: bool = False,
                            recompute: str = "none") -> float:
    """Return the published activation bytes of one layer (16-bit, 1-byte masks, see module doc)."""
    h, a = config.n_embd, config.n_head
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh
    attention_scores = 0.0 if recompute == "selective" else 5 * a * s / h
    if sequence_parallel:
        return sbh * (34 + attention_scores) / t
    return sbh * (10 + 24 / t + attention_scores / t)


# ----------------------------------------------------------------------------------------------
# The pipeline simulator's estimate


def activation_bytes_per_layer(config: GPTConfig, micro_batch: int, seq_len: int, tp: int = 1,
                               dtype_bytes: int = 4) -> int:
    """Return the bytes one layer keeps from its forward until its backward, per micro-batch.

    This is the published count for activations of `dtype_bytes` bytes and 1-byte dropout masks.
    In elements, with f = 4h: not split by TP, the inputs of both LayerNorms and of the QKV and
    MLP projections, 4sbh; split by TP, Q and K 2sbh, V sbh, the attention output projection's
    input sbh, the GELU input 4sbh and the second MLP projection's input 4sbh, 12sbh / t in all;
    the attention scores, the softmax output a s^2 b / t. With dropout, add the 1-byte masks of
    the two residual dropouts (2sbh) and of the attention dropout (a s^2 b / t), and the
    attention dropout's output (a s^2 b / t elements). For 2-byte activations with dropout this
    is s b h (10 + 24/t + 5as/(ht)).

    NOTE: an estimate from the published formula, not this implementation's count, which
    `stage_activation_bytes` gives. Here the flash kernel keeps no s^2 scores without dropout and
    no dropout mask is stored, and this estimate leaves out the embeddings and the loss.
    """
    s, b, h, a = seq_len, micro_batch, config.n_embd, config.n_head
    ffn_factor = config.ffn_size / h  # 4 for GPT-2
    hidden = (4 + (4 + 2 * ffn_factor) / tp) * s * b * h * dtype_bytes
    scores = a * s * s * b / tp * dtype_bytes
    if config.dropout > 0:
        hidden += 2 * s * b * h  # residual dropout masks
        scores += a * s * s * b / tp * (dtype_bytes + 1)  # attention dropout output and mask
    return int(hidden + scores)


def weight_grad_bytes_per_layer(config: GPTConfig, micro_batch: int, seq_len: int, tp: int = 1,
                                dtype_bytes: int = 4) -> int:
    """Return the bytes one layer keeps from its input backward (I) until its weight backward
    (W): the input and the output gradient of each of its four linear layers, per micro-batch.

    Per token, in elements: QKV h + 3h/t, attention output projection h/t + h, first MLP
    projection h + f/t, second f/t + h, with f the MLP size. For 2-byte values, f = 4h and t = 1
    this is the 32sbh of Qi et al. 2024, Table 1.
    """
    s, b, h, f = seq_len, micro_batch, config.n_embd, config.ffn_size
    per_token = 4 * h + (3 * h + h + 2 * f) / tp
    return int(per_token * s * b * dtype_bytes)


# ----------------------------------------------------------------------------------------------
# The count derived for this implementation


@dataclass(frozen=True)
class ActivationSetting:
    """The settings besides the model config that activation memory depends on."""

    micro_batch: int
    seq_len: int
    tp: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"  # none, selective or full
    recompute_layers: int | None = None  # with full: the first k blocks of each stage
    param_bytes: int = 4  # 4 for float32 parameters, 8 for float64
    compute_bytes: int | None = None  # matmul operand width: 2 under bf16/fp16 autocast
    dropout: bool = False  # dropout > 0 in training, which materializes the attention scores

    @property
    def matmul_bytes(self) -> int:
        return self.compute_bytes or self.param_bytes

    @property
    def stat_bytes(self) -> int:
        return 8 if self.param_bytes == 8 else 4

    @property
    def sequence_split(self) -> int:
        return self.tp if self.sequence_parallel and self.tp > 1 else 1


def attention_core_bytes(config: GPTConfig, setting: ActivationSetting) -> int:
    """Return the bytes that the attention core saves beyond q, k, v (see the module doc)."""
    b, s, t = setting.micro_batch, setting.seq_len, setting.tp
    c, w = setting.matmul_bytes, setting.stat_bytes
    heads = config.n_head // t
    if setting.dropout:
        return 2 * c * b * heads * s * s + BOOL * s * s + c * s * b * config.n_embd // t
    return c * s * b * config.n_embd // t + w * b * heads * s


def layer_activation_bytes(config: GPTConfig, setting: ActivationSetting, recompute: str | None = None) -> int:
    """Return the bytes one layer saves for backward until its backward pass.

    `recompute` overrides the setting's mode (the first k blocks may differ from the rest).
    """
    mode = setting.recompute if recompute is None else recompute
    b, s, t, d = setting.micro_batch, setting.seq_len, setting.tp, setting.sequence_split
    r, c, w = setting.param_bytes, setting.matmul_bytes, setting.stat_bytes
    sbh = s * b * config.n_embd
    if mode == "full":
        return r * sbh // d

    layer_norms = 2 * (r * sbh // d + 2 * w * b * s // d)
    linear_inputs = 2 * c * sbh // d  # QKV and MLP-up inputs
    qkv = 3 * c * sbh // t
    mlp = 2 * c * b * s * config.ffn_size // t
    if mode == "selective":
        attention = qkv + c * sbh // t  # q, k, v for recomputation, and the projection's input
    else:
        attention = qkv + attention_core_bytes(config, setting)
    return layer_norms + linear_inputs + attention + mlp


def embedding_activation_bytes(config: GPTConfig, setting: ActivationSetting) -> int:
    """Return the bytes the first stage saves outside its layers (token ids and positions)."""
    b, s, t, d = setting.micro_batch, setting.seq_len, setting.tp, setting.sequence_split
    ids = INT64 * b * s + (BOOL * b * s if t > 1 else 0)
    return ids + INT64 * s // d


def head_activation_bytes(config: GPTConfig, setting: ActivationSetting) -> int:
    """Return the bytes the last stage saves outside its layers (final LayerNorm, head, loss)."""
    b, s, t, d = setting.micro_batch, setting.seq_len, setting.tp, setting.sequence_split
    r, c, w = setting.param_bytes, setting.matmul_bytes, setting.stat_bytes
    sbh = s * b * config.n_embd
    padded_vocab = -(-config.vocab_size // t) * t
    layer_norm = r * sbh // d + 2 * w * b * s // d
    head_input = c * sbh // d
    loss = w * b * s * (padded_vocab // t + 1) + INT64 * b * s + BOOL * b * s
    padding_mask = BOOL * padded_vocab // t if padded_vocab != config.vocab_size else 0
    return layer_norm + head_input + loss + padding_mask


@dataclass(frozen=True)
class StageActivations:
    """Activation bytes of one micro-batch on one stage."""

    stored: int  # saved from the end of the forward pass until the backward pass starts
    backward_peak: int  # maximum during the backward pass, recomputed tensors included


def stage_activation_bytes(config: GPTConfig, setting: ActivationSetting, num_layers: int,
                           first: bool, last: bool) -> StageActivations:
    """Return the activation bytes of one micro-batch on a stage of `num_layers` blocks."""
    full_layers = 0
    if setting.recompute == "full":
        full_layers = num_layers if setting.recompute_layers is None else min(setting.recompute_layers, num_layers)
    other_mode = "selective" if setting.recompute == "selective" else "none"
    checkpoints = full_layers * layer_activation_bytes(config, setting, "full")
    other_layers = (num_layers - full_layers) * layer_activation_bytes(config, setting, other_mode)
    embedding = embedding_activation_bytes(config, setting) if first else 0
    head = head_activation_bytes(config, setting) if last else 0
    stored = embedding + checkpoints + other_layers + head

    # The head's tensors are freed before the backward pass of any block starts.
    backward_peak = stored - head
    if full_layers:
        # The deepest recomputed block runs its forward again while every recomputed block's
        # input is still saved. The blocks after it have already finished their backward.
        recomputed_block = layer_activation_bytes(config, setting, "none") - layer_activation_bytes(config, setting, "full")
        backward_peak = max(backward_peak, embedding + checkpoints + recomputed_block)
    elif setting.recompute == "selective" and num_layers:
        # The last block's attention core is recomputed after the block's MLP and output
        # projection have run their backward and freed their tensors.
        selective = layer_activation_bytes(config, setting, "selective")
        before_core = selective - _after_core_bytes(config, setting)
        backward_peak = max(backward_peak, embedding + (num_layers - 1) * selective + before_core
                            + _recomputed_core_bytes(config, setting))
    return StageActivations(stored, backward_peak)


def _recomputed_core_bytes(config: GPTConfig, setting: ActivationSetting) -> int:
    """Return the bytes that one recomputed attention core saves during its backward pass."""
    b, s, t, c = setting.micro_batch, setting.seq_len, setting.tp, setting.matmul_bytes
    sbh = s * b * config.n_embd
    if not setting.dropout:
        return attention_core_bytes(config, setting)  # the flash kernel's output and log-sum-exp
    core = attention_core_bytes(config, setting) - c * sbh // t  # without the projection's input
    if config.n_head // t > 1 and b > 1:
        # torch.matmul folds (b, heads) into one batch dim. For these strided views of the QKV
        # output that takes contiguous copies of q, k and v, which the recomputed core saves.
        # With one head or one sequence per rank the views fold without a copy.
        core += 3 * c * sbh // t
    return core


def _after_core_bytes(config: GPTConfig, setting: ActivationSetting) -> int:
    """Return the bytes a block saves after its attention core: the output projection's input,
    LayerNorm 2 and the MLP."""
    b, s, t, d = setting.micro_batch, setting.seq_len, setting.tp, setting.sequence_split
    r, c, w = setting.param_bytes, setting.matmul_bytes, setting.stat_bytes
    sbh = s * b * config.n_embd
    return (c * sbh // t + r * sbh // d + 2 * w * b * s // d + c * sbh // d
            + 2 * c * b * s * config.ffn_size // t)


def peak_activation_bytes(stage_bytes: dict[int, StageActivations], actions) -> int:
    """Return the peak activation bytes of one rank that runs `actions` (compute actions of a
    schedule: F and B of (stage, micro-batch)), given each stage's per-micro-batch bytes.

    NOTE: a split backward frees everything here at its I action, although the inputs that the
    weight gradients need stay until W runs, so zero-bubble schedules are underestimated.
    """
    held, peak = 0, 0
    for action in actions:
        if action.kind == "F":
            held += stage_bytes[action.stage].stored
            peak = max(peak, held)
        elif action.kind in ("B", "I"):
            stage = stage_bytes[action.stage]
            peak = max(peak, held - stage.stored + stage.backward_peak)
            held -= stage.stored
    return peak


# ----------------------------------------------------------------------------------------------
# Parameters, gradients and optimizer state


def layer_parameter_count(config: GPTConfig, tp: int) -> int:
    """Return the parameters of one block held by one TP rank."""
    h, f = config.n_embd, config.ffn_size
    replicated = 2 * 2 * h + h + h  # two LayerNorms, the two row-parallel biases
    split = (3 * h * h + 3 * h + h * h + h * f + f + f * h) // tp
    return replicated + split


def rank_parameter_count(config: GPTConfig, tp: int, layer_ranges: list[range], stages: list[int]) -> int:
    """Return the parameters one rank holds for its `stages` (the token embedding once)."""
    h = config.n_embd
    last = len(layer_ranges) - 1
    count = sum(len(layer_ranges[stage]) for stage in stages) * layer_parameter_count(config, tp)
    if 0 in stages or last in stages:
        count += -(-config.vocab_size // tp) * h  # this rank's rows of the padded vocabulary
    if 0 in stages:
        count += config.n_positions * h
    if last in stages:
        count += 2 * h
    return count


def optimizer_state_bytes(parameter_count: int, param_bytes: int, dp: int, distributed: bool) -> float:
    """Return AdamW's state bytes (two moments per parameter), sharded over dp with ZeRO-1."""
    state = 2 * parameter_count * param_bytes
    return state / dp if distributed else state
