"""Memory per device: parameters, gradients, optimizer state and activations.

Activations of one layer and micro-batch follow the published count of Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models"). For 16-bit activations and
1-byte dropout masks it is s b h (10 + 24/t + 5 a s / (h t)) bytes. Here it is generalized to
the widths and kernels of an implementation, in the notation of `planner.ops` with c the
compute width, r the width of the residual stream and k the mask width:

    outside attention and the MLP, split by d:  (2 r + 2 c + 2 k) s b h / d
        (the inputs of both LayerNorms, of the QKV and MLP projections, two dropout masks)
    split by TP:  c s b (4 h + 2 f) / t
        (q, k, v, the attention projection's input, the GELU input, the MLP projection's input)
    attention scores, when materialized:  (2 c + k) a s^2 b / t
        (softmax output, dropout output, dropout mask); a flash kernel keeps only its
        log-sum-exp, 4 a s b / t
    selective recomputation drops the scores; full recomputation keeps only the block input,
        r s b h / d.

NOTE: the published count, adapted: this implementation's own tensors may differ slightly
(`model/memory.py` documents what microtron saves).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.ops import Shape
from planner.workload import Implementation, compute_bytes, param_bytes


def _widths(shape: Shape, impl: Implementation) -> tuple[int, int, int]:
    """Return (c, r, k): compute, residual and mask bytes per element."""
    c = compute_bytes(shape.dtype)
    r = param_bytes(shape.dtype) if impl.residual_in_param_dtype else c
    k = impl.mask_bytes if shape.dropout or impl.attention == "materialized" else 0
    return c, r, k


def layer_activation_bytes(shape: Shape, impl: Implementation, recompute: str = "none") -> float:
    """Return the bytes one layer keeps from its forward until its backward, per micro-batch."""
    b, s, h, a, f, t, d = (shape.micro_batch, shape.seq_len, shape.hidden, shape.heads, shape.ffn,
                           shape.tp, shape.sequence_split)
    c, r, k = _widths(shape, impl)
    sbh = s * b * h
    if recompute == "full":
        return r * sbh / d
    outside = (2 * r + 2 * c + 2 * k) * sbh / d
    split = c * s * b * (4 * h + 2 * f) / t
    if recompute == "selective":
        return outside + split
    materialized = impl.attention == "materialized" or (impl.attention == "auto" and shape.dropout)
    scores = (2 * c + k) * a * s * s * b / t if materialized else 4 * a * s * b / t
    return outside + split + scores


def layer_weight_grad_bytes(shape: Shape, impl: Implementation) -> float:
    """Return the bytes a layer keeps from its I action until its W action: the input and the
    output gradient of each linear layer, per token h + 3h/t, h/t + h, h + f/t and f/t + h."""
    h, f, t = shape.hidden, shape.ffn, shape.tp
    c = compute_bytes(shape.dtype)
    return c * shape.tokens * (4 * h + (4 * h + 2 * f) / t)


def recompute_workspace_bytes(shape: Shape, impl: Implementation, recompute: str) -> float:
    """Return the extra bytes held while one layer is recomputed during its backward."""
    if recompute == "full":
        return layer_activation_bytes(shape, impl, "none")
    if recompute == "selective":
        return layer_activation_bytes(shape, impl, "none") - layer_activation_bytes(shape, impl, "selective")
    return 0.0


def head_activation_bytes(shape: Shape, impl: Implementation) -> float:
    """Return the last stage's bytes outside its layers: the final LayerNorm's input, the head's
    input and the loss's softmax over this rank's vocabulary slice (in 4 or 8 bytes)."""
    c, r, _ = _widths(shape, impl)
    n = shape.tokens * shape.hidden
    loss_bytes = 8 if shape.dtype == "float64" else 4
    return (r + c) * n / shape.sequence_split + loss_bytes * shape.tokens * shape.padded_vocab / shape.tp


def embedding_activation_bytes(shape: Shape) -> float:
    """Return the first stage's bytes outside its layers: the token ids (int64)."""
    return 8.0 * shape.tokens


# ----------------------------------------------------------------------------------------------
# Parameters


def layer_parameters(hidden: int, ffn: int, tp: int) -> float:
    """Return the parameters of one block on one TP rank (LayerNorms and the row-parallel
    biases are replicated)."""
    h, f = hidden, ffn
    return 6 * h + (4 * h * h + 3 * h + 2 * h * f + f) / tp


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of the model state."""

    params: int
    grads: int
    optimizer: int  # two AdamW moments


def state_bytes(dtype: str, impl: Implementation) -> StateBytes:
    p = param_bytes(dtype)
    params = p + (compute_bytes(dtype) if impl.compute_param_copy and compute_bytes(dtype) < p else 0)
    grads = p if impl.grads_in_param_dtype else compute_bytes(dtype)
    return StateBytes(params, grads, 2 * p)


@dataclass
class MemoryBreakdown:
    """Bytes on the device that needs the most."""

    params: float
    grads: float
    optimizer: float
    activations: float
    workspace: float
    rank: int  # the pipeline rank it belongs to

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.workspace

    def largest(self) -> tuple[str, float]:
        parts = {"parameters": self.params, "gradients": self.grads, "optimizer state": self.optimizer,
                 "activations": self.activations, "workspace": self.workspace}
        name = max(parts, key=parts.get)
        return name, parts[name]
