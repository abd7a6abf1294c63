"""Benchmark sweeps: a YAML file of workloads and points, expanded into single jobs.

A sweep file has three keys:

    warmup_steps: 2          # per point, run and checked but not timed
    timed_steps: 5           # per point; the report gives their median
    workloads:               # name -> model and batch (fields of `benchmarks.workload.Workload`)
      gpt-8x256:
        model: {vocab_size: 4096, n_positions: 128, n_embd: 256, n_layer: 8, n_head: 8}
        global_batch: 32
        micro_batches: 8
        seq_len: 128
    points:                  # each entry runs on every workload unless it names `workload`
      - {impl: torch, threads: [1, 2]}
      - {impl: microtron, pp: 2, schedule: [1f1b, gpipe]}

A list value in a point is swept: the entry expands into the cross product of its lists.
`layers_per_stage` takes a list of stage sizes, so it is swept only as a list of such lists.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from benchmarks.peers import PIPELINING_SCHEDULES
from benchmarks.workload import Workload
from model.config import GPTConfig, resolve_model_config

IMPLEMENTATIONS = ("microtron", "torch", "torch-pipelining", "torch-tp")


class SweepError(ValueError):
    """An invalid sweep file, found before any job starts."""


@dataclass(frozen=True)
class Point:
    """One job of a sweep: an implementation, its layout and threads per rank, on a workload."""

    workload: str
    impl: str
    tp: int = 1
    pp: int = 1
    dp: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    micro_batches: int | None = None  # None: the workload's
    layers_per_stage: tuple[int, ...] | None = None
    threads: int = 1  # torch threads per rank
    zero1: bool = False  # microtron's distributed optimizer over dp (ZeRO-1)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def cores(self) -> int:
        """Return the threads of all ranks together."""
        return self.world_size * self.threads

    @property
    def is_pipeline(self) -> bool:
        return self.pp > 1

    @property
    def layout_label(self) -> str:
        """Return the implementation and layout, without the threads."""
        parts = [self.impl]
        for axis in ("tp", "pp", "dp"):
            if getattr(self, axis) > 1:
                parts.append(f"{axis}{getattr(self, axis)}")
        if self.is_pipeline:
            parts.append(self.schedule)
            if self.layers_per_stage is not None:
                parts.append("split " + "-".join(str(n) for n in self.layers_per_stage))
        if self.micro_batches is not None:
            parts.append(f"m{self.micro_batches}")
        if self.zero1:
            parts.append("zero1")
        return " ".join(parts)

    @property
    def label(self) -> str:
        threads = f"{self.threads} thread" + ("s" if self.threads > 1 else "")
        if self.world_size > 1:
            threads += " per rank"
        return f"{self.layout_label}, {threads}"

    def job_args(self) -> dict:
        """Return the point as the plain dict that the jobs read."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.layers_per_stage is not None:
            values["layers_per_stage"] = list(self.layers_per_stage)
        return values


@dataclass
class Sweep:
    workloads: dict[str, Workload]
    points: list[Point]


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; raise SweepError naming every problem."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping with workloads and points")
    unknown = sorted(set(raw) - {"warmup_steps", "timed_steps", "workloads", "points"})
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {unknown}; valid keys are warmup_steps, "
                         f"timed_steps, workloads and points")
    steps = {key: raw[key] for key in ("warmup_steps", "timed_steps") if key in raw}
    workloads = {name: _workload(name, values, steps) for name, values in (raw.get("workloads") or {}).items()}
    if not workloads:
        raise SweepError(f"{path}: no workloads; add at least one under `workloads`")
    points = []
    for entry in raw.get("points") or []:
        points += _expand(entry, workloads)
    if not points:
        raise SweepError(f"{path}: no points; add at least one under `points`")
    problems = [problem for point in points for problem in _problems(point, workloads[point.workload])]
    if problems:
        raise SweepError(f"{path}: invalid point(s):\n  " + "\n  ".join(problems))
    return Sweep(workloads, points)


def _workload(name: str, values: dict, steps: dict) -> Workload:
    values = dict(values)
    try:
        model = values.pop("model")
        model = resolve_model_config(model) if not isinstance(model, GPTConfig) else model
        return Workload(name=name, model=model, **steps, **values)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as error:
        raise SweepError(f"workload {name!r}: {error}") from None


def _expand(entry: dict, workloads: dict[str, Workload]) -> list[Point]:
    entry = dict(entry)
    entry.setdefault("workload", list(workloads))
    axes = {}
    for key, value in entry.items():
        sweeps_lists = key == "layers_per_stage" and isinstance(value, list) and value \
            and isinstance(value[0], list)
        if isinstance(value, list) and (key != "layers_per_stage" or sweeps_lists):
            axes[key] = value
        else:
            axes[key] = [value]
    known = {f.name for f in fields(Point)}
    unknown = sorted(set(axes) - known)
    if unknown:
        raise SweepError(f"point {entry}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    points = []
    for combination in itertools.product(*axes.values()):
        values = dict(zip(axes, combination))
        if values.get("layers_per_stage") is not None:
            values["layers_per_stage"] = tuple(values["layers_per_stage"])
        points.append(Point(**values))
    return points


def _problems(point: Point, workload: Workload | None) -> list[str]:
    """Return what is wrong with one point, each with the value and a fix."""
    if workload is None:
        return [f"{point.label}: unknown workload {point.workload!r}"]
    if point.impl not in IMPLEMENTATIONS:
        return [f"{point.label}: impl={point.impl!r} is unknown; choose one of {IMPLEMENTATIONS}"]
    if point.threads < 1:
        return [f"{point.label}: threads={point.threads} must be at least 1"]
    if point.impl == "microtron":
        try:
            workload.run_config(point.tp, point.pp, point.dp, point.schedule, point.micro_batches,
                                point.virtual_stages, list(point.layers_per_stage or []) or None,
                                point.threads, point.zero1)
        except ValueError as error:
            return [f"{point.label}: {error}"]
        return []
    return _peer_problems(point)


def _peer_problems(point: Point) -> list[str]:
    allowed = {"torch": (), "torch-pipelining": ("pp",), "torch-tp": ("tp",)}[point.impl]
    problems = [f"{point.label}: {axis}={getattr(point, axis)} is not supported by {point.impl}; "
                f"leave it at 1" for axis in ("tp", "pp", "dp")
                if axis not in allowed and getattr(point, axis) != 1]
    if point.zero1:
        problems.append(f"{point.label}: zero1 is microtron's distributed optimizer; remove it")
    if point.impl == "torch-pipelining":
        if point.pp < 2:
            problems.append(f"{point.label}: torch-pipelining needs pp >= 2")
        if point.schedule not in PIPELINING_SCHEDULES:
            problems.append(f"{point.label}: schedule={point.schedule!r} is not one of "
                            f"{sorted(PIPELINING_SCHEDULES)}")
    return problems
