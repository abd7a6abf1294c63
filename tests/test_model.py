"""The single-process model is GPT-2, and its initialization and shards do not depend on layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.build import build_chunks, full_init, initialize, named_parameters, partition_layers
from model.config import GPTConfig, resolve_model_config
from model.gpt import ForwardContext
from parallel.layers import ShardSpec, full_shape, shard, unshard
from parallel.mesh import Layout, Mesh

CONFIG = GPTConfig(vocab_size=61, n_positions=16, n_embd=24, n_layer=2, n_head=4)


def _single_process_model(config=CONFIG, seed=7, dtype=torch.float64):
    mesh = Mesh(Layout(), 0)
    chunk = build_chunks(config, mesh.tp, [0], partition_layers(config.n_layer, 1), dtype=dtype)[0]
    initialize({0: chunk}, config, seed, mesh.tp)
    return chunk


def _textbook_gpt2_logits(weights: dict, ids: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """GPT-2's forward pass written out from its definition, with plain tensor ops."""
    def layer_norm(x, prefix):
        return F.layer_norm(x, (config.n_embd,), weights[prefix + ".weight"], weights[prefix + ".bias"],
                            config.layer_norm_epsilon)

    b, s = ids.shape
    nh, hd = config.n_head, config.n_embd // config.n_head
    x = weights["transformer.wte.weight"][ids] + weights["transformer.wpe.weight"][:s]
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        a = layer_norm(x, p + "ln_1") @ weights[p + "attn.c_attn.weight"].T + weights[p + "attn.c_attn.bias"]
        q, k, v = (t.view(b, s, nh, hd).transpose(1, 2) for t in a.split(config.n_embd, dim=-1))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        attn = attn.transpose(1, 2).reshape(b, s, config.n_embd)
        x = x + attn @ weights[p + "attn.c_proj.weight"].T + weights[p + "attn.c_proj.bias"]
        hidden = layer_norm(x, p + "ln_2") @ weights[p + "mlp.c_fc.weight"].T + weights[p + "mlp.c_fc.bias"]
        hidden = 0.5 * hidden * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden**3)))
        x = x + hidden @ weights[p + "mlp.c_proj.weight"].T + weights[p + "mlp.c_proj.bias"]
    return layer_norm(x, "transformer.ln_f") @ weights["transformer.wte.weight"].T


def test_model_matches_textbook_gpt2():
    model = _single_process_model()
    weights = {name: p.detach() for name, p in model.named_parameters()}
    ids = torch.randint(0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = model(ids, ForwardContext(training=False))
    torch.testing.assert_close(logits, _textbook_gpt2_logits(weights, ids, CONFIG))

    loss = model(ids[:, :-1], ForwardContext(loss_scale=1 / 30), ids[:, 1:])
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, CONFIG.vocab_size), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_parameter_names_and_shapes_are_gpt2s():
    model = _single_process_model()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    h, v = CONFIG.n_embd, CONFIG.vocab_size
    # Hugging Face stores Conv1D weights as (in, out); these are the nn.Linear transposes.
    expected = {
        "transformer.wte.weight": (v, h),
        "transformer.wpe.weight": (CONFIG.n_positions, h),
        "transformer.ln_f.weight": (h,),
        "transformer.ln_f.bias": (h,),
    }
    for i in range(CONFIG.n_layer):
        p = f"transformer.h.{i}."
        expected.update({
            p + "ln_1.weight": (h,), p + "ln_1.bias": (h,),
            p + "attn.c_attn.weight": (3 * h, h), p + "attn.c_attn.bias": (3 * h,),
            p + "attn.c_proj.weight": (h, h), p + "attn.c_proj.bias": (h,),
            p + "ln_2.weight": (h,), p + "ln_2.bias": (h,),
            p + "mlp.c_fc.weight": (4 * h, h), p + "mlp.c_fc.bias": (4 * h,),
            p + "mlp.c_proj.weight": (h, 4 * h), p + "mlp.c_proj.bias": (h,),
        })
    assert shapes == expected
    assert sum(p.numel() for p in model.parameters()) == CONFIG.num_parameters()


def test_gpt_10m_preset_has_about_10m_parameters():
    assert 9e6 < resolve_model_config("gpt-10m").num_parameters() < 12e6


def test_initialization_is_gpt2s():
    config = resolve_model_config("gpt-10m")
    std = config.initializer_range
    w = full_init("transformer.h.0.mlp.c_fc.weight", (1536, 384), config, seed=1)
    proj = full_init("transformer.h.0.mlp.c_proj.weight", (384, 1536), config, seed=1)
    assert w.std().item() == pytest.approx(std, rel=0.02)
    assert proj.std().item() == pytest.approx(std / math.sqrt(2 * config.n_layer), rel=0.02)
    assert torch.equal(full_init("transformer.h.0.ln_1.weight", (384,), config, 1), torch.ones(384))
    assert torch.equal(full_init("transformer.h.0.attn.c_attn.bias", (1152,), config, 1), torch.zeros(1152))
    other_seed = full_init("transformer.h.0.mlp.c_fc.weight", (1536, 384), config, seed=2)
    assert not torch.equal(w, other_seed)


@pytest.mark.parametrize("spec,shape", [
    (ShardSpec(dim=0), (8, 3)),
    (ShardSpec(dim=1), (3, 8)),
    (ShardSpec(dim=0, blocks=3), (24, 5)),
    (ShardSpec(dim=0, full_size=7), (7, 4)),
])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_unshard_round_trip(spec, shape, tp):
    full = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    slices = [shard(full, spec, rank, tp) for rank in range(tp)]
    assert len({tuple(s.shape) for s in slices}) == 1, "every rank's slice has the same shape"
    assert torch.equal(unshard(slices, spec), full)


def test_fused_qkv_shard_keeps_heads_together():
    # Rows: 4 query rows, 4 key rows, 4 value rows; two heads of width 2.
    full = torch.arange(12).reshape(12, 1)
    first = shard(full, ShardSpec(dim=0, blocks=3), 0, 2).flatten().tolist()
    assert first == [0, 1, 4, 5, 8, 9], "rank 0 holds Q, K and V rows of head 0 only"


def test_padded_vocabulary_rows_are_zero():
    spec = ShardSpec(dim=0, full_size=61)
    full = torch.ones(61, 3)
    last = shard(full, spec, 3, 4)  # rows 48..63 of the padded 64
    assert last.shape == (16, 3)
    assert torch.equal(last[13:], torch.zeros(3, 3))


def test_layout_free_init_slices_the_same_weights():
    config = CONFIG
    reference = dict(named_parameters({0: _single_process_model(config, seed=3)}))
    for tp in (2, 4):
        slices: dict[str, list] = {}
        for rank in range(tp):
            mesh_tp = _fake_tp_group(rank, tp)
            chunks = build_chunks(config, mesh_tp, [0, 1], partition_layers(config.n_layer, 2),
                                  dtype=torch.float64)
            initialize(chunks, config, 3, mesh_tp)
            for name, param in named_parameters(chunks):
                slices.setdefault(name, []).append(param.detach())
                assert full_shape(param, tp) == tuple(reference[name].shape), name
        for name, parts in slices.items():
            spec = getattr(dict(named_parameters(chunks))[name], "tp_shard", None)
            assert torch.equal(unshard(parts, spec), reference[name].detach()), name


def _fake_tp_group(rank: int, size: int):
    """A TP group object for building layers without communicating (no forward is run)."""
    from parallel.mesh import Group

    return Group("tp", list(range(size)), rank, pg=None)
