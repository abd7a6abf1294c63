"""The `scripts/generate.py` command: load a checkpoint in a tp x pp layout and generate text.

Like `scripts/train.py`, the command spawns tp * pp local ranks on gloo, or joins the job when
started by torchrun. Every check that needs no communication (the checkpoint's files and
digests, the layout against the model, the prompt's length) runs before any rank starts. Global
rank 0 streams the text to standard output as the tokens are produced.
"""

from __future__ import annotations

import argparse
import codecs
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import GPTConfig
from parallel.launch import RankFailure, describe_self, init_from_torchrun, run_ranks, set_label, under_torchrun
from parallel.mesh import Layout, Mesh
from training import checkpoint
from training.checkpoint import CheckpointError
from training.config import ConfigError, LayoutConfig, RunConfig, validate
from training.bpe import GPT2Tokenizer
from training.data import ByteTokenizer
from training.generate import Decoder, SamplingConfig, check_prompt, generate
from training.progress import configure_logging

log = logging.getLogger("microtron")

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class GenerationJob:
    """The settings of one generation run, built and checked before any rank starts."""

    checkpoint: str
    model: dict
    tp: int
    pp: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingConfig
    tokenizer: str  # "bytes", "ids", or a folder with GPT-2's vocab.json and merges.txt
    dtype: str
    device: str
    threads_per_rank: int


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="generate.py",
        description="Generate text from a checkpoint with a KV cache, in any tensor- and "
                    "pipeline-parallel layout. Without torchrun, spawns tp * pp local ranks.")
    parser.add_argument("checkpoint", help="checkpoint folder, or run folder with a 'latest' file "
                                           "(such as runs/latest)")
    parser.add_argument("--prompt", default="The ", help="text to continue (default: 'The '); "
                        "with --tokenizer ids, token ids separated by spaces")
    parser.add_argument("--max-new-tokens", type=int, default=200,
                        help="number of tokens to generate (default 200); past the model's context "
                             "each token sees only the last n_positions tokens")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="divides the logits before sampling; 0 picks the most likely token")
    parser.add_argument("--greedy", action="store_true", help="pick the most likely token (temperature 0)")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens; 0 for all")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample among the most likely tokens whose probabilities add up to p; 1 for all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the weights and activations (default float32)")
    parser.add_argument("--tokenizer",
                        help="bytes: UTF-8 bytes are the token ids; ids: prompt and output are token "
                             "ids; or a folder with GPT-2's vocab.json and merges.txt. Default: the "
                             "tokenizer that the checkpoint records, else ids")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="device of the ranks (default: cuda when available)")
    parser.add_argument("--threads-per-rank", type=int, default=1, help="torch threads in each rank")
    return parser.parse_args(argv)


def build_job(args: argparse.Namespace) -> GenerationJob:
    """Check the checkpoint, layout, sampling settings and prompt; raise on the first problem."""
    meta = checkpoint.verify(args.checkpoint)
    model = GPTConfig.from_dict(meta["model"])
    run = RunConfig(model=model, layout=LayoutConfig(tp=args.tp, pp=args.pp))
    run.train.global_batch = 1
    validate(run)

    tokenizer = args.tokenizer or _recorded_tokenizer(meta, checkpoint.resolve(args.checkpoint))
    prompt = _Codec(tokenizer).encode(args.prompt)
    check_prompt(prompt, model)
    temperature = 0.0 if args.greedy else args.temperature
    sampling = SamplingConfig(temperature, args.top_k, args.top_p, args.seed)
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must not be negative")
    return GenerationJob(str(checkpoint.resolve(args.checkpoint)), model.to_dict(), args.tp, args.pp,
                         tuple(prompt), args.max_new_tokens, sampling, tokenizer, args.dtype,
                         args.device, args.threads_per_rank)


def _recorded_tokenizer(meta: dict, folder: Path) -> str:
    recorded = meta.get("tokenizer")
    if recorded == "gpt2-bpe":
        return str(folder)  # import stored vocab.json and merges.txt in the checkpoint
    if recorded in ("bytes", None):
        return recorded or "ids"
    raise ConfigError(f"the checkpoint records the tokenizer {recorded!r}, which this command does "
                      f"not know; pass --tokenizer")


