"""The workload that every benchmark point trains, and the timing of a point's steps.

A `Workload` fixes the model, the global batch, its split into micro-batches, the dtype and the
number of warm-up and timed steps. microtron and the PyTorch peers all draw the same batches from
`TokenBatches` with the workload's seed and start from the same full weights (microtron's
layout-free initialization). They also use the same AdamW settings and learning-rate schedule,
so their losses can be compared step by step before their times are.
"""

from __future__ import annotations

import dataclasses
import functools
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from model.build import full_init, full_parameter_shapes
from model.config import GPTConfig
from training.config import RunConfig, load_run_config, validate
from training.data import TokenBatches, load_corpus

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Workload:
    """One model and batch, timed over `timed_steps` steps after `warmup_steps`."""

    name: str
    model: GPTConfig
    global_batch: int = 32  # sequences per optimizer step
    micro_batches: int = 8  # per dp replica, unless a point sets its own
    seq_len: int = 128
    dtype: str = "float32"
    warmup_steps: int = 2  # run, checked, not timed
    timed_steps: int = 5
    # Timed steps stop early once the point has run this long, after at least 2 timed steps, so
    # that a point slowed down by other processes on the machine cannot stall the sweep.
    max_point_s: float = 60.0
    seed: int = 1234
    lr: float = 1e-3
    train: dict = field(default_factory=dict)  # other TrainConfig fields, such as grad_clip

    @property
    def total_steps(self) -> int:
        """Return the most steps a job runs: warm-up, timed, and one recorded step at the end."""
        return self.warmup_steps + self.timed_steps + 1

    def run_config(self, tp: int = 1, pp: int = 1, dp: int = 1, schedule: str = "1f1b",
                   micro_batches: int | None = None, virtual_stages: int = 1,
                   layers_per_stage: list[int] | None = None, threads: int = 1,
                   zero1: bool = False) -> RunConfig:
        """Return the validated microtron run config of this workload in the given layout."""
        overrides = {
            "layout.tp": tp, "layout.pp": pp, "layout.dp": dp, "layout.schedule": schedule,
            "layout.micro_batches": micro_batches or self.micro_batches,
            "layout.virtual_stages": virtual_stages, "layout.layers_per_stage": layers_per_stage,
            "train.global_batch": self.global_batch, "train.seq_len": self.seq_len,
            "train.dtype": self.dtype, "train.steps": self.total_steps, "train.seed": self.seed,
            "train.lr": self.lr, "train.distributed_optimizer": zero1, "run.out": None,
            "run.threads_per_rank": threads,
        }
        overrides.update({f"train.{key}": value for key, value in self.train.items()})
        overrides.update({f"model.{key}": value for key, value in self.model.to_dict().items()})
        config = load_run_config(None, overrides)
        validate(config)
        return config

    def model_flops_per_step(self) -> float:
        """Return the model FLOPs of one step, without recomputation and without causal halving.

        72 B s l h^2 (1 + s/(6h) + V/(12 h l)) for B sequences of s tokens, l layers of width h
        and a vocabulary of V: the model FLOPs of Korthikanti et al. 2022 (eq. 7), which count
        the GEMMs only. It assumes an MLP of width 4h.
        """
        m = self.model
        b, s, layers, h, v = self.global_batch, self.seq_len, m.n_layer, m.n_embd, m.vocab_size
        return 72.0 * b * s * layers * h * h * (1 + s / (6 * h) + v / (12 * h * layers))

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["model"] = self.model.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "Workload":
        values = dict(values)
        values["model"] = GPTConfig.from_dict(values["model"])
        return cls(**values)


# ----------------------------------------------------------------------------------------------
# Data and weights that microtron and the peers share


@functools.lru_cache(maxsize=4)
def corpus_tokens(path: str | None):
    return load_corpus(path).tokens


def batches(config: RunConfig) -> TokenBatches:
    """Return the batches that microtron's trainer draws for `config`."""
    return TokenBatches(corpus_tokens(config.data.path), config.seq_len,
                        config.data.val_fraction, config.train.seed)


def full_weights(workload: Workload) -> dict[str, torch.Tensor]:
    """Return microtron's initial parameters as full tensors under their global names."""
    dtype = DTYPES[workload.dtype]
    return {name: full_init(name, shape, workload.model, workload.seed).to(dtype)
            for name, shape in full_parameter_shapes(workload.model).items()}


# ----------------------------------------------------------------------------------------------
# Timing and memory


MIN_TIMED_STEPS = 2


def run_steps(step, workload: Workload) -> tuple[list[float], list[float]]:
    """Call `step(index)` for the warm-up and timed steps; return each call's wall-clock seconds
    and the CPU seconds this process used in it (all its threads).

    Before each step the ranks agree on the time spent so far by an all-reduce of the maximum,
    which is also a barrier. A step's time on the slowest rank is thus the time of the whole
    step, and every rank stops after the same step once `workload.max_point_s` has passed.
    """
    seconds, cpu_seconds = [], []
    began = time.perf_counter()
    for index in range(workload.warmup_steps + workload.timed_steps):
        elapsed = torch.tensor([time.perf_counter() - began], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        timed_done = index - workload.warmup_steps
        if timed_done >= MIN_TIMED_STEPS and float(elapsed) > workload.max_point_s:
            break
        start, cpu_start = time.perf_counter(), time.process_time()
        step(index)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    return seconds, cpu_seconds


def reset_peak_memory(device: torch.device) -> None:
    """Start a new high-water mark of this process's memory, where the platform allows it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        # Writing 5 resets the peak resident set size (VmHWM) of the process (Linux 4.0+).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mib(device: torch.device) -> float:
    """Return the peak memory since `reset_peak_memory`: allocated bytes on CUDA, the peak
    resident set size of the process on CPU (which includes the libraries and the framework)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux; it cannot be reset.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

