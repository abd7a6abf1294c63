"""Where a schedule comes from, and the one path that makes it runnable.

`layout.schedule` names one of three sources:

  a schedule of the zoo, such as `1f1b` or `zb-h1` (see `parallel.pipeline.schedules`);
  a table file, `path/to/file.yaml` or `.csv`, with each rank's compute actions in order;
  a Python function, `package.module:function`, called as function(pp, micro_batches,
    virtual_stages) and returning a `Schedule` or one list of actions per rank (`Action`s or
    their text, such as "1F0").

A table file in YAML holds `actions`, one entry per rank, each a string of actions separated by
spaces or a list of them, and optionally `name` and `stage_ranks`:

    actions:
      - 0F0 0F1 0B0 0B1
      - 1F0 1B0 1F1 1B1

A CSV file holds one row per rank, one action per cell; empty cells and lines starting with `#`
are skipped. When `stage_ranks` is not given, each stage goes to the rank whose actions name it.

`prepare_schedule` builds the schedule from its source, checks the compute actions, adds the
sends and receives, and checks the result; the config validation and the trainer both call it,
so a schedule that the trainer runs has passed the verifier.
"""

from __future__ import annotations

import csv
import importlib
from pathlib import Path

import yaml

from parallel.pipeline.actions import Action, Schedule
from parallel.pipeline.passes import add_communication, order_transfers_by_pair
from parallel.pipeline.schedules import SCHEDULES, ScheduleError, build_schedule
from parallel.pipeline.verify import verify

TABLE_SUFFIXES = (".yaml", ".yml", ".csv")


def is_user_schedule(spec: str) -> bool:
    return spec not in SCHEDULES and (spec.endswith(TABLE_SUFFIXES) or ":" in spec)


def resolve_schedule(spec: str, num_ranks: int, num_microbatches: int,
                     virtual_stages: int = 1) -> Schedule:
    """Return the compute-only schedule named by `spec` for the layout; raise ScheduleError."""
    if spec in SCHEDULES:
        schedule = build_schedule(spec, num_ranks, num_microbatches, virtual_stages)
    elif spec.endswith(TABLE_SUFFIXES):
        schedule = load_table(spec)
    elif ":" in spec:
        schedule = _call_function(spec, num_ranks, num_microbatches, virtual_stages)
    else:
        raise ScheduleError(
            f"unknown schedule {spec!r}; choose one of {sorted(SCHEDULES)}, a table file "
            f"ending in {' or '.join(TABLE_SUFFIXES)}, or a function as 'package.module:function'"
        )
    _check_layout(schedule, spec, num_ranks, num_microbatches)
    return schedule


def prepare_schedule(spec: str, num_ranks: int, num_microbatches: int, virtual_stages: int = 1,
                     max_stash: int | None = None, lookahead: int = 1) -> Schedule:
    """Return the verified schedule, with its sends and receives, that the runtime executes."""
    schedule = resolve_schedule(spec, num_ranks, num_microbatches, virtual_stages)
    if any(not a.is_compute for actions in schedule.actions for a in actions):
        raise ScheduleError(f"schedule {spec!r} lists sends or receives; write compute actions "
                            f"only (F, B, I, W): the communication pass adds the transfers")
    verify(schedule, train=True, max_stash=max_stash)
    with_comm = order_transfers_by_pair(add_communication(schedule, lookahead))
    verify(with_comm, train=True, max_stash=max_stash)
    return with_comm


# ----------------------------------------------------------------------------------------------
# Table files


def load_table(path: str | Path) -> Schedule:
    """Read a schedule from a YAML or CSV table of actions per rank."""
    path = Path(path)
    if not path.is_file():
        raise ScheduleError(f"schedule file {str(path)!r} not found")
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = [row for row in csv.reader(f) if row and not row[0].lstrip().startswith("#")]
        return from_action_lists(path.stem, [[c for c in row if c.strip()] for row in rows])

    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or "actions" not in data:
        raise ScheduleError(f"{path}: expected a mapping with 'actions' (one entry per rank)")
    unknown = sorted(set(data) - {"name", "actions", "stage_ranks"})
    if unknown:
        raise ScheduleError(f"{path}: unknown key(s) {unknown}; valid keys are name, actions, "
                            f"stage_ranks")
    lists = [entry.split() if isinstance(entry, str) else list(entry) for entry in data["actions"]]
    return from_action_lists(data.get("name", path.stem), lists, data.get("stage_ranks"))


def from_action_lists(name: str, lists: list[list], stage_ranks=None,
                      num_microbatches: int | None = None) -> Schedule:
    """Build a Schedule from per-rank lists of actions or their text."""
    actions = [[_as_action(item, name, rank) for item in items] for rank, items in enumerate(lists)]
    if stage_ranks is None:
        stage_ranks = _infer_placement(name, actions)
    if num_microbatches is None:
        num_microbatches = 1 + max((a.microbatch for acts in actions for a in acts), default=-1)
    return Schedule(name, len(actions), num_microbatches, tuple(stage_ranks), actions)


def _as_action(item, name: str, rank: int) -> Action:
    if isinstance(item, Action):
        return item
    try:
        return Action.parse(str(item))
    except ValueError as error:
        raise ScheduleError(f"schedule {name!r}, rank {rank}: {error}") from None


def _infer_placement(name: str, actions: list[list[Action]]) -> tuple[int, ...]:
    """Put each stage on the rank whose actions name it."""
    owner: dict[int, int] = {}
    for rank, acts in enumerate(actions):
        for a in acts:
            if owner.setdefault(a.stage, rank) != rank:
                raise ScheduleError(
                    f"schedule {name!r}: stage {a.stage} has actions on ranks {owner[a.stage]} "
                    f"and {rank}; a stage runs on one rank (give stage_ranks to place it)"
                )
    num_stages = 1 + max(owner, default=-1)
    missing = [s for s in range(num_stages) if s not in owner]
    if missing:
        raise ScheduleError(f"schedule {name!r}: stage(s) {missing} have no actions, so their rank "
                            f"is unknown; every stage from 0 to {num_stages - 1} needs actions")
    return tuple(owner[s] for s in range(num_stages))


# ----------------------------------------------------------------------------------------------
# Functions


def _call_function(spec: str, num_ranks: int, num_microbatches: int, virtual_stages: int) -> Schedule:
    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ScheduleError(f"schedule function {spec!r} cannot be loaded: {error}; give it as "
                            f"'package.module:function' importable from the working directory") from None
    result = function(num_ranks, num_microbatches, virtual_stages)
    if isinstance(result, Schedule):
        return result
    if not isinstance(result, (list, tuple)):
        raise ScheduleError(f"schedule function {spec!r} returned {type(result).__name__}; return "
                            f"a Schedule or one list of actions per rank")
    return from_action_lists(function_name, list(result), num_microbatches=num_microbatches)


def _check_layout(schedule: Schedule, spec: str, num_ranks: int, num_microbatches: int) -> None:
    if schedule.num_ranks != num_ranks:
        raise ScheduleError(f"schedule {spec!r} has action lists for {schedule.num_ranks} ranks, "
                            f"but pp={num_ranks}; set pp to {schedule.num_ranks}")
    if schedule.num_microbatches != num_microbatches:
        raise ScheduleError(f"schedule {spec!r} runs {schedule.num_microbatches} micro-batches, "
                            f"but micro_batches={num_microbatches}; set micro_batches to "
                            f"{schedule.num_microbatches}")
