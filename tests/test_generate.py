"""Generation with a KV cache, in any tp x pp layout, and the scripts/generate.py command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.build import full_init, full_parameter_shapes
from model.config import GPTConfig, resolve_model_config
from model.kv_cache import KVCache
from parallel.mesh import Layout, Mesh
from tests.helpers import run_job
from training import checkpoint
from training.generate import Decoder, SamplingConfig, check_prompt, generate, sample_next

REPO = Path(__file__).resolve().parent.parent
PROMPT = [84, 104, 101, 32, 99]  # "The c"


def _weights(config: GPTConfig, std: float = 0.02, seed: int = 5) -> dict:
    """Random full weights. A large `std` gives peaked logits, far from ties between tokens."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in full_parameter_shapes(config).items():
        state[name] = full_init(name, shape, config, seed) if "ln" in name else torch.randn(
            shape, generator=g) * std
    return state


@pytest.fixture(scope="module")
def tiny():
    return resolve_model_config("tiny")


def test_kv_cache_matches_recompute(tiny):
    decoder = Decoder.single_process(tiny, _weights(tiny, std=0.3), dtype=torch.float64)
    cache = KVCache(tiny.n_positions)
    ids, position, inputs = list(PROMPT), 0, list(PROMPT)
    for _ in range(20):
        cached = decoder.next_logits(inputs, position, cache)
        recomputed = decoder.logits(torch.tensor([ids]))[0, -1]
        torch.testing.assert_close(cached, recomputed, rtol=1e-12, atol=1e-12)
        token = int(cached.argmax())
        position += len(inputs)
        inputs = [token]
        ids.append(token)


def test_kv_cache_prefill_in_pieces(tiny):
    decoder = Decoder.single_process(tiny, _weights(tiny, std=0.3), dtype=torch.float64)
    ids = list(range(40, 49))
    cache = KVCache(tiny.n_positions)
    decoder.next_logits(ids[:5], 0, cache)
    pieces = decoder.next_logits(ids[5:], 5, cache)
    whole = decoder.next_logits(ids, 0, KVCache(tiny.n_positions))
    torch.testing.assert_close(pieces, whole, rtol=1e-12, atol=1e-12)


def test_long_prompt_rejected(tiny):
    with pytest.raises(ValueError, match="the prompt has 33 tokens, more than the model's context"):
        check_prompt([1] * 33, tiny)
    with pytest.raises(ValueError, match="the prompt is empty"):
        check_prompt([], tiny)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        check_prompt([1, 256], tiny)
    decoder = Decoder.single_process(tiny, _weights(tiny))
    with pytest.raises(ValueError, match="more than the model's context"):
        list(generate(decoder, [1] * 33, 5))


def test_window_slides_past_context(tiny):
    decoder = Decoder.single_process(tiny, _weights(tiny, std=0.3), dtype=torch.float64)
    prompt = [7, 40, 41] * 10
    tokens = list(generate(decoder, prompt, 12, SamplingConfig(temperature=0.0)))
    assert len(tokens) == 12

    ids, expected = list(prompt), []
    for _ in range(12):
        window = torch.tensor([ids[-tiny.n_positions:]])
        expected.append(int(decoder.logits(window)[0, -1].argmax()))
        ids.append(expected[-1])
    assert tokens == expected


def test_sampling_settings():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, -1.0])
    greedy = sample_next(logits, SamplingConfig(temperature=0.0), None)
    assert greedy == 1
    for _ in range(20):
        g = torch.Generator().manual_seed(_)
        assert sample_next(logits, SamplingConfig(temperature=1.0, top_k=1), g) == 1
        assert sample_next(logits, SamplingConfig(temperature=1.0, top_k=0, top_p=1e-6), g) == 1
        assert sample_next(logits, SamplingConfig(temperature=5.0, top_k=2), g) in (1, 3)
    draws = [sample_next(logits, SamplingConfig(temperature=1.0, top_k=0), torch.Generator().manual_seed(s))
             for s in range(50)]
    assert len(set(draws)) > 2, "sampling at temperature 1 should reach more than the top two"
    with pytest.raises(ValueError, match="temperature=-1"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="top_p=0"):
        SamplingConfig(top_p=0)


def test_sampling_is_seeded(tiny):
    decoder = Decoder.single_process(tiny, _weights(tiny, std=0.3))
    settings = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9, seed=11)
    first = list(generate(decoder, PROMPT, 15, settings))
    again = list(generate(decoder, PROMPT, 15, settings))
    other = list(generate(decoder, PROMPT, 15, SamplingConfig(temperature=1.0, top_k=20, top_p=0.9, seed=12)))
    assert first == again
    assert first != other


def _layout_job(rank, world_size, tp, pp, config_dict, weights, sampling):
    config = GPTConfig.from_dict(config_dict)
    decoder = Decoder.load(config, weights, Mesh(Layout(tp=tp, pp=pp), rank), torch.float32)
    return list(generate(decoder, PROMPT, 24, sampling))


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (4, 1), (2, 2)], ids=["tp2", "pp2", "tp4", "tp2-pp2"])
def test_generation_same_in_every_layout(tiny, tp, pp):
    weights = _weights(tiny, std=0.3)
    greedy = SamplingConfig(temperature=0.0)
    sampled = SamplingConfig(temperature=0.9, top_k=30, top_p=0.95, seed=4)
    single = Decoder.single_process(tiny, weights)
    expected_greedy = list(generate(single, PROMPT, 24, greedy))
    expected_sampled = list(generate(single, PROMPT, 24, sampled))

    for sampling, expected in ((greedy, expected_greedy), (sampled, expected_sampled)):
        results = run_job(_layout_job, Layout(tp=tp, pp=pp), tp, pp, tiny.to_dict(), weights, sampling)
        for rank, tokens in enumerate(results):
            assert tokens == expected, f"rank {rank}, temperature {sampling.temperature}"


# ----------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("generate") / "run"
    checkpoint.save(folder, 5, _weights(tiny, std=0.3), meta={"model": tiny.to_dict(),
                                                              "tokenizer": "bytes"})
    return folder


def _generate_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), *args],
                          capture_output=True, text=True, timeout=180)


def test_command_same_text_under_tp2(saved_checkpoint):
    outputs = {}
    for tp in ("1", "2"):
        done = _generate_cli(str(saved_checkpoint), "--prompt", "The c", "--greedy",
                             "--max-new-tokens", "20", "--tp", tp)
        assert done.returncode == 0, done.stderr
        outputs[tp] = done.stdout
    assert outputs["1"].startswith("The c")
    assert len(outputs["1"].encode("utf-8", errors="surrogateescape")) > len("The c")
    assert outputs["2"] == outputs["1"]


def test_command_rejects_long_prompt(saved_checkpoint):
    done = _generate_cli(str(saved_checkpoint), "--prompt", "x" * 40)
    assert done.returncode == 2
    assert "the prompt has 40 tokens, more than the model's context of n_positions=32" in done.stderr
    assert done.stdout == ""


def test_command_rejects_bad_layout(saved_checkpoint):
    done = _generate_cli(str(saved_checkpoint), "--tp", "3")
    assert done.returncode == 2
    assert "n_head=4 is not divisible by tp=3" in done.stderr
