"""The `scripts/convert.py` command: Hugging Face GPT-2 folders to checkpoints and back.

    convert.py import HF_FOLDER OUT       writes OUT/step-0000000, a checkpoint without optimizer
                                          state, and points OUT/latest at it
    convert.py export CHECKPOINT FOLDER   writes config.json and model.safetensors (or
                                          pytorch_model.bin with --format bin) into FOLDER

An imported checkpoint starts training in any layout with `scripts/train.py --init-from OUT`
and generates text with `scripts/generate.py OUT`.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from model.config import GPTConfig
from model.hf import HFFormatError, read_hf_folder, write_hf_folder
from training import checkpoint
from training.bpe import MERGES, VOCAB
from training.checkpoint import CheckpointError
from training.progress import configure_logging

log = logging.getLogger("microtron")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="convert.py", description="Convert between Hugging Face GPT-2 folders and microtron "
                                       "checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="Hugging Face GPT-2 folder -> checkpoint")
    imp.add_argument("source", help="folder with config.json and model.safetensors or pytorch_model.bin")
    imp.add_argument("out", help="run folder to write the checkpoint into")
    exp = commands.add_parser("export", help="checkpoint -> Hugging Face GPT-2 folder")
    exp.add_argument("source", help="checkpoint folder, or run folder with a 'latest' file")
    exp.add_argument("out", help="folder to write config.json and the weights into")
    exp.add_argument("--format", choices=["safetensors", "bin"], default="safetensors",
                     help="weights file: model.safetensors (default) or pytorch_model.bin")
    return parser.parse_args(argv)


def import_hf(source, out) -> Path:
    """Write the weights of a Hugging Face GPT-2 folder as a step-0 checkpoint; return its path.

    The GPT-2 tokenizer files (vocab.json and merges.txt) are copied along when the folder has
    both.
    """
    config, state = read_hf_folder(source)
    source = Path(source)
    tokenizer_files = {name: (source / name).read_bytes() for name in (VOCAB, MERGES)
                       if (source / name).is_file()}
    if len(tokenizer_files) < 2:
        tokenizer_files = {}
    meta = {"model": config.to_dict(), "layout": None, "dtype": _dtype_name(state),
            "imported_from": str(source), "tokenizer": "gpt2-bpe" if tokenizer_files else None}
    return checkpoint.save(out, 0, state, meta=meta, extra_files=tokenizer_files)


def export_hf(source, out, fmt: str = "safetensors") -> Path:
    """Write a checkpoint's weights (and GPT-2 tokenizer files, if it has them) as a Hugging
    Face GPT-2 folder; return the weights path."""
    ckpt = checkpoint.load(source, optimizer=False, rng=False)
    config = GPTConfig.from_dict(ckpt.meta["model"])
    path = write_hf_folder(out, config, ckpt.model, fmt)
    for name in (VOCAB, MERGES):
        if name in ckpt.meta["files"]:
            shutil.copyfile(ckpt.path / name, Path(out) / name)
    return path


def _dtype_name(state: dict) -> str:
    dtypes = {str(t.dtype).removeprefix("torch.") for t in state.values()}
    return dtypes.pop() if len(dtypes) == 1 else "mixed"


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging(rank=0, label="")
    try:
        if args.command == "import":
            path = import_hf(args.source, args.out)
            log.info("imported %s into %s", args.source, path)
        else:
            path = export_hf(args.source, args.out, args.format)
            log.info("exported %s to %s", args.source, path)
    except (HFFormatError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
