"""The work of each pipeline action: its matrix multiplications, attention, elementwise kernels
and tensor-parallel collectives, per micro-batch and TP rank.

`layer_work` lists a transformer layer's forward F, backward for inputs I and backward for
weights W kernel by kernel, as the code runs them. `embedding_work` and `head_work` list the
extra work of the first stage (embeddings) and of the last stage (final LayerNorm, LM head and
loss). Recomputation adds forward work to I. FLOPs count what the hardware executes,
recomputation included.

Notation: b micro-batch, s sequence, h hidden, a heads, f MLP size, V padded vocabulary, t tp,
d = t with sequence parallelism (tensors outside attention and the MLP are split along the
sequence) and 1 without.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.workload import Implementation, compute_bytes, param_bytes


@dataclass(frozen=True)
class Shape:
    """What the work of a micro-batch depends on."""

    micro_batch: int
    seq_len: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    tp: int
    sequence_parallel: bool
    dtype: str  # the compute dtype axis value
    dropout: bool = False

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def sequence_split(self) -> int:
        return self.tp if self.sequence_parallel and self.tp > 1 else 1

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab // self.tp) * self.tp


@dataclass
class Work:
    """The kernels of one action. Elementwise kernels are (kernel, elements, dtype);
    collectives are (op, bytes) over the TP group."""

    gemms: list[tuple[int, int, int, str, int]] = field(default_factory=list)  # (m, n, k, dtype, count)
    attention: list[tuple[int, int, int, bool, str]] = field(default_factory=list)
    kernels: list[tuple[str, float, str]] = field(default_factory=list)
    collectives: list[tuple[str, float]] = field(default_factory=list)
    ops: int = 0

    def __iadd__(self, other: "Work") -> "Work":
        self.gemms += other.gemms
        self.attention += other.attention
        self.kernels += other.kernels
        self.collectives += other.collectives
        self.ops += other.ops
        return self

    @property
    def flops(self) -> float:
        matmul = sum(2.0 * m * n * k * count for m, n, k, _, count in self.gemms)
        attention = sum(4.0 * bh * s * s * hd * (2 if backward else 1)
                        for bh, s, hd, backward, _ in self.attention)
        return matmul + attention


def _dtypes(shape: Shape, impl: Implementation) -> tuple[str, str]:
    """Return the dtypes of (matmul outputs, residual stream)."""
    compute = shape.dtype
    if impl.residual_in_param_dtype:
        residual = "float64" if compute == "float64" else "float32"
    else:
        residual = compute
    return compute, residual


def _materialized(shape: Shape, impl: Implementation) -> bool:
    if impl.attention == "auto":
        return shape.dropout
    return impl.attention == "materialized"


# ----------------------------------------------------------------------------------------------
# A transformer layer


def layer_work(shape: Shape, impl: Implementation, recompute: str = "none") -> dict[str, Work]:
    """Return the work of one layer's F, I and W actions (I includes recomputation)."""
    forward = _layer_forward(shape, impl)
    backward_input = Work()
    if recompute == "full":
        backward_input += _layer_forward(shape, impl)
    elif recompute == "selective":
        backward_input += _attention_core(shape, impl, backward=False)
    backward_input += _layer_backward_input(shape, impl)
    return {"F": forward, "I": backward_input, "W": _layer_backward_weight(shape, impl)}


