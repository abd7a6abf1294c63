"""Which parallel strategies combine, declared once.

A *strategy* is one value on each of these axes: the pipeline schedule, the virtual stages per
pipeline rank, tied embeddings, sequence parallelism, activation recomputation, ZeRO-1 and the
dtype. This module declares the values of each axis, the config keys that select a value and
the rules that say which values combine. The declaration drives:

  `training.config.validate`, which rejects a config that breaks a rule (`problems`);
  the planner's search space (`planner.search`), which only proposes strategies that run;
  the table between the `compat-table` markers in README.md (`markdown_table`, written by
    `scripts/compat_table.py`);
  the layout matrix of `tests/test_compat.py` (`pairwise_strategies`).

A value *runs* when every config key that selects it exists in this build's run config (for
example `layout.sequence_parallel`). A value whose keys do not exist yet is *declared*: its rules
are set here, so the planner can cost it on request, but the trainer cannot run it, and the
config loader rejects its keys as unknown.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from typing import Callable, Iterator

RUNS = "runs"
DECLARED = "declared"


# ----------------------------------------------------------------------------------------------
# Schedules


@dataclass(frozen=True)
class ScheduleRule:
    """What a schedule of the zoo requires and how it places stages.

    virtual_stages: the allowed stages per pipeline rank, (minimum, maximum or None for no bound).
    placement: contiguous (stage i on rank i), round-robin (stage s on rank s mod pp) or v-shape
        (rank r holds stages r and 2 pp - 1 - r, so rank 0 holds the first and the last stage).
    split_backward: the schedule splits backward passes into I and W actions.
    min_micro_batches: (a, c) for the rule micro_batches >= a * pp + c.
    """

    name: str
    virtual_stages: tuple[int, int | None]
    placement: str
    split_backward: bool
    min_micro_batches: tuple[int, int] = (0, 1)

    def allows_virtual_stages(self, v: int) -> bool:
        low, high = self.virtual_stages
        return v >= low and (high is None or v <= high)

    def min_micro_batches_for(self, pp: int) -> int:
        a, c = self.min_micro_batches
        return max(1, a * pp + c)

    def embedding_copies(self, pp: int) -> int:
        """Return how many ranks of a pipeline hold the tied embedding: the first and the last
        stage's ranks, which are one rank under a V-shaped placement or with pp = 1."""
        return 1 if pp == 1 or self.placement == "v-shape" else 2


SCHEDULE_RULES: dict[str, ScheduleRule] = {rule.name: rule for rule in (
    ScheduleRule("gpipe", (1, 1), "contiguous", False),
    ScheduleRule("1f1b", (1, 1), "contiguous", False),
    ScheduleRule("interleaved-1f1b", (2, None), "round-robin", False),
    ScheduleRule("zb-h1", (1, 1), "contiguous", True),
    ScheduleRule("zb-h2", (1, 1), "contiguous", True),
    ScheduleRule("zb-v", (2, 2), "v-shape", True),
    ScheduleRule("dualpipev", (2, 2), "v-shape", True, min_micro_batches=(2, -1)),
)}


# ----------------------------------------------------------------------------------------------
# The other axes


@dataclass(frozen=True)
class Choice:
    """One value of an axis and the config keys (`section.key`) it sets beyond the axis's defaults."""

    value: object
    label: str
    settings: tuple[tuple[str, object], ...] = ()

    @property
    def keys(self) -> list[str]:
        return [key for key, _ in self.settings]


@dataclass(frozen=True)
class Axis:
    """One strategy axis. `defaults` gives each config key the axis uses and its value when a
    config does not set it (or when this build has no such key)."""

    name: str  # the field of `Strategy`
    title: str
    defaults: tuple[tuple[str, object], ...]
    choices: tuple[Choice, ...]
    rule: str = ""  # the reason some combinations of the axis's keys select no value

    def choice(self, value) -> Choice:
        for choice in self.choices:
            if choice.value == value:
                return choice
        raise KeyError(f"{self.name}={value!r} is not one of {[c.value for c in self.choices]}")

    def assignment(self, choice: Choice) -> dict[str, object]:
        """Return the value of every key of the axis under `choice`."""
        return {**dict(self.defaults), **dict(choice.settings)}


