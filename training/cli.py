"""The `scripts/train.py` command: parse options, validate, start the ranks, train.

Without a torchrun environment the command spawns tp * pp * dp local ranks on gloo itself. Under
torchrun each process joins the job instead, with NCCL on CUDA and gloo on CPU. Every check that
can fail without communication (the config, the corpus, the world size) runs before any rank
starts.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path

import torch
import yaml

from model.config import GPTConfig
from parallel.launch import RankFailure, describe_self, init_from_torchrun, run_ranks, set_label, under_torchrun
from parallel.mesh import Mesh
from training import checkpoint
from training.bpe import MERGES, VOCAB
from training.checkpoint import ARCHITECTURE_FIELDS, CheckpointError
from training.config import ConfigError, RunConfig, default_config_path, load_run_config, validate
from training.data import ByteTokenizer, TokenBatches, load_corpus, unigram_entropy
from training.progress import ProgressBar, configure_logging
from training.resume import init_from, resume, save_checkpoint, start_checkpoint

log = logging.getLogger("microtron")

# Command-line flags that set one config key each.
_FLAG_KEYS = {
    "tp": "layout.tp", "pp": "layout.pp", "dp": "layout.dp",
    "micro_batches": "layout.micro_batches", "schedule": "layout.schedule",
    "virtual_stages": "layout.virtual_stages",
    "steps": "train.steps", "seed": "train.seed", "global_batch": "train.global_batch",
    "dropout": "model.dropout", "data": "data.path", "out": "run.out", "log_json": "run.log_json",
    "device": "run.device", "threads_per_rank": "run.threads_per_rank",
    "init_from": "run.init_from", "save_interval": "run.save_interval", "keep": "run.keep",
    "sequence_parallel": "layout.sequence_parallel", "recompute": "train.recompute",
    "recompute_layers": "train.recompute_layers", "mixed_precision": "train.mixed_precision",
    "distributed_optimizer": "train.distributed_optimizer", "memory_report": "run.memory_report",
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
    parser.add_argument("--sequence-parallel", action="store_true", default=None,
                        help="split LayerNorm and dropout activations along the sequence over the "
                             "TP ranks")
    parser.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    parser.add_argument("--steps", type=int, help="optimizer steps to train")
    parser.add_argument("--seed", type=int, help="seed of initialization, data order and dropout")
    parser.add_argument("--dropout", type=float, help="dropout probability (0 turns it off)")
    parser.add_argument("--recompute", choices=["none", "selective", "full"],
                        help="activation recomputation: selective recomputes the attention core, "
                             "full whole blocks")
    parser.add_argument("--recompute-layers", type=int,
                        help="with --recompute full: recompute only the first N blocks of each stage")
    parser.add_argument("--mixed-precision", choices=["bf16", "fp16"],
                        help="compute in bf16 or fp16 under autocast, with fp32 master weights "
                             "(fp16 adds dynamic loss scaling)")
    parser.add_argument("--distributed-optimizer", action="store_true", default=None,
                        help="shard AdamW's state over the dp ranks (ZeRO-1)")
    parser.add_argument("--data", help="text file, folder of text files, or .bin file of uint16 "
                                       "token ids (default: the Python docs in pydoc_data)")
    parser.add_argument("--out", help="folder for checkpoints (default: runs/latest)")
    parser.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                        help="continue a run from a checkpoint, in any layout: without a value the "
                             "latest one in --out, else a checkpoint folder or a run folder")
    parser.add_argument("--init-from", metavar="CHECKPOINT",
                        help="start a new run (step 0, fresh optimizer) from a checkpoint's "
                             "weights, such as one imported by scripts/convert.py")
    parser.add_argument("--save-interval", type=int,
                        help="save a checkpoint every this many steps (default 0: only at the end)")
    parser.add_argument("--keep", type=int,
                        help="keep only the newest N checkpoints in --out (default 0: keep all)")
    parser.add_argument("--log-json", help="append one JSON object per step to this file")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device of the ranks")
    parser.add_argument("--threads-per-rank", type=int, help="torch threads in each rank (default 1)")
    parser.add_argument("--memory-report", action="store_true", default=None,
                        help="measure parameter, gradient, optimizer and activation bytes of every "
                             "rank during the first step and log them next to the prediction")
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
    if args.resume is not None:
        overrides["run.resume"] = args.resume
    config = load_run_config(args.config or default_config_path(), overrides)
    start = start_checkpoint(config)
    if start is not None:
        # Checked here, before any rank starts: a damaged checkpoint fails the command at once.
        meta = checkpoint.verify(start[1])
        config.model = _model_from_checkpoint(meta, overrides, start[1])
        log.info("model config from the checkpoint %s", checkpoint.resolve(start[1]))
    validate(config)
    return config


def _model_from_checkpoint(meta: dict, overrides: dict, path) -> GPTConfig:
    """Return the checkpoint's model config with the model overrides of the command line,
    which may change dropout but nothing that the weights depend on."""
    values = dict(meta["model"])
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section != "model":
            continue
        if name in ARCHITECTURE_FIELDS and value != values.get(name):
            raise ConfigError(f"--set {key}={value!r} contradicts the checkpoint {path}, whose "
                              f"model has {name}={values.get(name)!r}; a run that starts from a "
                              f"checkpoint takes its model config from it")
        values[name] = value
    try:
        return GPTConfig.from_dict(values)
    except ValueError as error:
        raise ConfigError(f"model config of {path}: {error}") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging(rank=0, label="")
    try:
        config = build_config(args)
        corpus = load_corpus(config.data.path)
        _check_corpus(config, corpus.tokens)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as error:
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
    start = start_checkpoint(config)
    if rank == 0 and start is None:
        _warn_about_earlier_checkpoints(config)
    start_ckpt = None
    if start is not None:
        kind, path = start
        start_ckpt = (resume if kind == "resume" else init_from)(trainer, config, path)
    first_step = trainer.step

    tokenizer_meta, tokenizer_files = _tokenizer_record(corpus, start_ckpt)
    save = functools.partial(save_checkpoint, trainer, config, config.run.out, tokenizer_meta,
                             tokenizer_files)
    saved_step = _train_loop(trainer, config, rank, save)
    ran = trainer.step > first_step
    final_val = trainer.evaluate() if ran else None
    if rank == 0 and final_val is not None:
        log.info("final validation loss %.4f (unigram entropy of the corpus: %.4f)", final_val,
                 unigram_entropy(corpus.tokens))
    resumed_without_training = start is not None and start[0] == "resume" and not ran
    if config.run.out and saved_step != trainer.step and not resumed_without_training:
        save()
    if config.run.sample_tokens > 0 and corpus.tokenized_bytes:
        _log_sample(config, trainer)
    return {"final_val_loss": final_val, "step": trainer.step}


def _tokenizer_record(corpus, start_ckpt) -> tuple[dict, dict]:
    """Return the metadata and files that tell scripts/generate.py how to turn text into this
    run's token ids and back: bytes, or GPT-2's tokenizer carried over from the start checkpoint."""
    if corpus.tokenized_bytes:
        return {"tokenizer": "bytes"}, {}
    if start_ckpt is not None and start_ckpt.meta.get("tokenizer") == "gpt2-bpe":
        files = {name: (start_ckpt.path / name).read_bytes() for name in (VOCAB, MERGES)}
        return {"tokenizer": "gpt2-bpe"}, files
    return {"tokenizer": None}, {}


def _train_loop(trainer, config: RunConfig, rank: int, save) -> int | None:
    """Train until `train.steps`, calling `save` every `run.save_interval` steps; return the step
    of the last checkpoint saved, or None."""
    saved_step = None
    tokens_per_step = config.train.global_batch * config.seq_len
    bar = ProgressBar(config.train.steps, enabled=rank == 0 and config.run.progress)
    json_log = open(config.run.log_json, "a") if rank == 0 and config.run.log_json else None
    first_step = trainer.step
    try:
        while trainer.step < config.train.steps:
            start = time.perf_counter()
            if config.run.memory_report and trainer.step == first_step:
                stats = _measured_step(trainer, config)
            else:
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
            save_interval = config.run.save_interval
            if config.run.out and save_interval > 0 and trainer.step % save_interval == 0:
                save()
                saved_step = trainer.step
    finally:
        bar.close()
        if json_log:
            json_log.close()
    return saved_step


def _measured_step(trainer, config: RunConfig):
    """Run one step while measuring memory; rank 0 logs every rank's report."""
    from training.memory_report import format_reports, gather_reports, measure_step

    stats, report = measure_step(trainer)
    reports = gather_reports(report, config.layout.mesh.world_size)
    if reports is not None:
        log.info("memory of step %d per rank (activations: peak of tensors saved for backward; "
                 "predicted by model/memory.py):\n%s", stats.step + 1, format_reports(reports))
    return stats


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
    tr = config.train
    log.info("memory: sequence parallel %s, recompute %s%s, precision %s, %s optimizer",
             "on" if lay.sequence_parallel else "off", tr.recompute,
             f" (first {tr.recompute_layers} blocks per stage)" if tr.recompute_layers else "",
             tr.mixed_precision or tr.dtype, "distributed (ZeRO-1)" if tr.distributed_optimizer else "replicated")
    log.info("data: %s; %s training and %s validation tokens; unigram entropy %.4f nats per token",
             corpus.description, f"{len(trainer.batches.train_tokens):,}",
             f"{len(trainer.batches.val_tokens):,}", unigram_entropy(corpus.tokens))


