"""GPT-2's byte-level BPE tokenizer, and GPT-2 tokenizer files carried through convert and
generate."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_hf import TINY, hf_state_dict, write_hf_folder
from training import checkpoint
from training.bpe import GPT2Tokenizer, byte_to_char, split_pattern
from training.convert_cli import main as convert_main

REPO = Path(__file__).resolve().parent.parent
MERGES = [("h", "e"), ("t", "he"), ("Ġ", "c"), ("Ġc", "a"), ("a", "a")]


def _tokenizer_files(folder: Path) -> Path:
    """Write a GPT-2 style vocab.json (every byte, then each merge) and merges.txt."""
    chars = byte_to_char()
    vocab = {chars[b]: b for b in range(256)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in MERGES]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_byte_table_is_a_bijection():
    table = byte_to_char()
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A"
    assert table[ord(" ")] == "Ġ"  # bytes 0..32 are not printable and map to U+0100..U+0120
    assert table[0] == "Ā"


def test_merges_apply_by_rank(tmp_path):
    tokenizer = GPT2Tokenizer.from_folder(_tokenizer_files(tmp_path))
    vocab = tokenizer.vocab
    assert tokenizer.encode("the cat") == [vocab["the"], vocab["Ġca"], vocab["t"]]
    # "aaaa" merges both pairs in one round, left to right; "aaa" leaves the last 'a' alone.
    assert tokenizer.encode("aaaa") == [vocab["aa"], vocab["aa"]]
    assert tokenizer.encode("aaa") == [vocab["aa"], vocab["a"]]


@pytest.mark.parametrize("backend", ["re", "regex"])
def test_round_trip_any_text(tmp_path, backend):
    module = re if backend == "re" else pytest.importorskip("regex")
    tokenizer = GPT2Tokenizer.from_folder(_tokenizer_files(tmp_path))
    tokenizer.pattern = split_pattern(module)
    text = "The cat's 2 naïve cafés –  東京\n\n\tend!! "
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert split_pattern(module).findall("Hello world's  2024 numbers!!  ok") == [
        "Hello", " world", "'s", " ", " 2024", " numbers", "!!", " ", " ok"]


def test_missing_files_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json not found"):
        GPT2Tokenizer.from_folder(tmp_path)


def test_convert_and_generate_use_tokenizer(tmp_path):
    hf = {**TINY, "vocab_size": 256 + len(MERGES)}
    source = write_hf_folder(tmp_path / "hf", hf, hf_state_dict(hf, seed=2), "bin")
    _tokenizer_files(source)
    assert convert_main(["import", str(source), str(tmp_path / "ckpt")]) == 0
    meta = checkpoint.read_meta(tmp_path / "ckpt")
    assert meta["tokenizer"] == "gpt2-bpe"
    assert {"vocab.json", "merges.txt"} <= set(meta["files"])

    assert convert_main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--format", "bin"]) == 0
    assert (tmp_path / "out" / "merges.txt").read_bytes() == (source / "merges.txt").read_bytes()

    done = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), str(tmp_path / "ckpt"),
                           "--prompt", "the cat", "--greedy", "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("the cat")
