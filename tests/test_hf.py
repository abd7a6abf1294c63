"""Hugging Face GPT-2 weights in and out.

The tests build a GPT-2 state dict in Hugging Face's names and Conv1D layout, with the
attention-mask buffers of older checkpoints and the tied `lm_head.weight`. They compare the
imported model's logits with a GPT-2 forward pass written here directly against that layout.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from model.config import GPTConfig
from model.hf import HFFormatError, config_from_hf, from_hf_state_dict, read_hf_folder
from parallel.mesh import Layout
from tests.helpers import make_trainer, run_job
from training import checkpoint
from training.convert_cli import main as convert_main
from training.generate import Decoder
from training.resume import init_from

# An odd vocabulary (padded under tp > 1) and an explicit MLP size.
ODD = {"model_type": "gpt2", "vocab_size": 53, "n_positions": 16, "n_embd": 32, "n_layer": 2,
       "n_head": 4, "n_inner": 48, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
       "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
# The tests' `tiny` model preset, so that the trainer of tests.helpers can start from it.
TINY = {"model_type": "gpt2", "vocab_size": 256, "n_positions": 32, "n_embd": 32, "n_layer": 4,
        "n_head": 4, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def hf_state_dict(hf: dict, seed: int = 0, prefix: str = "transformer.") -> dict:
    """Return random GPT-2 weights in Hugging Face's names and Conv1D (in, out) layout."""
    g = torch.Generator().manual_seed(seed)
    h, v, n = hf["n_embd"], hf["vocab_size"], hf["n_positions"]
    inner = hf["n_inner"] or 4 * h

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    state = {f"{prefix}wte.weight": rand(v, h), f"{prefix}wpe.weight": rand(n, h)}
    for i in range(hf["n_layer"]):
        p = f"{prefix}h.{i}."
        state.update({
            p + "ln_1.weight": 1 + rand(h), p + "ln_1.bias": rand(h),
            p + "attn.c_attn.weight": rand(h, 3 * h), p + "attn.c_attn.bias": rand(3 * h),
            p + "attn.c_proj.weight": rand(h, h), p + "attn.c_proj.bias": rand(h),
            p + "ln_2.weight": 1 + rand(h), p + "ln_2.bias": rand(h),
            p + "mlp.c_fc.weight": rand(h, inner), p + "mlp.c_fc.bias": rand(inner),
            p + "mlp.c_proj.weight": rand(inner, h), p + "mlp.c_proj.bias": rand(h),
            # Buffers that older checkpoints carry: the causal mask and the masked score.
            p + "attn.bias": torch.ones(n, n).tril().view(1, 1, n, n),
            p + "attn.masked_bias": torch.tensor(-1e4),
        })
    state[f"{prefix}ln_f.weight"] = 1 + rand(h)
    state[f"{prefix}ln_f.bias"] = rand(h)
    if prefix:
        state["lm_head.weight"] = state[f"{prefix}wte.weight"]
    return state


