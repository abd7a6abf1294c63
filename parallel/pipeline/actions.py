"""The schedule format: per rank, an ordered list of actions.

An action is one unit of pipeline work on one rank, written `<stage><kind><micro-batch>`:

    2F5   forward of stage 2 on micro-batch 5
    2B5   full backward (input and weight gradients)
    2I5   backward for the input gradient only
    2W5   backward for the weight gradients only
    2SF5  send stage 2's forward output of micro-batch 5 to the rank of stage 3
    3RF5  receive stage 3's forward input (stage 2's output) of micro-batch 5
    3SB5  send stage 3's input gradient of micro-batch 5 to the rank of stage 2
    2RB5  receive stage 2's output gradient (stage 3's input gradient) of micro-batch 5

Schedule generators write only compute actions (F, B, I, W); `add_communication` in
`parallel.pipeline.passes` adds the sends and receives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

COMPUTE_KINDS = ("F", "B", "I", "W")
COMM_KINDS = ("SF", "RF", "SB", "RB")
_PATTERN = re.compile(r"^(\d+)(SF|RF|SB|RB|F|B|I|W)(\d+)$")


@dataclass(frozen=True, order=True)
class Action:
    stage: int
    kind: str
    microbatch: int

    def __post_init__(self):
        if self.kind not in COMPUTE_KINDS + COMM_KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}; expected one of "
                             f"{COMPUTE_KINDS + COMM_KINDS}")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    def __repr__(self) -> str:
        return str(self)

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    @classmethod
    def parse(cls, text: str) -> "Action":
        match = _PATTERN.match(text.strip())
        if match is None:
            raise ValueError(
                f"cannot parse action {text!r}; expected <stage><kind><micro-batch> with kind one "
                f"of {COMPUTE_KINDS + COMM_KINDS}, such as '1F0' or '2SB3'"
            )
        return cls(int(match.group(1)), match.group(2), int(match.group(3)))


def F(stage: int, microbatch: int) -> Action:
    return Action(stage, "F", microbatch)


def B(stage: int, microbatch: int) -> Action:
    return Action(stage, "B", microbatch)


def I(stage: int, microbatch: int) -> Action:  # noqa: E743 - the field's name for this pass
    return Action(stage, "I", microbatch)


def W(stage: int, microbatch: int) -> Action:
    return Action(stage, "W", microbatch)


@dataclass
class Schedule:
    """A pipeline schedule: which rank runs each stage, and each rank's actions in order.

    stage_ranks[s] is the pipeline rank that runs stage s; with v virtual stages per rank there
    are v * num_ranks stages. actions[r] is rank r's list.
    """

    name: str
    num_ranks: int
    num_microbatches: int
    stage_ranks: tuple[int, ...]
    actions: list[list[Action]] = field(default_factory=list)

    @property
    def num_stages(self) -> int:
        return len(self.stage_ranks)

    def stages_of(self, rank: int) -> list[int]:
        return [s for s, r in enumerate(self.stage_ranks) if r == rank]

    def format(self) -> str:
        """Return the schedule as text, one line per rank."""
        return "\n".join(
            f"rank {r}: " + " ".join(str(a) for a in acts) for r, acts in enumerate(self.actions)
        )

    def compute_only(self) -> "Schedule":
        """Return a copy without the communication actions."""
        actions = [[a for a in acts if a.is_compute] for acts in self.actions]
        return Schedule(self.name, self.num_ranks, self.num_microbatches, self.stage_ranks, actions)


def format_grid(actions: list[list[Action]], marks: dict[tuple[int, int], str] | None = None,
                max_rows: int | None = None) -> str:
    """Return the step-by-rank grid of `actions`: one row per position in the lists, one column
    per rank.

    `marks` maps (rank, position) to a note; the marked cells are drawn as `>1B3<` and the notes
    are listed under the grid. With `max_rows`, only the rows around the first mark are drawn.
    """
    marks = marks or {}
    num_rows = max((len(acts) for acts in actions), default=0)
    width = max([len(str(a)) for acts in actions for a in acts] + [6]) + 2
    rows = range(num_rows)
    if max_rows is not None and num_rows > max_rows:
        centre = min((pos for _, pos in marks), default=0)
        first = max(0, min(centre - max_rows // 2, num_rows - max_rows))
        rows = range(first, first + max_rows)

    lines = ["step  " + "".join(f"rank {r}".ljust(width) for r in range(len(actions))).rstrip()]
    if rows.start > 0:
        lines.append(f"  ... {rows.start} earlier step(s)")
    for pos in rows:
        cells = []
        for rank, acts in enumerate(actions):
            text = str(acts[pos]) if pos < len(acts) else "."
            if (rank, pos) in marks:
                text = f">{text}<"
            cells.append(text.ljust(width))
        lines.append(f"{pos:>4}  " + "".join(cells).rstrip())
    if rows.stop < num_rows:
        lines.append(f"  ... {num_rows - rows.stop} later step(s)")
    for (rank, pos), note in sorted(marks.items()):
        action = actions[rank][pos] if pos < len(actions[rank]) else "(end of list)"
        lines.append(f"rank {rank}, step {pos}, {action}: {note}")
    return "\n".join(lines)