AXES: tuple[Axis, ...] = (
    Axis("tied_embeddings", "tied embeddings", (("model.tie_word_embeddings", True),), (
        Choice(True, "tied"),
        Choice(False, "untied", (("model.tie_word_embeddings", False),)),
    )),
    Axis("sequence_parallel", "sequence parallelism", (("layout.sequence_parallel", False),), (
        Choice(False, "off"),
        Choice(True, "on", (("layout.sequence_parallel", True),)),
    )),
    Axis("recompute", "recomputation", (("train.recompute", "none"),), (
        Choice("none", "none"),
        Choice("selective", "selective", (("train.recompute", "selective"),)),
        Choice("full", "full", (("train.recompute", "full"),)),
    )),
    Axis("zero1", "ZeRO-1", (("train.distributed_optimizer", False),), (
        Choice(False, "off"),
        Choice(True, "on", (("train.distributed_optimizer", True),)),
    )),
    # bf16 and fp16 compute under autocast with float32 master weights.
    Axis("dtype", "dtype", (("train.dtype", "float32"), ("train.mixed_precision", None)), (
        Choice("float32", "float32"),
        Choice("float64", "float64", (("train.dtype", "float64"),)),
        Choice("bf16", "bf16", (("train.mixed_precision", "bf16"),)),
        Choice("fp16", "fp16", (("train.mixed_precision", "fp16"),)),
    ), rule="mixed precision needs float32 master weights, so it takes train.dtype=float32"),
)
AXIS_BY_NAME = {axis.name: axis for axis in AXES}