def reference_logits(hf_state: dict, hf: dict, ids: torch.Tensor) -> torch.Tensor:
    """GPT-2's forward pass on Hugging Face weights, in float64: Conv1D computes x @ W + b."""
    w = {k.removeprefix("transformer."): t.double() for k, t in hf_state.items()}
    h, nh, eps = hf["n_embd"], hf["n_head"], hf["layer_norm_epsilon"]
    hd = h // nh
    b, s = ids.shape

    def layer_norm(x, name):
        return F.layer_norm(x, (h,), w[name + ".weight"], w[name + ".bias"], eps)

    def conv1d(x, name):
        return x @ w[name + ".weight"] + w[name + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))

    x = w["wte.weight"][ids] + w["wpe.weight"][:s]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(hf["n_layer"]):
        p = f"h.{i}."
        q, k, v = conv1d(layer_norm(x, p + "ln_1"), p + "attn.c_attn").split(h, dim=-1)
        q, k, v = (t.view(b, s, nh, hd).transpose(1, 2) for t in (q, k, v))  # (b, nh, s, hd)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, h)
        x = x + conv1d(y, p + "attn.c_proj")
        x = x + conv1d(gelu_new(conv1d(layer_norm(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return layer_norm(x, "ln_f") @ w["wte.weight"].t()


def write_hf_folder(folder, hf: dict, state: dict, fmt: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        # safetensors stores no shared tensors, so the tied head is left out, as Hugging Face does.
        save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"},
                  folder / "model.safetensors")
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


def _probe(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_import_matches_reference_logits(tmp_path, fmt):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    hf_state = hf_state_dict(ODD)
    source = write_hf_folder(tmp_path / "hf", ODD, hf_state, fmt)
    assert convert_main(["import", str(source), str(tmp_path / "ckpt")]) == 0

    ckpt = checkpoint.load(tmp_path / "ckpt")
    assert ckpt.step == 0
    assert ckpt.optimizer is None
    config = GPTConfig.from_dict(ckpt.meta["model"])
    assert config.vocab_size == 53
    assert config.ffn_size == 48
    assert config.dropout == 0.1
    decoder = Decoder.single_process(config, ckpt.model, dtype=torch.float64)
    ids = _probe(53)
    torch.testing.assert_close(decoder.logits(ids), reference_logits(hf_state, ODD, ids),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_export_then_import_is_exact(tmp_path, fmt):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    hf_state = hf_state_dict(ODD)
    write_hf_folder(tmp_path / "hf", ODD, hf_state, "bin")
    assert convert_main(["import", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    assert convert_main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--format", fmt]) == 0

    exported_file = tmp_path / "out" / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    if fmt == "safetensors":
        from safetensors.torch import load_file

        exported = load_file(exported_file)
    else:
        exported = torch.load(exported_file, weights_only=True)
    weights = {k: v for k, v in hf_state.items() if k != "lm_head.weight" and not k.endswith(
        (".attn.bias", ".attn.masked_bias"))}
    assert sorted(exported) == sorted(weights)
    for name, tensor in weights.items():
        assert torch.equal(exported[name], tensor), f"{name} changed on the way out"

    config, again = read_hf_folder(tmp_path / "out")
    assert config.to_dict() == GPTConfig.from_dict(checkpoint.read_meta(tmp_path / "ckpt")["model"]).to_dict()
    first = checkpoint.load(tmp_path / "ckpt").model
    assert sorted(again) == sorted(first)
    for name in first:
        assert torch.equal(again[name], first[name]), f"{name} changed on re-import"


def test_base_model_names_import(tmp_path):
    with_prefix = from_hf_state_dict(hf_state_dict(ODD), config_from_hf(ODD))
    without = from_hf_state_dict(hf_state_dict(ODD, prefix=""), config_from_hf(ODD))
    assert sorted(with_prefix) == sorted(without)
    for name in with_prefix:
        assert torch.equal(with_prefix[name], without[name]), name


def test_untied_head_rejected():
    state = hf_state_dict(ODD)
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    with pytest.raises(HFFormatError, match="lm_head.weight differs"):
        from_hf_state_dict(state, config_from_hf(ODD))


def test_mismatched_state_rejected():
    state = hf_state_dict(ODD)
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.0.attn.c_attn.weight"] = state["transformer.h.0.attn.c_attn.weight"].t()
    state["transformer.extra.weight"] = torch.zeros(1)
    with pytest.raises(HFFormatError) as error:
        from_hf_state_dict(state, config_from_hf(ODD))
    message = str(error.value)
    assert "transformer.h.1.mlp.c_fc.bias" in message
    assert "transformer.extra.weight" in message
    assert "transformer.h.0.attn.c_attn.weight" in message


def test_unsupported_config_rejected(tmp_path):
    with pytest.raises(HFFormatError, match="activation_function='gelu'"):
        config_from_hf({**ODD, "activation_function": "gelu"})
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(ODD))
    assert convert_main(["import", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 2


def _start_from_import_job(rank, world_size, overrides, folder):
    trainer = make_trainer(rank, overrides)
    init_from(trainer, trainer.config, folder)
    logits = Decoder.from_trainer(trainer).logits(_probe(256))
    loss = trainer.train_step().loss
    return {"logits": logits, "loss": loss, "step": trainer.step}


def test_training_starts_from_import_in_any_layout(tmp_path):
    hf_state = hf_state_dict(TINY, seed=3)
    write_hf_folder(tmp_path / "hf", TINY, hf_state, "bin")
    assert convert_main(["import", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    expected = reference_logits(hf_state, TINY, _probe(256))

    losses = {}
    for tp, pp in [(1, 1), (2, 2)]:
        overrides = {"layout.tp": tp, "layout.pp": pp, "layout.micro_batches": 2 * pp}
        results = run_job(_start_from_import_job, Layout(tp=tp, pp=pp), overrides,
                          str(tmp_path / "ckpt"))
        logits = [r["logits"] for r in results if r["logits"] is not None]
        assert len(logits) == tp
        for rank_logits in logits:
            torch.testing.assert_close(rank_logits, expected, rtol=1e-10, atol=1e-10)
        assert all(r["step"] == 1 for r in results)
        losses[(tp, pp)] = results[0]["loss"]
    assert losses[(2, 2)] == pytest.approx(losses[(1, 1)], rel=1e-10)
