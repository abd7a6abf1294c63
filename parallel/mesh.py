"""The tp x pp x dp mesh of ranks and the process groups along its axes.

Terms used throughout microtron: an *axis* is one dimension of the mesh (tp, pp or dp), a *group*
is the set of ranks that differ only along one axis, and a rank's *coordinates* are its index on
each axis. Ranks are numbered with tp fastest, then dp, then pp:

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

so the ranks of a TP group are adjacent (on one node, where the all-reduces are frequent) and the
pipeline axis is outermost (its point-to-point traffic is the lightest and may cross nodes), the
same order as Megatron-LM's default.

Groups are built once, by every rank in the same order as torch.distributed requires, and passed
to the layers that need them. With a world of one process no group is created at all and every
communication op becomes a no-op, so the single-process model runs the very same code.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch.distributed as dist

from parallel import launch


@dataclass(frozen=True)
class Layout:
    """Sizes of the three mesh axes."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """Return (tp_rank, pp_rank, dp_rank) of a global rank."""
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        pp_rank = rank // (self.tp * self.dp)
        return tp_rank, pp_rank, dp_rank

    def rank_of(self, tp_rank: int, pp_rank: int, dp_rank: int) -> int:
        return pp_rank * (self.dp * self.tp) + dp_rank * self.tp + tp_rank


class Group:
    """The ranks along one mesh axis that this rank belongs to.

    `pg` is the torch.distributed process group, or None when the group has one member (then no
    communication is needed). `ranks` lists the global ranks in axis order.
    """

    def __init__(self, name: str, ranks: list[int], rank: int, pg):
        self.name = name
        self.ranks = ranks
        self.pg = pg
        self.rank = ranks.index(rank)  # index of this rank inside the group
        self.size = len(ranks)

    def global_rank(self, index: int) -> int:
        return self.ranks[index]

    def __repr__(self) -> str:
        return f"Group({self.name}, ranks={self.ranks}, rank={self.rank})"


class Mesh:
    """This rank's place in the tp x pp x dp mesh and its groups.

    Groups:
      tp: ranks with the same (pp, dp), which split layers by TP.
      pp: ranks with the same (tp, dp), which run consecutive stages.
      dp: ranks with the same (tp, pp), which hold model replicas.
      model: ranks with the same dp rank (one full model replica), for the gradient norm.
      embedding: the first and the last pipeline rank with the same (tp, dp), which hold the two
        copies of the tied embedding; one member when pp == 1 and on middle pipeline ranks.
    """

    def __init__(self, layout: Layout, rank: int, timeout: datetime.timedelta | None = None):
        self.layout = layout
        self.rank = rank
        self.tp_rank, self.pp_rank, self.dp_rank = layout.coordinates(rank)
        # Without an explicit timeout, each group gets the one the launcher gave the default group.
        self._timeout = timeout if timeout is not None else launch.group_timeout()
        single = layout.world_size == 1
        if not single and not dist.is_initialized():
            raise RuntimeError(
                f"a mesh of {layout.world_size} ranks needs torch.distributed to be initialized "
                f"first; call parallel.launch.run_ranks or init_process_group"
            )

        tp, pp, dp = layout.tp, layout.pp, layout.dp
        self.tp = self._build_axis("tp", [
            [layout.rank_of(t, p, d) for t in range(tp)] for p in range(pp) for d in range(dp)
        ])
        self.pp = self._build_axis("pp", [
            [layout.rank_of(t, p, d) for p in range(pp)] for t in range(tp) for d in range(dp)
        ])
        self.dp = self._build_axis("dp", [
            [layout.rank_of(t, p, d) for d in range(dp)] for t in range(tp) for p in range(pp)
        ])
        self.model = self._build_axis("model", [
            [layout.rank_of(t, p, d) for p in range(pp) for t in range(tp)] for d in range(dp)
        ])
        # Ranks of middle stages belong to no embedding group and get a group of their own.
        self.embedding = self._build_axis("embedding", [
            sorted({layout.rank_of(t, 0, d), layout.rank_of(t, pp - 1, d)})
            for t in range(tp) for d in range(dp)
        ])

    def _build_axis(self, name: str, all_groups: list[list[int]]) -> Group:
        """Create every group of one axis (all ranks must take part) and keep this rank's."""
        mine = Group(name, [self.rank], self.rank, None)
        for ranks in all_groups:
            pg = None
            if len(ranks) > 1:
                pg = dist.new_group(ranks, timeout=self._timeout)
            if self.rank in ranks:
                mine = Group(name, ranks, self.rank, pg)
        return mine

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    def describe(self) -> str:
        """Return this rank's coordinates as a short log prefix, such as `[tp1 pp0 dp0]`."""
        return f"[tp{self.tp_rank} pp{self.pp_rank} dp{self.dp_rank}]"
