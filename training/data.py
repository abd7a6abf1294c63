"""Corpora, the byte-level tokenizer, and deterministic batches.

A batch depends only on (seed, step): every rank draws the same global batch and takes its own
slice, so the data never depends on the layout, and resuming at step k needs no loader state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def default_corpus_text() -> str:
    """Return the English documentation topics that every CPython installation ships."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[name] for name in sorted(topics.topics))


@dataclass
class Corpus:
    tokens: np.ndarray  # token ids, uint16
    description: str
    tokenized_bytes: bool  # True when the ids are bytes that ByteTokenizer can decode


def load_corpus(path: str | None) -> Corpus:
    """Load a corpus: None for the default, a text file, a folder of text files, or a .bin file
    of uint16 token ids (the format of nanoGPT's and Megatron's prepared data)."""
    tokenizer = ByteTokenizer()
    if path is None:
        text = default_corpus_text()
        return Corpus(tokenizer.encode(text), f"pydoc_data topics ({len(text):,} characters)", True)

    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"data path {path!r} does not exist; pass a text file, a folder "
                                f"of text files, or a .bin file of uint16 token ids")
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"data folder {path!r} contains no files")
        text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
        return Corpus(tokenizer.encode(text), f"{len(files)} files in {path}", True)
    if source.suffix == ".bin":
        tokens = np.fromfile(source, dtype=np.uint16)
        return Corpus(tokens, f"{path} ({len(tokens):,} uint16 token ids)", False)
    text = source.read_text(encoding="utf-8", errors="replace")
    return Corpus(tokenizer.encode(text), f"{path} ({len(text):,} characters)", True)


class TokenBatches:
    """Training and held-out batches of (inputs, targets), each (batch, seq_len) int64."""

    def __init__(self, tokens: np.ndarray, seq_len: int, val_fraction: float, seed: int):
        self.seq_len = seq_len
        self.seed = seed
        split = int(len(tokens) * (1.0 - val_fraction))
        self.train_tokens = torch.from_numpy(tokens[:split].astype(np.int64))
        self.val_tokens = torch.from_numpy(tokens[split:].astype(np.int64))
        needed = seq_len + 1
        for name, part in (("training", self.train_tokens), ("validation", self.val_tokens)):
            if len(part) < needed:
                raise ValueError(
                    f"the corpus has {len(tokens):,} tokens, so its {name} split has {len(part):,}, "
                    f"fewer than one sequence of seq_len + 1 = {needed}; use a longer corpus, a "
                    f"shorter train.seq_len, or a different data.val_fraction"
                )

    def train_batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the global training batch of `step`: random windows drawn from (seed, step)."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.train_tokens) - self.seq_len, size=batch_size)
        return self._windows(self.train_tokens, starts)

    def val_batch(self, index: int, num_batches: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return held-out batch `index` of `num_batches`: evenly spaced windows that together
        cover the validation split."""
        count = num_batches * batch_size
        last_start = len(self.val_tokens) - self.seq_len - 1
        starts = np.linspace(0, last_start, count).round().astype(np.int64)
        return self._windows(self.val_tokens, starts[index * batch_size:(index + 1) * batch_size])

    def _windows(self, tokens: torch.Tensor, starts) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.arange(self.seq_len + 1)
        windows = tokens[torch.as_tensor(starts).unsqueeze(1) + offsets]
        return windows[:, :-1], windows[:, 1:]


def unigram_entropy(tokens: np.ndarray) -> float:
    """Return the entropy in nats of the corpus's token frequencies (the loss of the best model
    that ignores context)."""
    counts = np.bincount(tokens.astype(np.int64)).astype(np.float64)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())
