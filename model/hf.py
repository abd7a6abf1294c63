"""Hugging Face GPT-2 weights: map names and layouts to and from microtron's full state.

microtron's parameter names already are those of Hugging Face's GPT2LMHeadModel
(`transformer.h.3.attn.c_attn.weight`, ...). Two things differ:

  - Hugging Face's GPT-2 uses Conv1D layers, whose weight is (in_features, out_features), the
    transpose of nn.Linear's (out_features, in_features) used here. That applies to
    `attn.c_attn`, `attn.c_proj`, `mlp.c_fc` and `mlp.c_proj`. The fused QKV needs nothing
    more: both stack all query heads, then all key heads, then all value heads.
  - `lm_head.weight` is tied to `transformer.wte.weight` here and is not stored. Checkpoints of
    the base GPT2Model name parameters without the `transformer.` prefix, and older ones also
    carry the attention-mask buffers `attn.bias` and `attn.masked_bias`, which hold no weights.

A Hugging Face folder contains `config.json` and `model.safetensors` (needs the optional
`safetensors` package) or `pytorch_model.bin` (read with weights-only unpickling).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from model.build import full_parameter_shapes
from model.config import GPTConfig

CONV1D_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
SAFETENSORS = "model.safetensors"
PYTORCH_BIN = "pytorch_model.bin"
_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")


class HFFormatError(ValueError):
    """A Hugging Face folder, config or state dict that cannot be mapped onto this GPT."""


# ----------------------------------------------------------------------------------------------
# Config


def config_from_hf(hf: dict) -> GPTConfig:
    """Return the GPTConfig of a Hugging Face GPT-2 config.json, rejecting unsupported variants."""
    problems = []
    if hf.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model_type={hf.get('model_type')!r} is not 'gpt2'")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function={activation!r}: this GPT uses the tanh approximation "
                        f"of GELU ('gelu_new')")
    for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                           ("add_cross_attention", False), ("tie_word_embeddings", True)):
        if hf.get(key, supported) != supported:
            problems.append(f"{key}={hf[key]!r} is not supported (only {supported})")
    if problems:
        raise HFFormatError("unsupported GPT-2 config: " + "; ".join(problems))

    dropouts = {hf.get(key, 0.1) for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        n_positions=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_embd=hf["n_embd"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_inner=hf.get("n_inner"),
        # One probability serves all three dropout sites here; GPT-2 uses the same for each.
        dropout=max(dropouts),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        initializer_range=hf.get("initializer_range", 0.02),
    )


def config_to_hf(config: GPTConfig) -> dict:
    """Return a Hugging Face GPT-2 config.json for `config`."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_ctx": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": config.initializer_range,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
    }


# ----------------------------------------------------------------------------------------------
# State dicts


def _is_conv1d(name: str) -> bool:
    return name.endswith(".weight") and any(f".{layer}." in name for layer in CONV1D_LAYERS)


def from_hf_state_dict(hf_state: dict, config: GPTConfig) -> dict:
    """Return microtron's full state from a Hugging Face GPT-2 state dict.

    Raises HFFormatError when a parameter is missing, unknown, of the wrong shape, or when
    `lm_head.weight` differs from the token embedding (this model ties them).
    """
    expected = full_parameter_shapes(config)
    state, unknown = {}, []
    head = None
    for hf_name, tensor in hf_state.items():
        if _BUFFER.search(hf_name):
            continue  # causal-mask buffers, not weights
        if hf_name == "lm_head.weight":
            head = tensor
            continue
        name = hf_name if hf_name.startswith("transformer.") else f"transformer.{hf_name}"
        if name not in expected:
            unknown.append(hf_name)
            continue
        state[name] = tensor.t().contiguous() if _is_conv1d(name) else tensor.contiguous()

    missing = sorted(set(expected) - set(state))
    wrong = [f"{name}: {tuple(state[name].shape)} (after transposing Conv1D weights) instead of "
             f"{shape}" for name, shape in expected.items()
             if name in state and tuple(state[name].shape) != shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing parameter(s), such as {missing[:3]}")
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s), such as {unknown[:3]}")
    if wrong:
        problems.append(f"{len(wrong)} of the wrong shape, such as {wrong[:3]}")
    if problems:
        raise HFFormatError("the state dict does not match the GPT-2 of its config: " + "; ".join(problems))
    if head is not None and not torch.equal(head, state["transformer.wte.weight"]):
        raise HFFormatError("lm_head.weight differs from transformer.wte.weight, but this GPT ties "
                            "the LM head to the token embedding")
    return state


def to_hf_state_dict(state: dict) -> dict:
    """Return a Hugging Face GPT2LMHeadModel state dict (without the tied lm_head.weight)."""
    return {name: (tensor.t() if _is_conv1d(name) else tensor).contiguous().clone()
            for name, tensor in state.items()}


# ----------------------------------------------------------------------------------------------
# Folders


def read_hf_folder(folder: str | Path) -> tuple[GPTConfig, dict]:
    """Return (config, microtron full state) of a local Hugging Face GPT-2 folder."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise HFFormatError(f"{config_path} not found; a Hugging Face model folder has config.json "
                            f"next to {SAFETENSORS} or {PYTORCH_BIN}")
    try:
        config = config_from_hf(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, KeyError) as error:
        raise HFFormatError(f"{config_path} is not a GPT-2 config ({type(error).__name__}: {error})") from None
    return config, from_hf_state_dict(_read_weights(folder), config)


def _read_weights(folder: Path) -> dict:
    if (folder / SAFETENSORS).is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise HFFormatError(f"reading {folder / SAFETENSORS} needs the safetensors package: "
                                f"pip install safetensors (the 'hf' extra)") from None
        return load_file(folder / SAFETENSORS)
    if (folder / PYTORCH_BIN).is_file():
        try:
            return torch.load(folder / PYTORCH_BIN, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for damaged or unsafe files
            raise HFFormatError(f"{folder / PYTORCH_BIN} cannot be read as a weights-only tensor "
                                f"file ({type(error).__name__}: {error})") from None
    raise HFFormatError(f"{folder} has neither {SAFETENSORS} nor {PYTORCH_BIN}; sharded "
                        f"checkpoints (*.index.json) are not supported")


def write_hf_folder(folder: str | Path, config: GPTConfig, state: dict, fmt: str = "safetensors") -> Path:
    """Write config.json and the weights in `fmt` (safetensors or bin); return the weights path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_state = to_hf_state_dict(state)
    (folder / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
    if fmt == "safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise HFFormatError("writing safetensors needs the safetensors package: pip install "
                                "safetensors (the 'hf' extra), or export with format 'bin'") from None
        path = folder / SAFETENSORS
        save_file(hf_state, path, metadata={"format": "pt"})
    elif fmt == "bin":
        path = folder / PYTORCH_BIN
        torch.save(hf_state, path)
    else:
        raise HFFormatError(f"export format {fmt!r} is unknown; use 'safetensors' or 'bin'")
    return path
