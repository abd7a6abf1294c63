"""The cost model counts every collective and transfer that a training step issues: its
communication equals the ledger's record of real steps on gloo, byte for byte."""

from __future__ import annotations

import pytest

from parallel import comm
from parallel.mesh import Layout
from planner.cluster import load_cluster
from planner.estimate import CostModel
from planner.traffic import step_traffic
from planner.workload import Candidate, Workload
from tests.helpers import make_trainer, run_config
from training.compat import Strategy

_CASES = [
    # (tp, pp, dp, schedule, virtual stages, micro-batches)
    (2, 2, 1, "1f1b", 1, 2),
    (1, 2, 2, "zb-v", 2, 3),
    (2, 1, 2, "1f1b", 1, 2),
    (1, 2, 1, "interleaved-1f1b", 2, 4),
]


def _overrides(tp, pp, dp, schedule, virtual, micro_batches) -> dict:
    return {"layout.tp": tp, "layout.pp": pp, "layout.dp": dp, "layout.schedule": schedule,
            "layout.virtual_stages": virtual, "layout.micro_batches": micro_batches,
            "train.global_batch": 2 * micro_batches * dp}


def _ledger_job(rank: int, world_size: int, overrides: dict):
    trainer = make_trainer(rank, overrides)
    trainer.train_step()
    with comm.recording(comm.Ledger()) as ledger:
        trainer.train_step()
    return {"pp_rank": trainer.mesh.pp_rank, "bytes": {f"{op} {group}": n for (op, group), n in ledger.bytes.items()}}


@pytest.mark.parametrize("case", _CASES, ids=lambda c: f"tp{c[0]}-pp{c[1]}-dp{c[2]}-{c[3]}")
def test_cost_model_traffic_equals_ledger(case):
    from tests.helpers import run_job

    tp, pp, dp, schedule, virtual, micro_batches = case
    overrides = _overrides(*case)
    config = run_config(overrides)
    workload = Workload(config.model, config.seq_len, config.train.global_batch, config.train.dtype)
    candidate = Candidate(tp, pp, dp, config.micro_batch_size, micro_batches,
                          Strategy(schedule=schedule, virtual_stages=virtual, dtype=config.train.dtype))
    expected = step_traffic(CostModel(load_cluster("a100-80gb-selene")), workload, candidate)

    for result in run_job(_ledger_job, Layout(tp=tp, pp=pp, dp=dp), overrides):
        predicted = {f"{op} {group}": n for (op, group), n in expected[result["pp_rank"]].items()}
        assert result["bytes"] == pytest.approx(predicted), f"pipeline rank {result['pp_rank']}"
