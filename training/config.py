"""The run configuration: model, layout, training, data and run sections, and their validation.

A run config is one YAML file with those five sections; any key can be overridden on the command
line. `validate` checks every rule that involves more than one section (the layout against the
model and the batch) and raises one ConfigError that lists each broken rule with the value, the
rule and a fix, before any rank starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model.config import CONFIG_DIR, GPTConfig, resolve_model_config
from parallel.mesh import Layout
from parallel.pipeline.schedules import SCHEDULES, ScheduleError
from parallel.pipeline.sources import is_user_schedule, prepare_schedule
from training import compat


class ConfigError(ValueError):
    """An invalid configuration, found before any rank starts."""




@dataclass
class LayoutConfig:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    # A schedule of the zoo (gpipe, 1f1b, interleaved-1f1b, zb-h1, zb-h2, zb-v, dualpipev), a
    # .yaml or .csv table of actions per rank, or "package.module:function".
    schedule: str = "1f1b"
    micro_batches: int = 1  # per dp replica and step
    virtual_stages: int = 1  # stages per pipeline rank (interleaved and V-shaped schedules)
    layers_per_stage: list[int] | None = None  # None splits the layers as evenly as possible
    # Maximum number of micro-batch activations one rank may stash at once, each counted from a
    # forward until its B or I. A schedule that stashes more is rejected. None sets no bound.
    max_stash: int | None = None
    # Split the activations outside attention and the MLP along the sequence over the TP group.
    sequence_parallel: bool = False

    @property
    def mesh(self) -> Layout:
        return Layout(tp=self.tp, pp=self.pp, dp=self.dp)


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch: int = 16  # sequences per optimizer step, over all dp replicas
    seq_len: int | None = None  # tokens per sequence; None means the model's n_positions
    lr: float = 1e-3
    min_lr: float = 1e-4  # the cosine schedule ends here
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # maximum global gradient norm; 0 turns clipping off
    seed: int = 1234
    eval_interval: int = 50  # steps between evaluations; 0 evaluates only at the end
    eval_batches: int = 4  # global batches of held-out text per evaluation
    dtype: str = "float32"  # parameter dtype: float32 or float64
    # Compute dtype under autocast: null (none), bf16, or fp16 (with dynamic loss scaling). The
    # float32 parameters are the master weights; gradients accumulate and reduce in float32.
    mixed_precision: str | None = None
    recompute: str = "none"  # activation recomputation: none, selective or full
    recompute_layers: int | None = None  # with recompute=full: only the first k blocks per stage
    # ZeRO-1: shard AdamW's state over dp, reduce-scatter gradients, all-gather parameters.
    distributed_optimizer: bool = False
    # Data parallelism reduces gradients in buckets of about this size; a bucket's all-reduce
    # starts during backward once its gradients are final.
    grad_bucket_mb: float = 4.0


@dataclass
class DataConfig:
    path: str | None = None  # None: the Python documentation shipped in pydoc_data
    val_fraction: float = 0.1  # the last fraction of the corpus is held out


@dataclass
class RunOptions:
    out: str | None = "runs/latest"  # checkpoint folder; null saves nothing
    log_json: str | None = None  # one JSON object per step is appended here
    resume: bool | str = False  # true: the latest checkpoint in `out`; or a checkpoint path
    init_from: str | None = None  # checkpoint whose weights start the run (at step 0)
    save_interval: int = 0  # steps between checkpoints; 0 saves only at the end
    keep: int = 0  # checkpoints kept in `out`, newest first; 0 keeps all
    device: str = "auto"  # auto, cpu or cuda
    threads_per_rank: int = 1
    timeout_s: float = 300.0  # a collective that waits longer fails the job
    sample_tokens: int = 200  # length of the text sample printed at the end; 0 for none
    sample_prompt: str = "The "
    progress: bool = True  # progress bar on a terminal
    memory_report: bool = False  # measure the first step's memory on every rank and log it


@dataclass
class RunConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunOptions = field(default_factory=RunOptions)

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.n_positions

    @property
    def micro_batch_size(self) -> int:
        return self.train.global_batch // (self.layout.micro_batches * self.layout.dp)

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "layout": dataclasses.asdict(self.layout),
            "train": dataclasses.asdict(self.train),
            "data": dataclasses.asdict(self.data),
            "run": dataclasses.asdict(self.run),
        }


_SECTIONS = {"layout": LayoutConfig, "train": TrainConfig, "data": DataConfig, "run": RunOptions}


def load_run_config(path: str | Path | None, overrides: dict[str, object] | None = None) -> RunConfig:
    """Read a run config YAML (or the defaults when `path` is None) and apply dotted overrides
    such as {"layout.tp": 2}."""
    values: dict = {}
    if path is not None:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(values).__name__}")
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}

    unknown = sorted(set(values) - set(_SECTIONS) - {"model"})
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; valid sections are "
                          f"{sorted(['model', *_SECTIONS])}")

    model_values = values.get("model", {})
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if not name or section not in {"model", *_SECTIONS}:
            raise ConfigError(f"override {key!r} must be <section>.<key> with section one of "
                              f"{sorted(['model', *_SECTIONS])}, such as layout.tp=2")
        if section == "model":
            if not isinstance(model_values, dict):
                model_values = resolve_model_config(model_values).to_dict()
            model_values[name] = value
        else:
            values.setdefault(section, {})[name] = value

    config = RunConfig(model=_model_from(model_values))
    for section, cls in _SECTIONS.items():
        setattr(config, section, _section_from(cls, section, values.get(section, {})))
    return config


def _model_from(spec) -> GPTConfig:
    try:
        if isinstance(spec, dict) and "preset" in spec:
            spec = dict(spec)
            base = resolve_model_config(spec.pop("preset")).to_dict()
            base.update(spec)
            spec = base
        return resolve_model_config(spec or {})
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None


def _section_from(cls, section: str, values: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in section {section!r}; valid keys are "
                          f"{sorted(known)}")
    return cls(**values)


def validate(config: RunConfig) -> None:
    """Raise ConfigError listing every rule the config breaks."""
    m, lay, tr = config.model, config.layout, config.train
    problems = []

    for name in ("tp", "pp", "dp", "micro_batches", "virtual_stages"):
        if getattr(lay, name) < 1:
            problems.append(f"layout.{name}={getattr(lay, name)} must be at least 1")
    if lay.max_stash is not None and lay.max_stash < 1:
        problems.append(f"layout.max_stash={lay.max_stash} must be at least 1, or null for no bound")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))

    if m.n_head % lay.tp != 0:
        problems.append(
            f"n_head={m.n_head} is not divisible by tp={lay.tp}: TP splits whole attention heads "
            f"over ranks; use a tp from {_divisors(m.n_head)}"
        )
    if m.ffn_size % lay.tp != 0:
        problems.append(
            f"the MLP size {m.ffn_size} is not divisible by tp={lay.tp}: TP splits the MLP's "
            f"hidden units over ranks; use a tp from {_divisors(m.ffn_size)}"
        )
    num_stages = lay.pp * lay.virtual_stages
    strategy_problems, schedule_ok = _strategy_problems(config)
    problems += strategy_problems
    if lay.schedule not in SCHEDULES and not is_user_schedule(lay.schedule):
        problems.append(f"schedule={lay.schedule!r} is unknown; choose one of {sorted(SCHEDULES)}, "
                        f"a .yaml or .csv table of actions, or package.module:function")
    elif schedule_ok:
        try:
            schedule = prepare_schedule(lay.schedule, lay.pp, lay.micro_batches,
                                        lay.virtual_stages, lay.max_stash)
            num_stages = schedule.num_stages
        except ScheduleError as error:
            problems.append(f"layout.schedule={lay.schedule!r}: {error}")
    if lay.layers_per_stage is not None:
        if len(lay.layers_per_stage) != num_stages or sum(lay.layers_per_stage) != m.n_layer:
            problems.append(
                f"layers_per_stage={lay.layers_per_stage} must list {num_stages} stage sizes "
                f"(one per stage of the schedule) that add up to n_layer={m.n_layer}"
            )
    elif num_stages > m.n_layer:
        count_of_stages = ("pp * virtual_stages = " if num_stages == lay.pp * lay.virtual_stages
                           else "the schedule's stage count: ")
        problems.append(
            f"{count_of_stages}{num_stages} stages is more than n_layer={m.n_layer}: every stage "
            f"needs at least one layer; use pp <= {m.n_layer // max(1, num_stages // lay.pp)} or "
            f"fewer virtual stages"
        )

    replicas_times_mb = lay.micro_batches * lay.dp
    if tr.global_batch < 1 or tr.global_batch % replicas_times_mb != 0:
        good = replicas_times_mb * max(1, round(tr.global_batch / replicas_times_mb))
        problems.append(
            f"global_batch={tr.global_batch} does not split into micro_batches={lay.micro_batches} "
            f"x dp={lay.dp} equal micro-batches; use a multiple of {replicas_times_mb} such as {good}"
        )
    if tr.seq_len is not None and not 1 <= tr.seq_len <= m.n_positions:
        problems.append(f"seq_len={tr.seq_len} must be between 1 and n_positions={m.n_positions}")
    problems += _memory_problems(config)
    if not tr.grad_bucket_mb > 0:
        problems.append(f"train.grad_bucket_mb={tr.grad_bucket_mb} must be positive")
    if tr.steps < 0:
        problems.append(f"steps={tr.steps} must not be negative")
    if not 0.0 < config.data.val_fraction < 1.0:
        problems.append(f"data.val_fraction={config.data.val_fraction} must be in (0, 1)")
    if config.run.device not in ("auto", "cpu", "cuda"):
        problems.append(f"run.device={config.run.device!r} must be auto, cpu or cuda")
    if config.run.threads_per_rank < 1:
        problems.append(f"run.threads_per_rank={config.run.threads_per_rank} must be at least 1")
    problems += _checkpoint_problems(config.run)

    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _memory_problems(config: RunConfig) -> list[str]:
    """Return the broken rules of recomputation that the compatibility table does not hold."""
    tr = config.train
    problems = []
    if tr.recompute_layers is not None:
        if tr.recompute != "full":
            problems.append(f"train.recompute_layers={tr.recompute_layers} applies only to "
                            f"recompute=full (recompute is {tr.recompute!r}); set it to null")
        elif tr.recompute_layers < 1:
            problems.append(f"train.recompute_layers={tr.recompute_layers} must be at least 1, or "
                            f"null to recompute every block")
    return problems


def _strategy_problems(config: RunConfig) -> tuple[list[str], bool]:
    """Return the rules of the compatibility table (`training.compat`) that the config breaks,
    and whether the schedule rules hold, so that the schedule can be built."""
    strategy, problems = compat.strategy_of(config)
    if strategy is None:
        return problems, True
    context = compat.Context(tp=config.layout.tp, pp=config.layout.pp, dp=config.layout.dp,
                             micro_batches=config.layout.micro_batches, seq_len=config.seq_len)
    return compat.problems(strategy, context), not compat.schedule_problems(strategy, context)


def _checkpoint_problems(run: RunOptions) -> list[str]:
    problems = []
    for name in ("save_interval", "keep"):
        if not isinstance(getattr(run, name), int) or getattr(run, name) < 0:
            problems.append(f"run.{name}={getattr(run, name)!r} must be a whole number, 0 or more")
    if not isinstance(run.resume, (bool, str)):
        problems.append(f"run.resume={run.resume!r} must be true, false or a checkpoint path")
    if run.resume is True and not run.out:
        problems.append("run.resume=true resumes from the latest checkpoint in run.out, but run.out "
                        "is not set; set run.out or pass the checkpoint path to --resume")
    if run.resume not in (False, "") and run.init_from:
        problems.append(f"run.resume={run.resume!r} and run.init_from={run.init_from!r} both set: "
                        f"resume continues a run, init_from starts a new one; choose one")
    if (run.save_interval > 0 or run.keep > 0) and not run.out:
        problems.append("run.save_interval and run.keep need run.out, the folder to save into")
    return problems


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_config_path() -> Path:
    return CONFIG_DIR / "default.yaml"
