"""The `scripts/plan.py` command: choose the layout of a training run on a cluster.

It enumerates every layout that the compatibility table (`training.compat`) allows for the
model, devices and global batch, and drops those that do not fit in memory, saying why in
numbers. It ranks the rest by predicted step time, prints the top few and explains why the first
beats the others, component by component. The first layout is checked with the trainer's own
config validation before it is printed as runnable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import yaml

from model.config import GPTConfig, resolve_model_config
from planner.cluster import ClusterError, load_cluster
from planner.estimate import CostModel
from planner.report import format_text, to_json
from planner.search import SearchSpace, plan
from planner.workload import IMPLEMENTATIONS, Candidate, Workload
from training import compat
from training.config import ConfigError, load_run_config, validate

log = logging.getLogger("microtron")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="plan.py",
        description="Predict step time and memory of every layout of a model on a cluster, and "
                    "rank those that fit.")
    parser.add_argument("--model", default="gpt-10m",
                        help="model preset in configs/models or a YAML file (default gpt-10m)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model config key, such as --set n_layer=24 (repeatable)")
    parser.add_argument("--cluster", default="this-machine",
                        help="cluster preset in configs/clusters or a YAML file (default this-machine, "
                             "written by scripts/calibrate.py)")
    parser.add_argument("--devices", type=int, help="devices to use (default: all of the cluster)")
    parser.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's n_positions)")
    parser.add_argument("--dtype", default="float32", choices=list(compat.COMPUTE_BYTES),
                        help="training dtype; bf16 and fp16 mean mixed precision (default float32)")
    parser.add_argument("--implementation", default="microtron", choices=sorted(IMPLEMENTATIONS),
                        help="whose kernels and transfers to cost: microtron's, or Megatron-LM's as in "
                             "its published tables (default microtron)")
    parser.add_argument("--include-declared", action="store_true",
                        help="also cost strategies the compatibility table declares but this build "
                             "cannot run yet (untied embeddings)")
    parser.add_argument("--schedules", help="comma-separated schedules to consider (default: all)")
    parser.add_argument("--tp", help="comma-separated tp sizes to consider (default: all)")
    parser.add_argument("--pp", help="comma-separated pp sizes to consider (default: all)")
    parser.add_argument("--micro-batch-sizes", help="comma-separated micro-batch sizes (default: all)")
    parser.add_argument("--top", type=int, default=5, help="layouts to print (default 5)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cluster = load_cluster(args.cluster)
        workload = _workload(args)
        devices = args.devices or cluster.devices
        _check(args, cluster, devices)
        space = SearchSpace(schedules=_names(args.schedules), tp=_ints(args.tp), pp=_ints(args.pp),
                            micro_batch_sizes=_ints(args.micro_batch_sizes),
                            include_declared=args.include_declared)
    except (ClusterError, ConfigError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    model = CostModel(cluster, IMPLEMENTATIONS[args.implementation])
    result = plan(workload, model, devices, keep=max(args.top, 10), space=space)
    print(format_text(result, args.top, cluster.name))
    if result.ranked:
        print("\n" + _runnable_lines(workload, result.ranked[0].candidate))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(result, args.top, cluster.name), f, indent=2)
    return 0 if result.ranked else 1


def _workload(args) -> Workload:
    model = resolve_model_config(args.model).to_dict()
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r} must have the form KEY=VALUE, such as n_layer=24")
        model[key.strip().removeprefix("model.")] = yaml.safe_load(text)
    config = GPTConfig.from_dict(model)
    seq_len = args.seq_len or config.n_positions
    return Workload(config, seq_len, args.global_batch, args.dtype)


def _check(args, cluster, devices: int) -> None:
    if devices < 1 or devices > cluster.devices:
        raise ValueError(f"--devices {devices} must be between 1 and the cluster's {cluster.devices} "
                         f"devices ({cluster.nodes} nodes of {cluster.devices_per_node})")
    if args.global_batch < 1:
        raise ValueError(f"--global-batch {args.global_batch} must be at least 1")
    if args.seq_len is not None and args.seq_len < 1:
        raise ValueError(f"--seq-len {args.seq_len} must be at least 1")
    if args.dtype not in cluster.peak_flops:
        raise ValueError(f"cluster {cluster.name!r} gives no peak for --dtype {args.dtype}; it has "
                         f"{sorted(cluster.peak_flops)}")
    if args.schedules:
        unknown = sorted(set(_names(args.schedules)) - set(compat.SCHEDULE_RULES))
        if unknown:
            raise ValueError(f"unknown schedule(s) {unknown}; choose from {list(compat.SCHEDULE_RULES)}")


def run_config_overrides(workload: Workload, candidate: Candidate) -> dict[str, object]:
    """Return the run config overrides of scripts/train.py for `candidate`."""
    overrides = {f"model.{k}": v for k, v in workload.model.to_dict().items()}
    overrides.update({"train.global_batch": workload.global_batch, "train.seq_len": workload.seq_len})
    overrides.update(candidate.overrides())
    return overrides


def validate_candidate(workload: Workload, candidate: Candidate) -> None:
    """Raise ConfigError if the trainer would reject `candidate` (see `training.config.validate`)."""
    validate(load_run_config(None, run_config_overrides(workload, candidate)))


def _runnable_lines(workload: Workload, candidate: Candidate) -> str:
    if not compat.strategy_runs(candidate.strategy):
        return (f"the first layout uses strategies this build cannot run yet ({candidate.strategy.describe()}); "
                f"the trainer rejects its config until they are wired up")
    try:
        validate_candidate(workload, candidate)
    except ConfigError as error:  # the planner's rules and the trainer's disagree: a bug
        return f"error: the trainer rejects the first layout, which the planner allowed:\n{error}"
    model_keys = {k: v for k, v in workload.model.to_dict().items() if v != getattr(GPTConfig(), k)}
    sets = " ".join(f"--set model.{k}={v}" for k, v in model_keys.items())
    layout = " ".join(f"--set {k}={compat.yaml_word(v)}" for k, v in candidate.overrides().items())
    return (f"the trainer accepts the first layout; to run it:\n  python scripts/train.py "
            f"--global-batch {workload.global_batch} --set train.seq_len={workload.seq_len} {sets} {layout}")


def _names(text: str | None) -> tuple[str, ...] | None:
    return tuple(part.strip() for part in text.split(",") if part.strip()) if text else None


def _ints(text: str | None) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in text.split(",")) if text else None
    except ValueError:
        raise ValueError(f"{text!r} must be comma-separated whole numbers, such as 1,2,4") from None