# Bytes of one value in each dtype's compute; mixed precision computes matmuls in 16 bits.
COMPUTE_BYTES = {"float32": 4, "float64": 8, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Strategy:
    """One value on every axis: what a run combines besides the mesh sizes and batch."""

    schedule: str = "1f1b"
    virtual_stages: int = 1
    tied_embeddings: bool = True
    sequence_parallel: bool = False
    recompute: str = "none"
    zero1: bool = False
    dtype: str = "float32"

    def settings(self) -> dict[str, object]:
        """Return the config overrides (`section.key`: value) that select this strategy: the keys
        it sets, and the other keys of its axes that this build has."""
        values: dict[str, object] = {"layout.schedule": self.schedule,
                                     "layout.virtual_stages": self.virtual_stages}
        for axis in AXES:
            choice = axis.choice(getattr(self, axis.name))
            values.update({key: value for key, value in axis.assignment(choice).items()
                           if key in choice.keys or config_has_key(key)})
        return values

    def describe(self) -> str:
        parts = [self.schedule if self.virtual_stages == 1 else f"{self.schedule} v={self.virtual_stages}"]
        if self.sequence_parallel:
            parts.append("sp")
        if self.recompute != "none":
            parts.append(f"recompute={self.recompute}")
        if self.zero1:
            parts.append("zero1")
        if not self.tied_embeddings:
            parts.append("untied")
        parts.append(self.dtype)
        return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# What runs in this build


@functools.lru_cache(maxsize=None)
def config_has_key(key: str) -> bool:
    """Return whether the run config of this build has `key` (`section.key`)."""
    from training.config import RunConfig

    section, _, name = key.partition(".")
    sections = {f.name for f in dataclasses.fields(RunConfig)}
    if section not in sections:
        return False
    return name in {f.name for f in dataclasses.fields(getattr(RunConfig(), section))}


def status(axis_name: str, value) -> str:
    """Return RUNS when this build's config can select `value` on the axis, else DECLARED."""
    if axis_name in ("schedule", "virtual_stages"):
        return RUNS
    choice = AXIS_BY_NAME[axis_name].choice(value)
    return RUNS if all(config_has_key(key) for key in choice.keys) else DECLARED


def strategy_runs(strategy: Strategy) -> bool:
    return all(status(axis.name, getattr(strategy, axis.name)) == RUNS for axis in AXES)


def strategy_of(config) -> tuple[Strategy | None, list[str]]:
    """Return the strategy a run config selects, or None and the reasons it selects none."""
    values: dict[str, object] = {"schedule": config.layout.schedule,
                                 "virtual_stages": config.layout.virtual_stages}
    problems = []
    for axis in AXES:
        found = {key: _config_value(config, key, default) for key, default in axis.defaults}
        match = [c for c in axis.choices if axis.assignment(c) == found]
        if match:
            values[axis.name] = match[0].value
            continue
        problems.append(_no_choice_problem(axis, found))
    if problems:
        return None, problems
    return Strategy(**values), []


def _no_choice_problem(axis: Axis, found: dict[str, object]) -> str:
    """Return why the config values `found` of the axis's keys select none of its values: a key
    with a value no setting uses, or else a combination that the axis's rule excludes."""
    runnable = [c for c in axis.choices if status(axis.name, c.value) == RUNS]
    options = "; ".join(
        f"{c.label}: " + ", ".join(f"{k}={yaml_word(v)}" for k, v in axis.assignment(c).items()
                                  if config_has_key(k))
        for c in runnable)
    for key, value in found.items():
        allowed = list(dict.fromkeys(axis.assignment(c)[key] for c in runnable))
        if config_has_key(key) and value not in allowed:
            return (f"{key}={yaml_word(value)} must be {_either(allowed)}; the valid {axis.title} settings "
                    f"are {options}")

    config_values = ", ".join(f"{key}={yaml_word(value)}" for key, value in found.items()
                              if config_has_key(key))
    reason = f" because {axis.rule}" if axis.rule else ""
    return f"{config_values} selects no {axis.title} setting{reason}; valid settings are {options}"


def _either(values: list) -> str:
    """Join values as YAML writes them (null, true), as in 'a, b or c'."""
    words = [yaml_word(value) for value in values]
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def yaml_word(value) -> str:
    """Format a config value as it is written in YAML: None as null, booleans in lower case."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _config_value(config, key: str, default):
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name, default)


# ----------------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True)
class Context:
    """The mesh sizes, micro-batches per step and sequence length that rules check a strategy
    against."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batches: int = 1
    seq_len: int | None = None


@dataclass(frozen=True)
class Rule:
    """A rule that a strategy must keep in its context.

    axes: the axes it relates, for the README. check(strategy, context) returns None or the
    problem: the value, the rule and a fix.
    """

    name: str
    axes: tuple[str, ...]
    text: str
    check: Callable[[Strategy, Context], str | None]


def _virtual_stages_problem(s: Strategy, context: Context) -> str | None:
    rule = SCHEDULE_RULES.get(s.schedule)
    if rule is None or rule.allows_virtual_stages(s.virtual_stages):
        return None
    low, high = rule.virtual_stages
    if high is None:
        return (f"schedule {s.schedule!r} needs virtual_stages >= {low}, got {s.virtual_stages}; "
                f"set virtual_stages to {low} or more, or use '1f1b' for one stage per rank")
    what = "one stage per rank" if high == 1 else f"{high} stages per rank"
    fix = f"set virtual_stages to {high}"
    if high == 1:
        fix += " or pick 'interleaved-1f1b', 'zb-v' or 'dualpipev'"
    return f"schedule {s.schedule!r} runs {what}, but virtual_stages={s.virtual_stages}; {fix}"


def _micro_batches_problem(s: Strategy, context: Context) -> str | None:
    rule = SCHEDULE_RULES.get(s.schedule)
    if rule is None or context.micro_batches >= rule.min_micro_batches_for(context.pp):
        return None
    a, c = rule.min_micro_batches
    need = rule.min_micro_batches_for(context.pp)
    return (f"schedule {s.schedule!r} needs micro_batches >= {a} * pp {'-' if c < 0 else '+'} "
            f"{abs(c)} = {need}, got micro_batches={context.micro_batches} with pp={context.pp}; use at "
            f"least {need} micro-batches or 'zb-v'")


def _sequence_split_problem(s: Strategy, context: Context) -> str | None:
    if not s.sequence_parallel or context.seq_len is None or context.seq_len % context.tp == 0:
        return None
    shorter = context.seq_len - context.seq_len % context.tp
    return (f"seq_len={context.seq_len} is not divisible by tp={context.tp}: sequence parallelism splits "
            f"each sequence over the TP ranks; use a multiple of {context.tp} (such as train.seq_len="
            f"{shorter or context.tp}) or turn sequence parallelism off")


RULES: tuple[Rule, ...] = (
    Rule("virtual stages", ("schedule", "virtual_stages"),
         "each schedule runs the stages per rank in its row", _virtual_stages_problem),
    Rule("micro-batches", ("schedule", "micro_batches"),
         "DualPipeV needs micro_batches >= 2 pp - 1 for its main phase", _micro_batches_problem),
    Rule("sequence split", ("sequence_parallel", "tp", "seq_len"),
         "sequence parallelism needs seq_len divisible by tp", _sequence_split_problem),
)

# Values that combine but change nothing (see `has_effect`); the planner skips them.
NO_EFFECT = {
    "sequence_parallel": "with tp = 1: there is no sequence to split",
    "zero1": "with dp = 1: there is no replica to shard the optimizer state over",
}


def problems(strategy: Strategy, context: Context, require_runs: bool = True) -> list[str]:
    """Return the problem of every rule that `strategy` breaks in `context` (empty: it combines).

    With `require_runs`, a value that this build cannot run is a problem too.
    """
    found = [problem for rule in RULES if (problem := rule.check(strategy, context)) is not None]
    if require_runs:
        for axis in AXES:
            value = getattr(strategy, axis.name)
            if status(axis.name, value) != RUNS:
                keys = ", ".join(axis.choice(value).keys)
                found.append(f"{axis.title} {axis.choice(value).label} is declared but does not "
                             f"run in this build: the run config has no key {keys}")
    return found


def schedule_problems(strategy: Strategy, context: Context) -> list[str]:
    """Return the problems of the rules that involve the schedule."""
    return [problem for rule in RULES if "schedule" in rule.axes
            and (problem := rule.check(strategy, context)) is not None]


def has_effect(strategy: Strategy, context: Context) -> bool:
    """Return whether every non-default value of `strategy` changes something in `context`."""
    if strategy.sequence_parallel and context.tp == 1:
        return False
    if strategy.zero1 and context.dp == 1:
        return False
    return True


def virtual_stage_options(schedule: str, pp: int, n_layer: int) -> list[int]:
    """Return the virtual stages per rank that `schedule` allows with pp ranks and n_layer
    layers (every stage needs a layer)."""
    low, high = SCHEDULE_RULES[schedule].virtual_stages
    most = n_layer // pp
    top = most if high is None else min(high, most)
    return list(range(low, top + 1))


def values(axis_name: str, include_declared: bool = False) -> list:
    """Return the values of an axis, only those that run unless `include_declared`."""
    return [c.value for c in AXIS_BY_NAME[axis_name].choices
            if include_declared or status(axis_name, c.value) == RUNS]


# ----------------------------------------------------------------------------------------------
# The test matrix


def pairwise_strategies(include_declared: bool = False, dtypes: tuple[str, ...] | None = None) -> list[Strategy]:
    """Return strategies that together contain every pair of values of any two axes.

    Each schedule takes its smallest allowed virtual stages. Only values that run are used
    unless `include_declared`; `dtypes` restricts the dtype axis. The list is built greedily:
    each new strategy covers as many uncovered pairs as possible.
    """
    columns = {"schedule": list(SCHEDULE_RULES)}
    for axis in AXES:
        columns[axis.name] = [v for v in values(axis.name, include_declared)
                              if axis.name != "dtype" or dtypes is None or v in dtypes]
    names = list(columns)
    uncovered = {((a, x), (b, y)) for a, b in itertools.combinations(names, 2)
                 for x in columns[a] for y in columns[b]}
    candidates = [dict(zip(names, combo)) for combo in itertools.product(*columns.values())]
    chosen = []
    while uncovered:
        best = max(candidates, key=lambda c: len(_pairs(c, names) & uncovered))
        uncovered -= _pairs(best, names)
        chosen.append(best)
    return [Strategy(virtual_stages=SCHEDULE_RULES[c["schedule"]].virtual_stages[0], **c)
            for c in chosen]


def _pairs(combo: dict, names: list[str]) -> set:
    return {((a, combo[a]), (b, combo[b])) for a, b in itertools.combinations(names, 2)}


def strategy_space(include_declared: bool = False) -> Iterator[dict]:
    """Yield every combination of the non-schedule axes' values (that run, unless
    `include_declared`), as keyword arguments of `Strategy`."""
    names = [axis.name for axis in AXES]
    for combo in itertools.product(*(values(name, include_declared) for name in names)):
        yield dict(zip(names, combo))


# ----------------------------------------------------------------------------------------------
# The README table


def markdown_table() -> str:
    """Return the README's compatibility section: schedules, axis values and rules."""
    lines = ["| schedule | stages per rank | placement | micro-batches | backward | embedding copies (pp > 1) |",
             "|---|---|---|---|---|---|"]
    for rule in SCHEDULE_RULES.values():
        low, high = rule.virtual_stages
        if low == high:
            stages = str(low)
        elif high is None:
            stages = f">= {low}"
        else:
            stages = f"{low} to {high}"
        a, c = rule.min_micro_batches
        micro = "any" if a == 0 else f">= {a} pp {'-' if c < 0 else '+'} {abs(c)}"
        backward = "split into I and W" if rule.split_backward else "full B"
        lines.append(f"| `{rule.name}` | {stages} | {rule.placement} | {micro} | {backward} | "
                     f"{rule.embedding_copies(2)} |")
    lines += ["", "| axis | values | selected by |", "|---|---|---|"]
    for axis in AXES:
        cells, keys = [], []
        for choice in axis.choices:
            mark = "" if status(axis.name, choice.value) == RUNS else " (declared)"
            cells.append(f"{choice.label}{mark}")
            keys += [f"`{k}={v}`" for k, v in choice.settings if f"`{k}={v}`" not in keys]
        lines.append(f"| {axis.title} | {', '.join(cells)} | {', '.join(keys) or '-'} |")
    lines += ["", "Every schedule combines with every value of the other axes, under these rules:", ""]
    lines += [f"- {rule.name} ({' x '.join(rule.axes)}): {rule.text}." for rule in RULES]
    lines += [f"- {axis.title} ({' x '.join(key for key, _ in axis.defaults)}): {axis.rule}." for axis in AXES
              if axis.rule]
    lines += [f"- {AXIS_BY_NAME[name].title} is accepted but changes nothing {why}." for name, why in
              NO_EFFECT.items()]
    lines += ["", "A value marked declared has its rules set, but this build's run config has no "
              "key to select it, so the trainer cannot run it yet; the planner costs it only "
              "with `--include-declared`."]
    return "\n".join(lines)
