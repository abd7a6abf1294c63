"""GPT-2's byte-level BPE tokenizer, read from a Hugging Face folder's vocab.json and merges.txt.

Encoding first splits the text into pieces with GPT-2's pattern: contractions, runs of letters,
runs of digits, runs of other symbols, and whitespace. Each piece's UTF-8 bytes become printable
characters through GPT-2's byte-to-character table. Adjacent symbols are then merged by rank,
lowest first, as merges.txt lists them. Decoding maps characters back to bytes.

GPT-2's pattern uses the Unicode classes \\p{L} and \\p{N}, which the optional `regex` package
supports. Without it, Python's `re` stands in with [^\\W\\d_] for letters and \\d for digits.
NOTE: that fallback also counts non-decimal numerals (such as '²' or '½') as letters, so text
containing them may split into different tokens than GPT-2's tokenizer produces.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

try:
    import regex
except ImportError:
    regex = None


def split_pattern(module=None):
    """Return GPT-2's pattern that splits text into pieces, compiled with `regex` when it is
    installed (or passed), else with Python's `re` and the stand-ins for \\p{L} and \\p{N}."""
    module = module or regex or re
    letter, digit = (r"\p{L}", r"\p{N}") if module is regex else (r"[^\W\d_]", r"\d")
    return module.compile(
        rf"""'s|'t|'re|'ve|'m|'ll|'d| ?{letter}+| ?{digit}+| ?(?:(?!{letter}|{digit})[^\s])+|\s+(?!\S)|\s+"""
    )


VOCAB = "vocab.json"
MERGES = "merges.txt"


def byte_to_char() -> dict[int, str]:
    """Return GPT-2's map from each byte to a printable character.

    Bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') map to
    themselves. The other 68 bytes map, in byte order, to the characters from U+0100 on.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


class GPT2Tokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pattern=None):
        self.pattern = pattern or split_pattern()
        self.vocab = vocab
        self.id_to_token = {i: token for token, i in vocab.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_to_char = byte_to_char()
        self.char_to_byte = {c: b for b, c in self.byte_to_char.items()}
        self.vocab_size = max(vocab.values()) + 1
        self._bpe = lru_cache(maxsize=65536)(self._merge)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "GPT2Tokenizer":
        folder = Path(folder)
        for name in (VOCAB, MERGES):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} not found; a GPT-2 tokenizer needs "
                                        f"{VOCAB} and {MERGES}")
        vocab = json.loads((folder / VOCAB).read_text(encoding="utf-8"))
        lines = (folder / MERGES).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        bad = [line for line in merges if len(line) != 2]
        if bad:
            raise ValueError(f"{folder / MERGES}: expected two symbols per line, found {bad[:3]}")
        return cls(vocab, merges)

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.findall(text):
            chars = "".join(self.byte_to_char[b] for b in piece.encode("utf-8"))
            for token in self._bpe(chars):
                if token not in self.vocab:
                    raise ValueError(f"the symbol {token!r} of {piece!r} is not in {VOCAB}")
                ids.append(self.vocab[token])
        return ids

    def decode_bytes(self, ids) -> bytes:
        """Return the UTF-8 bytes of token ids; ids outside the vocabulary are skipped."""
        chars = "".join(self.id_to_token.get(int(i), "") for i in ids)
        return bytes(self.char_to_byte[c] for c in chars if c in self.char_to_byte)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _merge(self, chars: str) -> tuple[str, ...]:
        """Apply the merges to one piece: each round merges every occurrence, left to right, of
        the adjacent pair with the lowest rank."""
        symbols = list(chars)
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)