def _layer_forward(shape: Shape, impl: Implementation) -> Work:
    b, s, h, f, t, d = (shape.micro_batch, shape.seq_len, shape.hidden, shape.ffn, shape.tp,
                        shape.sequence_split)
    compute, residual = _dtypes(shape, impl)
    tokens, n = b * s, b * s * h
    work = Work(gemms=[(tokens, 3 * h // t, h, compute, 1), (tokens, h, h // t, compute, 1),
                       (tokens, f // t, h, compute, 1), (tokens, h, f // t, compute, 1)])
    work += _attention_core(shape, impl, backward=False)
    work.kernels += [("layer_norm_forward", 2 * n / d, residual), ("copy", n / t, compute)]
    if impl.fused_kernels:
        work.kernels += [("gelu_forward", tokens * f / t, compute),
                         ("add", 2 * n / d, residual), ("dropout_forward", 2 * n / d, residual)]
    else:
        work.kernels += [("gelu_forward", tokens * f / t, compute),
                         ("add", 4 * n / d, residual),  # biases after the reduction, residuals
                         ("copy", tokens * (3 * h + f) / t, compute)]  # biases into QKV, MLP-up outputs
    work.collectives += _block_collectives(shape, impl, backward=False)
    work.ops = impl.ops_per_layer[0]
    return work


def _attention_core(shape: Shape, impl: Implementation, backward: bool) -> Work:
    """Return the work of softmax(q k^T / sqrt(d)) v over this rank's heads."""
    b, s, h, t = shape.micro_batch, shape.seq_len, shape.hidden, shape.tp
    compute, _ = _dtypes(shape, impl)
    heads = shape.heads // t
    head_dim = h // shape.heads
    if not _materialized(shape, impl):
        return Work(attention=[(b * heads, s, head_dim, backward, compute)])
    scores = b * heads * s * s
    count = b * heads
    # Scores q k^T and the weighted values p v as batched multiplications: forward 2 of them,
    # backward 4 (the gradients of both operands of each).
    gemms = [(s, s, head_dim, compute, count), (s, head_dim, s, compute, count)]
    work = Work(gemms=gemms * (2 if backward else 1))
    if impl.fused_kernels:
        kernels = ["softmax", "dropout"]
    else:
        kernels = ["copy", "copy", "softmax", "dropout"]  # scale, causal mask, softmax, dropout
    suffix = "_backward" if backward else "_forward"
    work.kernels += [(k if k == "copy" else k + suffix, scores, compute) for k in kernels]
    return work


def _layer_backward_input(shape: Shape, impl: Implementation) -> Work:
    b, s, h, f, t, d = (shape.micro_batch, shape.seq_len, shape.hidden, shape.ffn, shape.tp,
                        shape.sequence_split)
    compute, residual = _dtypes(shape, impl)
    tokens, n = b * s, b * s * h
    # The gradient with respect to each linear layer's input: (tokens x out) by (out x in).
    work = Work(gemms=[(tokens, h, 3 * h // t, compute, 1), (tokens, h // t, h, compute, 1),
                       (tokens, h, f // t, compute, 1), (tokens, f // t, h, compute, 1)])
    work += _attention_core(shape, impl, backward=True)
    work.kernels += [("layer_norm_backward", 2 * n / d, residual), ("copy", n / t, compute),
                     ("gelu_backward", tokens * f / t, compute),
                     ("add", 2 * n / d, residual),  # the residual branches' gradients
                     ("reduce", 2 * n / d, residual)]  # the biases added after the reduction
    if impl.fused_kernels:
        work.kernels.append(("dropout_backward", 2 * n / d, residual))
    work.collectives += _block_collectives(shape, impl, backward=True)
    work.ops = impl.ops_per_layer[1]
    return work


def _layer_backward_weight(shape: Shape, impl: Implementation) -> Work:
    b, s, h, f, t = shape.micro_batch, shape.seq_len, shape.hidden, shape.ffn, shape.tp
    compute, _ = _dtypes(shape, impl)
    grads = _grad_dtype(shape, impl)
    tokens = b * s
    # The weight gradients, (out x tokens) by (tokens x in), and the column-parallel biases.
    work = Work(gemms=[(3 * h // t, h, tokens, compute, 1), (h, h // t, tokens, compute, 1),
                       (f // t, h, tokens, compute, 1), (h, f // t, tokens, compute, 1)])
    parameters = (4 * h * h + 2 * h * f) / t
    work.kernels += [("reduce", tokens * (3 * h + f) / t, compute),
                     ("add", parameters, grads)]  # accumulated into the gradient buffer
    work.ops = impl.ops_per_layer[2]
    return work


def _block_collectives(shape: Shape, impl: Implementation, backward: bool) -> list[tuple[str, float]]:
    """Return the TP collectives of one layer's forward or input backward.

    Without sequence parallelism there are two all-reduces of (b, s, h) each way: of the
    attention and MLP outputs forward, of the input gradients backward. With it, each
    all-reduce becomes an all-gather before the column-parallel layer and a reduce-scatter
    after the row-parallel one. Backward also all-gathers the column-parallel inputs again for
    their weight gradients, because only this rank's slice of them is kept.
    """
    if shape.tp == 1:
        return []
    compute, residual = _dtypes(shape, impl)
    n = shape.tokens * shape.hidden
    if not shape.sequence_parallel:
        return [("all_reduce", n * compute_bytes(compute))] * 2
    gathered = n * _bytes(residual)
    reduced = n * compute_bytes(compute)
    if backward:
        return [("reduce_scatter", reduced)] * 2 + [("all_gather", reduced)] * 2 + [("all_gather", gathered)] * 2
    return [("all_gather", gathered)] * 2 + [("reduce_scatter", reduced)] * 2


def _grad_dtype(shape: Shape, impl: Implementation) -> str:
    if impl.grads_in_param_dtype:
        return "float64" if shape.dtype == "float64" else "float32"
    return shape.dtype


def _bytes(dtype: str) -> int:
    return param_bytes(dtype) if dtype in ("float32", "float64") else compute_bytes(dtype)


# ----------------------------------------------------------------------------------------------
# The ends of the model


def head_work(shape: Shape, impl: Implementation) -> dict[str, Work]:
    """Return the last stage's extra work: final LayerNorm, the tied LM head and the
    vocab-parallel cross-entropy (in float32 under mixed precision)."""
    t, d, h = shape.tp, shape.sequence_split, shape.hidden
    compute, residual = _dtypes(shape, impl)
    loss_dtype = "float64" if compute == "float64" else "float32"
    tokens, n = shape.tokens, shape.tokens * h
    vocab = shape.padded_vocab // t
    logits = tokens * vocab

    forward = Work(gemms=[(tokens, vocab, h, compute, 1)], ops=8)
    forward.kernels += [("layer_norm_forward", n / d, residual), ("softmax_forward", logits, loss_dtype)]
    backward_input = Work(gemms=[(tokens, h, vocab, compute, 1)], ops=8)
    backward_input.kernels += [("softmax_backward", logits, loss_dtype),
                               ("layer_norm_backward", n / d, residual)]
    if t > 1:
        # The loss's max and sums over the vocabulary; the head's input gradient (or with
        # sequence parallelism, the all-gather of its input and the reduce-scatter back).
        loss_bytes = 8 if loss_dtype == "float64" else 4
        forward.collectives += [("all_reduce", tokens * loss_bytes), ("all_reduce", 2 * tokens * loss_bytes)]
        if shape.sequence_parallel:
            forward.collectives.append(("all_gather", n * _bytes(residual)))
            backward_input.collectives.append(("reduce_scatter", n * compute_bytes(compute)))
        else:
            backward_input.collectives.append(("all_reduce", n * compute_bytes(compute)))
    backward_weight = Work(gemms=[(vocab, h, tokens, compute, 1)], ops=3)
    backward_weight.kernels.append(("add", vocab * h, _grad_dtype(shape, impl)))
    return {"F": forward, "I": backward_input, "W": backward_weight}


def embedding_work(shape: Shape, impl: Implementation) -> dict[str, Work]:
    """Return the first stage's extra work: token and position embeddings.

    The embedding's weight gradient (zeroed, then rows added, then accumulated) is computed
    during I, because only linear layers defer their weight gradients to W.
    """
    t, d, h = shape.tp, shape.sequence_split, shape.hidden
    _, residual = _dtypes(shape, impl)
    grads = _grad_dtype(shape, impl)
    n = shape.tokens * h
    vocab_rows = shape.padded_vocab // t * h
    forward = Work(ops=6)
    forward.kernels += [("embedding_forward", n, residual), ("add", n / d, residual)]
    backward_input = Work(ops=6)
    backward_input.kernels += [("embedding_backward", n, grads), ("reduce", vocab_rows, grads),
                               ("add", vocab_rows, grads), ("reduce", n / d, grads)]
    if t > 1:
        op = "reduce_scatter" if shape.sequence_parallel else "all_reduce"
        forward.collectives.append((op, n * _bytes(residual)))
    return {"F": forward, "I": backward_input, "W": Work()}
