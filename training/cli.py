"""The `scripts/train.py` command: parse options, validate, start the ranks, train.

Without a torchrun environment the command spawns tp * pp * dp local ranks on gloo itself; under
torchrun each process joins the job (NCCL on CUDA, gloo on CPU). Every check that can fail without
communication (the config, the corpus, the world size) runs before any rank starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import yaml

from parallel.launch import RankFailure, describe_self, init_from_torchrun, run_ranks, set_label, under_torchrun
from parallel.mesh import Mesh
from training import checkpoint
from training.config import ConfigError, RunConfig, default_config_path, load_run_config, validate
from training.data import ByteTokenizer, TokenBatches, load_corpus, unigram_entropy
from training.progress import ProgressBar, configure_logging

log = logging.getLogger("microtron")

# Command-line flags that set one config key each.
_FLAG_KEYS = {
    "tp": "layout.tp", "pp": "layout.pp", "dp": "layout.dp",
    "micro_batches": "layout.micro_batches", "schedule": "layout.schedule",
    "virtual_stages": "layout.virtual_stages",
    "steps": "train.steps", "seed": "train.seed", "global_batch": "train.global_batch",
    "dropout": "model.dropout", "data": "data.path", "out": "run.out", "log_json": "run.log_json",
    "device": "run.device", "threads_per_rank": "run.threads_per_rank",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a GPT with tensor, pipeline and data parallelism. Without torchrun, "
                    "spawns tp * pp * dp local ranks on gloo.",
    )
    parser.add_argument("--config", help=f"run config YAML (default: {default_config_path()})")
    parser.add_argument("--tp", type=int, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, help="pipeline-parallel size (number of pipeline ranks)")
    parser.add_argument("--dp", type=int, help="data-parallel size")
    parser.add_argument("--micro-batches", type=int, help="micro-batches per step and dp replica")
    parser.add_argument("--schedule", help="pipeline schedule: gpipe, 1f1b, interleaved-1f1b, "
                                           "zb-h1, zb-h2, zb-v or dualpipev; a .yaml or .csv table "
                                           "of actions per rank; or package.module:function")
    parser.add_argument("--virtual-stages", type=int, help="pipeline stages per pipeline rank")
    parser.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    parser.add_argument("--steps", type=int, help="optimizer steps to train")
    parser.add_argument("--seed", type=int, help="seed of initialization, data order and dropout")
    parser.add_argument("--dropout", type=float, help="dropout probability (0 turns it off)")
    parser.add_argument("--data", help="text file, folder of text files, or .bin file of uint16 "
                                       "token ids (default: the Python docs in pydoc_data)")
    parser.add_argument("--out", help="folder for checkpoints (default: runs/latest)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--log-json", help="append one JSON object per step to this file")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device of the ranks")
    parser.add_argument("--threads-per-rank", type=int, help="torch threads in each rank (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set any config key, such as --set train.lr=3e-4 or --set "
                             "model.n_layer=6 (repeatable)")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> RunConfig:
    overrides: dict[str, object] = {}
    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must have the form KEY=VALUE, such as train.lr=3e-4")
        overrides[key.strip()] = yaml.safe_load(text)
    if args.resume:
        overrides["run.resume"] = True
    config = load_run_config(args.config or default_config_path(), overrides)
    validate(config)
    return config


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging(rank=0, label="")
    try:
        config = build_config(args)
        corpus = load_corpus(config.data.path)
        _check_corpus(config, corpus.tokens)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    world_size = config.layout.mesh.world_size
    if under_torchrun():
        import os

        if int(os.environ["WORLD_SIZE"]) != world_size:
            print(f"error: torchrun started WORLD_SIZE={os.environ['WORLD_SIZE']} processes, but "
                  f"tp * pp * dp = {config.layout.tp} * {config.layout.pp} * {config.layout.dp} = "
                  f"{world_size}; start torchrun with --nproc-per-node x --nnodes = {world_size} or "
                  f"change the layout", file=sys.stderr)
            return 2
        device = _device(config, int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl" if device.type == "cuda" else "gloo"
        rank, _ = init_from_torchrun(backend, config.run.timeout_s)
        try:
            train_worker(rank, world_size, config.to_dict())
        except BaseException:
            log.error("%s failed", describe_self())
            raise
        return 0

    device = _device(config, 0)
    backend = "nccl" if device.type == "cuda" else "gloo"
    log.info("starting %d local rank(s) on %s (%s), %d thread(s) each", world_size, device.type,
             backend, config.run.threads_per_rank)
    try:
        run_ranks(train_worker, world_size, (config.to_dict(),), backend=backend,
                  timeout_s=config.run.timeout_s, threads_per_rank=config.run.threads_per_rank)
    except RankFailure as failure:
        print(f"error: the job failed.\n{failure}", file=sys.stderr)
        return 1
    return 0


def _check_corpus(config: RunConfig, tokens) -> None:
    """Raise ValueError when the corpus cannot feed this model (before any rank starts)."""
    TokenBatches(tokens, config.seq_len, config.data.val_fraction, config.train.seed)
    largest = int(tokens.max())
    if largest >= config.model.vocab_size:
        raise ValueError(f"the corpus contains token id {largest}, but model.vocab_size="
                         f"{config.model.vocab_size}; set --set model.vocab_size={largest + 1} or more")


def _device(config: RunConfig, local_rank: int) -> torch.device:
    want = config.run.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("run.device=cuda, but torch.cuda.is_available() is False; use --device cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def train_worker(rank: int, world_size: int, config_dict: dict) -> dict:
    """Train on one rank. Runs in every rank process; rank 0 logs and writes files."""
    from training.trainer import Trainer  # after the process group exists, as in a spawned rank

    config = load_run_config(None, _flatten(config_dict))
    torch.set_num_threads(config.run.threads_per_rank)
    mesh = Mesh(config.layout.mesh, rank, timeout=None)
    set_label(mesh.describe())
    configure_logging(rank, mesh.describe())
    device = _device(config, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    corpus = load_corpus(config.data.path)
    trainer = Trainer(config, mesh, corpus.tokens, device=device)
    if rank == 0:
        _log_start(config, trainer, corpus)
    if config.run.resume:
        _resume(trainer, config)

    _train_loop(trainer, config, rank)
    final_val = trainer.evaluate() if config.train.steps > 0 else None

    model_state = trainer.gather_model()
    optimizer_state = trainer.gather_optimizer()
    if rank == 0:
        if final_val is not None:
            log.info("final validation loss %.4f (unigram entropy of the corpus: %.4f)", final_val,
                     unigram_entropy(corpus.tokens))
        if config.run.out:
            path = checkpoint.save(config.run.out, trainer.step, model_state, optimizer_state, {
                "model": config.model.to_dict(),
                "layout": {"tp": mesh.layout.tp, "pp": mesh.layout.pp, "dp": mesh.layout.dp,
                           "schedule": config.layout.schedule,
                           "virtual_stages": config.layout.virtual_stages},
                "run_config": config.to_dict(),
            })
            log.info("saved checkpoint %s", path)
        if config.run.sample_tokens > 0 and corpus.tokenized_bytes:
            _print_sample(config, model_state)
    return {"final_val_loss": final_val, "step": trainer.step}


def _train_loop(trainer, config: RunConfig, rank: int) -> None:
    tokens_per_step = config.train.global_batch * config.seq_len
    bar = ProgressBar(config.train.steps, enabled=rank == 0 and config.run.progress)
    json_log = open(config.run.log_json, "a") if rank == 0 and config.run.log_json else None
    try:
        while trainer.step < config.train.steps:
            start = time.perf_counter()
            stats = trainer.train_step()
            elapsed = time.perf_counter() - start
            record = {"step": stats.step, "loss": stats.loss, "lr": stats.lr,
                      "grad_norm": stats.grad_norm, "tokens_per_s": tokens_per_step / elapsed,
                      "step_s": elapsed}
            interval = config.train.eval_interval
            if interval > 0 and trainer.step % interval == 0 and trainer.step < config.train.steps:
                record["val_loss"] = trainer.evaluate()
            if rank == 0:
                _log_step(record, config.train.steps)
                bar.update(trainer.step, f"loss {stats.loss:.4f}")
                if json_log:
                    json_log.write(json.dumps(record) + "\n")
                    json_log.flush()
    finally:
        bar.close()
        if json_log:
            json_log.close()


def _log_step(record: dict, total: int) -> None:
    line = (f"step {record['step'] + 1:>5}/{total} | loss {record['loss']:.4f} | lr {record['lr']:.2e}"
            f" | grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s"
            f" | {record['step_s'] * 1000:.0f} ms")
    if "val_loss" in record:
        line += f" | val loss {record['val_loss']:.4f}"
    log.info(line)


def _log_start(config: RunConfig, trainer, corpus) -> None:
    m, lay = config.model, config.layout
    log.info("model: %d layers, n_embd %d, %d heads, vocab %d, context %d: %s parameters",
             m.n_layer, m.n_embd, m.n_head, m.vocab_size, m.n_positions, f"{m.num_parameters():,}")
    log.info("layout: tp=%d pp=%d dp=%d, schedule %s, %d micro-batch(es) of %d sequences per replica",
             lay.tp, lay.pp, lay.dp, lay.schedule, lay.micro_batches, config.micro_batch_size)
    log.info("pipeline: %s", trainer.describe_stages())
    log.info("data: %s; %s training and %s validation tokens; unigram entropy %.4f nats per token",
             corpus.description, f"{len(trainer.batches.train_tokens):,}",
             f"{len(trainer.batches.val_tokens):,}", unigram_entropy(corpus.tokens))


def _resume(trainer, config: RunConfig) -> None:
    model, optimizer, meta = checkpoint.load(config.run.out)
    trainer.load_model(model)
    trainer.load_optimizer(optimizer)
    trainer.step = int(meta["step"])
    if trainer.mesh.rank == 0:
        log.info("resumed from %s at step %d", checkpoint.resolve(config.run.out), trainer.step)


def _print_sample(config: RunConfig, model_state: dict) -> None:
    from training.generate import generate, single_process_model

    model = single_process_model(config.model, model_state)
    tokenizer = ByteTokenizer()
    prompt = [int(t) for t in tokenizer.encode(config.run.sample_prompt)]
    new = list(generate(model, prompt, config.run.sample_tokens, seed=config.train.seed))
    log.info("sample:\n%s", tokenizer.decode(prompt + new))


def _flatten(config_dict: dict) -> dict:
    """Turn {"train": {"lr": 1e-3}} into {"train.lr": 1e-3}, the form of overrides."""
    return {f"{section}.{key}": value for section, values in config_dict.items()
            for key, value in values.items()}
