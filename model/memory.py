"""Activation memory of a transformer layer, for the pipeline simulator's memory figures.

The per-layer formula is that of Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", eq. 1 and 2), written for activations of `dtype_bytes` bytes and
1-byte dropout masks instead of 16-bit activations. Per layer, with s the sequence length, b the
micro-batch, h the hidden size, a the heads and t the TP size, the tensors kept for the backward
are, in elements:
  not split by TP: the inputs of both LayerNorms and of the QKV and MLP projections, 4sbh;
  split by TP: Q and K 2sbh, V sbh, the attention output projection's input sbh, the GELU input
    4sbh and the second MLP projection's input 4sbh, 12sbh / t in all;
  attention scores: the softmax output a s^2 b / t.
With dropout, add the 1-byte masks of the two residual dropouts (2sbh) and of the attention
dropout (a s^2 b / t), and the attention dropout's output (a s^2 b / t elements). For 2-byte
activations with dropout this is the paper's s b h (10 + 24/t + 5as/(ht)).

NOTE: an estimate from a formula, not a measurement. Without dropout the attention here runs
through scaled_dot_product_attention, whose fused kernels may keep no s^2 scores at all, and
the embeddings and the loss of the first and last stages are not counted.
"""

from __future__ import annotations

from model.config import GPTConfig


def activation_bytes_per_layer(config: GPTConfig, micro_batch: int, seq_len: int, tp: int = 1,
                               dtype_bytes: int = 4) -> int:
    """Return the bytes one layer keeps from its forward until its backward, per micro-batch."""
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