class _Codec:
    """Conversion of the prompt to token ids, and of token ids to bytes (None: print the ids)."""

    def __init__(self, tokenizer: str):
        self.tokenizer = tokenizer
        self.bpe = None
        if tokenizer not in ("bytes", "ids"):
            try:
                self.bpe = GPT2Tokenizer.from_folder(tokenizer)
            except (FileNotFoundError, ValueError) as error:
                raise ConfigError(f"--tokenizer {tokenizer!r} is neither 'bytes' nor 'ids' nor a "
                                  f"usable GPT-2 tokenizer folder: {error}") from None

    def encode(self, text: str) -> list[int]:
        if self.tokenizer == "bytes":
            return [int(t) for t in ByteTokenizer().encode(text)]
        if self.bpe is not None:
            return self.bpe.encode(text)
        try:
            return [int(t) for t in text.split()]
        except ValueError:
            raise ConfigError(f"--tokenizer ids needs the prompt as token ids separated by spaces, "
                              f"such as '464 2068', not {text!r}") from None

    def to_bytes(self, ids) -> bytes | None:
        if self.tokenizer == "bytes":
            return bytes(int(t) for t in ids if 0 <= int(t) < 256)
        if self.bpe is not None:
            return self.bpe.decode_bytes(ids)
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging(rank=0, label="")
    try:
        job = build_job(args)
    except (ConfigError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    log.info("generating from %s (step %d)", job.checkpoint, checkpoint.read_meta(job.checkpoint)["step"])
    world_size = job.tp * job.pp
    if under_torchrun():
        if int(os.environ["WORLD_SIZE"]) != world_size:
            print(f"error: torchrun started WORLD_SIZE={os.environ['WORLD_SIZE']} processes, but "
                  f"tp * pp = {job.tp} * {job.pp} = {world_size}; start torchrun with that many "
                  f"processes or change --tp and --pp", file=sys.stderr)
            return 2
        device = _device(job.device, int(os.environ.get("LOCAL_RANK", 0)))
        rank, _ = init_from_torchrun("nccl" if device.type == "cuda" else "gloo", 300.0)
        try:
            generate_worker(rank, world_size, job)
        except BaseException:
            log.error("%s failed", describe_self())
            raise
        return 0

    backend = "nccl" if _device(job.device, 0).type == "cuda" else "gloo"
    try:
        run_ranks(generate_worker, world_size, (job,), backend=backend,
                  threads_per_rank=job.threads_per_rank)
    except RankFailure as failure:
        print(f"error: generation failed.\n{failure}", file=sys.stderr)
        return 1
    return 0


def _device(want: str, local_rank: int) -> torch.device:
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda, but torch.cuda.is_available() is False; use --device cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def generate_worker(rank: int, world_size: int, job: GenerationJob) -> list[int]:
    """Load this rank's slice of the checkpoint and generate; rank 0 streams the text."""
    torch.set_num_threads(job.threads_per_rank)
    mesh = Mesh(Layout(tp=job.tp, pp=job.pp), rank)
    set_label(mesh.describe())
    configure_logging(rank, mesh.describe())
    device = _device(job.device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    ckpt = checkpoint.load(job.checkpoint, optimizer=False, rng=False)
    config = GPTConfig.from_dict(job.model)
    decoder = Decoder.load(config, ckpt.model, mesh, DTYPES[job.dtype], device)
    stream = _TextStream(job.tokenizer) if rank == 0 else None
    if stream:
        stream.write(job.prompt)

    tokens = []
    for token in generate(decoder, list(job.prompt), job.max_new_tokens, job.sampling):
        tokens.append(token)
        if stream:
            stream.write([token])
    if stream:
        stream.close()
    return tokens


class _TextStream:
    """Standard output that shows tokens as they arrive, decoding UTF-8 across token boundaries."""

    def __init__(self, tokenizer: str):
        self.codec = _Codec(tokenizer)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, tokens) -> None:
        data = self.codec.to_bytes(tokens)
        if data is None:
            text = "".join(f"{int(t)} " for t in tokens)
        else:
            text = self.decoder.decode(data)
        sys.stdout.write(text)
        sys.stdout.flush()

    def close(self) -> None:
        sys.stdout.write(self.decoder.decode(b"", final=True) + "\n")
        sys.stdout.flush()
