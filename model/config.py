"""The GPT model configuration.

Field names follow Hugging Face's GPT2Config where one exists, so that a config.json of a GPT-2
checkpoint maps onto this class field for field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256  # 256 for the byte-level tokenizer, 50257 for GPT-2's BPE
    n_positions: int = 128  # maximum sequence length (learned position embeddings)
    n_embd: int = 128  # hidden size h
    n_layer: int = 4
    n_head: int = 4
    n_inner: int | None = None  # MLP hidden size; None means 4 * n_embd, as in GPT-2
    dropout: float = 0.0  # on embeddings, attention probabilities and both residual branches
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02  # std of the normal init; output projections get less

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.n_embd % self.n_head != 0:
            problems.append(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                f"(each head has n_embd / n_head dims)"
            )
        if self.n_inner is not None and self.n_inner < 1:
            problems.append(f"n_inner={self.n_inner} must be at least 1, or null for 4 * n_embd")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def ffn_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_parameters(self) -> int:
        """Return the parameter count, with the tied LM head counted once."""
        h, f, layers = self.n_embd, self.ffn_size, self.n_layer
        per_layer = (
            2 * 2 * h  # two LayerNorms
            + 3 * h * h + 3 * h  # fused QKV
            + h * h + h  # attention output projection
            + h * f + f + f * h + h  # MLP
        )
        return self.vocab_size * h + self.n_positions * h + layers * per_layer + 2 * h

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown model config key(s) {unknown}; valid keys are {sorted(known)}"
            )
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_model_config(spec) -> GPTConfig:
    """Build a GPTConfig from a mapping, a preset name in configs/models, or a YAML path."""
    if isinstance(spec, GPTConfig):
        return spec
    if isinstance(spec, dict):
        return GPTConfig.from_dict(spec)
    path = Path(spec)
    if not path.suffix:
        path = CONFIG_DIR / "models" / f"{spec}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml"))
        raise FileNotFoundError(
            f"model config {spec!r} not found (looked for {path}); use a YAML path or one of "
            f"the presets {presets}"
        )
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    return GPTConfig.from_dict(values)