def _log_sample(config: RunConfig, trainer) -> None:
    """Generate a sample with the trained chunks in this layout (every rank takes part)."""
    from training.generate import Decoder, SamplingConfig, generate

    decoder = Decoder.from_trainer(trainer)
    tokenizer = ByteTokenizer()
    prompt = [int(t) for t in tokenizer.encode(config.run.sample_prompt)]
    sampling = SamplingConfig(seed=config.train.seed)
    new = list(generate(decoder, prompt, config.run.sample_tokens, sampling))
    if trainer.mesh.rank == 0:
        log.info("sample:\n%s", tokenizer.decode(prompt + new))


def _flatten(config_dict: dict) -> dict:
    """Turn {"train": {"lr": 1e-3}} into {"train.lr": 1e-3}, the form of overrides."""
    return {f"{section}.{key}": value for section, values in config_dict.items()
            for key, value in values.items()}


def _warn_about_earlier_checkpoints(config: RunConfig) -> None:
    """Warn when a new run saves into a folder that already contains another run's checkpoints,
    because its own checkpoints join them and `latest` moves to the new run."""
    if not config.run.out:
        return
    earlier = checkpoint.list_checkpoints(config.run.out)
    if earlier:
        log.warning("%s already contains %d checkpoint(s) of an earlier run (the newest: %s); this "
                    "run adds its own and moves 'latest' to them. Pass --out DIR to keep runs apart, "
                    "or --resume to continue the earlier run", config.run.out, len(earlier),
                    earlier[-1].name)
